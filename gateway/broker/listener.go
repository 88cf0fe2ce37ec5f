package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/gateway/metrics"
)

// tlsListener accepts TCP connections, gives each a deadline for the TLS
// handshake and the CONNECT packet (mochi sets none before CONNECT: an idle
// socket would stay open forever) and wraps it in TLS. The handshake runs on
// the connection's own goroutine at its first read, and its failures are
// counted by reason.
type tlsListener struct {
	net.Listener
	conf    *tls.Config
	timeout time.Duration
	log     *slog.Logger
	m       *metrics.Metrics
}

// Accept implements net.Listener. Transient errors (out of file
// descriptors) are retried with a pause instead of being returned: mochi
// stops serving a listener on the first Accept error.
func (l *tlsListener) Accept() (net.Conn, error) {
	var pause time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil, err
			}
			if pause == 0 {
				pause = 5 * time.Millisecond
			} else if pause < time.Second {
				pause *= 2
			}
			l.log.Warn("accept failed; retrying", "error", err, "pause", pause)
			time.Sleep(pause)
			continue
		}
		_ = c.SetDeadline(time.Now().Add(l.timeout))
		return &tlsConn{Conn: tls.Server(c, l.conf), timeout: l.timeout, m: l.m}, nil
	}
}

// tlsConn performs the handshake explicitly on first read so its failure
// can be classified.
type tlsConn struct {
	*tls.Conn
	timeout time.Duration
	m       *metrics.Metrics
	done    bool // only the reading goroutine touches it
}

func (c *tlsConn) Read(b []byte) (int, error) {
	if !c.done {
		ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
		err := c.Conn.HandshakeContext(ctx)
		cancel()
		if err != nil {
			c.m.HandshakeFailures.WithLabelValues(HandshakeFailureReason(err)).Inc()
			return 0, err
		}
		c.done = true
	}
	return c.Conn.Read(b)
}

// HandshakeFailureReason classifies a server-side TLS handshake error for
// metrics and logs.
func HandshakeFailureReason(err error) string {
	var (
		certErr    *tls.CertificateVerificationError
		invalidErr x509.CertificateInvalidError
		unknownCA  x509.UnknownAuthorityError
		netErr     net.Error
		recordErr  tls.RecordHeaderError
	)
	msg := err.Error()
	switch {
	case errors.As(err, &invalidErr) && invalidErr.Reason == x509.Expired:
		return "expired"
	case errors.As(err, &unknownCA):
		return "unknown_ca"
	case strings.Contains(msg, "certificate revoked"):
		return "revoked"
	case strings.Contains(msg, "didn't provide a certificate"):
		return "no_client_cert"
	case errors.As(err, &certErr), errors.As(err, &invalidErr):
		return "bad_certificate"
	case strings.Contains(msg, "fleetgate identity"), strings.Contains(msg, "trust domain"):
		return "no_identity"
	case strings.Contains(msg, "unsupported versions"), strings.Contains(msg, "protocol version"):
		return "protocol_version"
	case errors.As(err, &recordErr):
		return "not_tls"
	case errors.As(err, &netErr) && netErr.Timeout(), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, net.ErrClosed), strings.Contains(msg, "EOF"), strings.Contains(msg, "connection reset"):
		return "closed"
	default:
		return "other"
	}
}
