package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"time"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
)

// gateway is the admin API client of one invocation: every request gets
// the --timeout deadline and transport failures come back as one clear
// sentence naming the URL and the flag that fixes them.
type gateway struct {
	api      *adminapi.Client
	url      string
	timeout  time.Duration
	certFile string
	caFile   string
}

// gateway connects to --gateway with the operator certificate.
func (a *app) gateway() (*gateway, error) {
	u, err := baseURL(a.gatewayURL)
	if err != nil {
		return nil, err
	}
	tlsConf, err := adminapi.ClientTLS(a.certFile, a.keyFile, a.caFile)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w (run 'provisioning init --data-dir %s' first, or point --data-dir or --cert, --key and --ca at an operator certificate)", err, a.dataDir)
		}
		return nil, fmt.Errorf("operator credentials: %w", err)
	}
	api := adminapi.NewClient(u, tlsConf)
	// --timeout bounds each request through its context; the client's own
	// overall limit would otherwise cut long backups.
	api.HTTP.Timeout = 0
	return &gateway{api: api, url: u, timeout: a.timeout, certFile: a.certFile, caFile: a.caFile}, nil
}

// call runs one admin API request under the --timeout deadline.
func call[T any](ctx context.Context, g *gateway, what string, fn func(context.Context) (T, error)) (T, error) {
	rctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	out, err := fn(rctx)
	if err != nil {
		return out, g.explain(ctx, what, err)
	}
	return out, nil
}

// CreateTokens implements tokenMinter.
func (g *gateway) CreateTokens(ctx context.Context, req adminapi.TokenRequest) (adminapi.TokenResponse, error) {
	return call(ctx, g, "mint tokens", func(ctx context.Context) (adminapi.TokenResponse, error) {
		return g.api.CreateTokens(ctx, req)
	})
}

// gatewayError is a transport failure told in words, keeping the cause
// for errors.Is and errors.As.
type gatewayError struct {
	msg string
	err error
}

func (e *gatewayError) Error() string { return e.msg }
func (e *gatewayError) Unwrap() error { return e.err }

// explain rewrites transport failures (refused connection, unknown host,
// TLS trouble, deadline) into one sentence with a hint. Refusals by the
// API itself keep the gateway's own reason.
func (g *gateway) explain(ctx context.Context, what string, err error) error {
	var apiErr *adminapi.Error
	if errors.As(err, &apiErr) {
		return fmt.Errorf("%s: %w", what, err)
	}
	if ctx.Err() != nil {
		return interrupted(ctx, err)
	}
	if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		return &gatewayError{msg: fmt.Sprintf("%s: the gateway admin API at %s did not answer within %v (raise --timeout, or check --gateway)", what, g.url, g.timeout), err: err}
	}
	if reason, ok := dialFailure(err); ok {
		return &gatewayError{msg: fmt.Sprintf("cannot reach the gateway admin API at %s: %s (is the gateway running? point --gateway or $FLEETGATE_GATEWAY at it)", g.url, reason), err: err}
	}
	if reason, hint, ok := g.tlsFailure(err); ok {
		return &gatewayError{msg: fmt.Sprintf("TLS with the gateway admin API at %s failed: %s (%s)", g.url, reason, hint), err: err}
	}
	return fmt.Errorf("%s: %w", what, err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// dialFailure reports whether err is a failure to open the TCP connection
// and a short reason ("connection refused", "no such host").
func dialFailure(err error) (string, bool) {
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return fmt.Sprintf("host %s: %s", dnsErr.Name, dnsErr.Err), true
	}
	var opErr *net.OpError
	if !errors.As(err, &opErr) || opErr.Op != "dial" {
		return "", false
	}
	var sysErr *os.SyscallError
	if errors.As(opErr.Err, &sysErr) {
		return sysErr.Err.Error(), true
	}
	return opErr.Err.Error(), true
}

// tlsFailure reports whether err is a failed TLS handshake, why, and
// which flags to check.
func (g *gateway) tlsFailure(err error) (reason, hint string, ok bool) {
	var (
		unknownCA x509.UnknownAuthorityError
		hostErr   x509.HostnameError
		invalid   x509.CertificateInvalidError
		recordErr tls.RecordHeaderError
		alertErr  tls.AlertError
		opErr     *net.OpError
	)
	switch {
	case errors.As(err, &unknownCA):
		return "its certificate does not chain to the CA bundle " + g.caFile, "check --ca", true
	case errors.As(err, &hostErr):
		return hostErr.Error(), "use a --gateway host named in the server certificate (provisioning init --hosts)", true
	case errors.As(err, &invalid):
		return "its certificate: " + invalid.Error(), "check the gateway's server certificate", true
	case errors.As(err, &recordErr):
		return "the server does not speak TLS", "check that --gateway names the admin listener", true
	case errors.As(err, &alertErr):
		return fmt.Sprintf("it refused the operator certificate %s: %v", g.certFile, alertErr), "check --cert and --key", true
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		return fmt.Sprintf("it refused the operator certificate %s: %v", g.certFile, opErr.Err), "check --cert and --key", true
	}
	return "", "", false
}
