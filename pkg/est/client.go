package est

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Error is a refusal from an EST server: its HTTP status and plain-text reason.
type Error struct {
	Op         string
	StatusCode int
	Message    string
	// RetryAfter is the server's Retry-After, zero when absent.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(e.StatusCode)
	}
	return fmt.Sprintf("%s: %d %s", e.Op, e.StatusCode, msg)
}

// Temporary reports whether trying again later may succeed.
func (e *Error) Temporary() bool {
	return e.StatusCode == http.StatusTooManyRequests || e.StatusCode >= 500
}

// Client talks to an EST server.
type Client struct {
	// BaseURL is the server's origin, e.g. https://gateway:8443.
	BaseURL string
	// HTTP is the client used for every request.
	HTTP *http.Client
}

// NewClient returns a client for the EST server at baseURL that trusts roots
// and, when getCert is not nil, authenticates with the certificate it
// returns (for simplereenroll). Connections are not reused, so each request
// presents the current certificate.
func NewClient(baseURL string, roots *x509.CertPool, getCert func(*tls.CertificateRequestInfo) (*tls.Certificate, error)) *Client {
	tr := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		TLSClientConfig: &tls.Config{
			MinVersion:           tls.VersionTLS12,
			RootCAs:              roots,
			GetClientCertificate: getCert,
		},
		DisableKeepAlives:     true,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
	}
	return &Client{BaseURL: strings.TrimRight(baseURL, "/"), HTTP: &http.Client{Transport: tr, Timeout: 60 * time.Second}}
}

// CACerts fetches the CA certificates (issuing CA first).
func (c *Client) CACerts(ctx context.Context) ([]*x509.Certificate, error) {
	body, err := c.do(ctx, "cacerts", http.MethodGet, PathCACerts, nil, nil)
	if err != nil {
		return nil, err
	}
	certs, err := DecodeCerts(body)
	if err != nil {
		return nil, fmt.Errorf("cacerts: %w", err)
	}
	return certs, nil
}

// SimpleEnroll trades a CSR and a one-time token for a certificate, with
// HTTP Basic auth (user = device ID, password = token).
func (c *Client) SimpleEnroll(ctx context.Context, csrDER []byte, deviceID, token string) (*x509.Certificate, error) {
	return c.enroll(ctx, "simpleenroll", PathEnroll, csrDER, func(r *http.Request) { r.SetBasicAuth(deviceID, token) })
}

// SimpleReenroll renews a certificate, authenticated by the TLS client
// certificate the client presents.
func (c *Client) SimpleReenroll(ctx context.Context, csrDER []byte) (*x509.Certificate, error) {
	return c.enroll(ctx, "simplereenroll", PathReenroll, csrDER, nil)
}

func (c *Client) enroll(ctx context.Context, op, path string, csrDER []byte, auth func(*http.Request)) (*x509.Certificate, error) {
	body, err := c.do(ctx, op, http.MethodPost, path, EncodeCSR(csrDER), func(r *http.Request) {
		r.Header.Set("Content-Type", TypePKCS10)
		r.Header.Set("Content-Transfer-Encoding", "base64")
		if auth != nil {
			auth(r)
		}
	})
	if err != nil {
		return nil, err
	}
	certs, err := DecodeCerts(body)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return certs[0], nil
}

// CRL fetches the current CRL (DER). The caller verifies its signature.
func (c *Client) CRL(ctx context.Context) (*x509.RevocationList, error) {
	body, err := c.do(ctx, "crl", http.MethodGet, PathCRL, nil, nil)
	if err != nil {
		return nil, err
	}
	crl, err := x509.ParseRevocationList(body)
	if err != nil {
		return nil, fmt.Errorf("crl: %w", err)
	}
	return crl, nil
}

const maxResponse = 1 << 20

func (c *Client) do(ctx context.Context, op, method, path string, body []byte, prepare func(*http.Request)) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, rd)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if prepare != nil {
		prepare(req)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return nil, fmt.Errorf("%s: read answer: %w", op, err)
	}
	if len(data) > maxResponse {
		return nil, fmt.Errorf("%s: answer larger than %d bytes", op, maxResponse)
	}
	if resp.StatusCode != http.StatusOK {
		e := &Error{Op: op, StatusCode: resp.StatusCode, Message: strings.TrimSpace(string(bytes.ToValidUTF8(data[:min(len(data), 512)], nil)))}
		if s := resp.Header.Get("Retry-After"); s != "" {
			if n, err := strconv.Atoi(s); err == nil && n >= 0 {
				e.RetryAfter = time.Duration(n) * time.Second
			}
		}
		return nil, e
	}
	return data, nil
}

// IsStatus reports whether err is an EST refusal with the given status.
func IsStatus(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.StatusCode == status
}
