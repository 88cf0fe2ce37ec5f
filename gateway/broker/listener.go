package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"strings"
)

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
