package adminapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Error is a refusal from the API.
type Error struct {
	StatusCode int
	Message    string
	// RetryAfter is the server's Retry-After, zero when absent.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("gateway answered %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	}
	return fmt.Sprintf("gateway answered %d: %s", e.StatusCode, e.Message)
}

// IsStatus reports whether err is an API refusal with status code.
func IsStatus(err error, code int) bool {
	var e *Error
	return errors.As(err, &e) && e.StatusCode == code
}

// Client calls the admin API.
type Client struct {
	BaseURL string
	HTTP    *http.Client
}

// NewClient returns a client for the API at baseURL using tlsConf (which
// must carry an operator certificate).
func NewClient(baseURL string, tlsConf *tls.Config) *Client {
	tr := &http.Transport{
		TLSClientConfig:       tlsConf,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
		MaxIdleConnsPerHost:   16,
	}
	// No overall timeout: a backup may stream for long; callers bound
	// requests with their context.
	return &Client{BaseURL: strings.TrimRight(baseURL, "/"), HTTP: &http.Client{Transport: tr}}
}

// OperatorTLS builds the TLS configuration of an operator from a data
// directory: DIR/operator.crt, DIR/operator.key and DIR/ca.pem.
func OperatorTLS(l pki.Layout) (*tls.Config, error) {
	return ClientTLS(l.OperatorCert(), l.OperatorKey(), l.CABundle())
}

// ClientTLS builds a client TLS configuration from PEM files.
func ClientTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load client certificate %s: %w", certFile, err)
	}
	if err := pki.CheckKeyFileMode(keyFile); err != nil {
		return nil, err
	}
	pool, err := pki.ReadPoolFile(caFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, RootCAs: pool}, nil
}

// CreateTokens mints tokens.
func (c *Client) CreateTokens(ctx context.Context, req TokenRequest) (TokenResponse, error) {
	var out TokenResponse
	err := c.call(ctx, http.MethodPost, PathTokens, req, &out)
	return out, err
}

// Devices lists devices; status and prefix filter, after and limit page.
func (c *Client) Devices(ctx context.Context, status, prefix, after string, limit int) (DeviceList, error) {
	q := url.Values{}
	for k, v := range map[string]string{"status": status, "prefix": prefix, "after": after} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	var out DeviceList
	p := PathDevices
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	err := c.call(ctx, http.MethodGet, p, nil, &out)
	return out, err
}

// Device shows one device.
func (c *Client) Device(ctx context.Context, id string) (DeviceDetail, error) {
	var out DeviceDetail
	err := c.call(ctx, http.MethodGet, PathDevices+"/"+url.PathEscape(id), nil, &out)
	return out, err
}

// Revoke revokes a device.
func (c *Client) Revoke(ctx context.Context, id, reason string) (RevokeResponse, error) {
	var out RevokeResponse
	err := c.call(ctx, http.MethodPost, PathDevices+"/"+url.PathEscape(id)+"/revoke", RevokeRequest{Reason: reason}, &out)
	return out, err
}

// IssueCertificate asks for a service or operator certificate.
func (c *Client) IssueCertificate(ctx context.Context, req CertificateRequest) (CertificateResponse, error) {
	var out CertificateResponse
	err := c.call(ctx, http.MethodPost, PathCertificates, req, &out)
	return out, err
}

// RevokeCertificate revokes one certificate by serial.
func (c *Client) RevokeCertificate(ctx context.Context, serial, reason string) (Certificate, error) {
	var out Certificate
	err := c.call(ctx, http.MethodPost, PathCertificates+"/"+url.PathEscape(serial)+"/revoke", RevokeRequest{Reason: reason}, &out)
	return out, err
}

// Audit lists audit events after seq (0 for all), optionally of one device.
func (c *Client) Audit(ctx context.Context, after uint64, deviceID string, limit int) (AuditList, error) {
	q := url.Values{}
	if after > 0 {
		q.Set("after", strconv.FormatUint(after, 10))
	}
	if deviceID != "" {
		q.Set("device", deviceID)
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	p := PathAudit
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	var out AuditList
	err := c.call(ctx, http.MethodGet, p, nil, &out)
	return out, err
}

// Backup streams a consistent copy of the registry to w.
func (c *Client) Backup(ctx context.Context, w io.Writer) (int64, error) {
	resp, err := c.send(ctx, http.MethodGet, PathBackup, nil)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return n, fmt.Errorf("backup: %w", err)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return n, fmt.Errorf("backup: got %d of %d bytes", n, resp.ContentLength)
	}
	return n, nil
}

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("decode answer of %s %s: %w", method, path, err)
	}
	return nil
}

func (c *Client) send(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach gateway admin API: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		e := &Error{StatusCode: resp.StatusCode, Message: strings.TrimSpace(string(msg))}
		if n, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && n >= 0 {
			e.RetryAfter = time.Duration(n) * time.Second
		}
		return nil, e
	}
	return resp, nil
}
