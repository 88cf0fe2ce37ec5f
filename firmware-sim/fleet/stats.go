package fleet

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/fleetgate/fleetgate/firmware-sim/mqttc"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
)

// Stats are the live counters and latency histograms of a fleet. Every
// field is safe for concurrent use.
type Stats struct {
	Enrolled   atomic.Int64 // devices holding a certificate
	Connected  atomic.Int64 // live MQTT sessions now
	Connects   atomic.Int64 // successful connects, reconnects included
	Published  atomic.Int64 // messages written (QoS 0) or acknowledged (QoS 1)
	PubErrors  atomic.Int64 // publishes that failed
	Received   atomic.Int64 // telemetry messages the subscriber got
	Lost       atomic.Int64 // connections that ended without this side closing them
	Reconnects atomic.Int64

	Enroll    Histogram // EST simpleenroll round trip
	Connect   Histogram // dial + TLS handshake + CONNECT/CONNACK
	Reconnect Histogram // from a lost connection to the next session
	Delivery  Histogram // publish → receive at the subscriber
	Revoke    Histogram // revoke request start → device saw the close

	mu     sync.Mutex
	errors map[string]int64
}

// NewStats returns empty stats.
func NewStats() *Stats { return &Stats{errors: map[string]int64{}} }

// Error counts a failure under its reason (see Reason).
func (s *Stats) Error(op string, err error) {
	s.mu.Lock()
	s.errors[op+": "+Reason(err)]++
	s.mu.Unlock()
}

// Errors returns a copy of the error counts by reason.
func (s *Stats) Errors() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int64, len(s.errors))
	for k, v := range s.errors {
		out[k] = v
	}
	return out
}

// ErrorTotal is the number of errors counted.
func (s *Stats) ErrorTotal() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, v := range s.errors {
		n += v
	}
	return n
}

// Reason names the cause of a failure in a few words, so errors of ten
// thousand devices group into a short table.
func Reason(err error) string {
	if err == nil {
		return "ok"
	}
	var (
		connack *mqttc.ConnackError
		estErr  *est.Error
		apiErr  *adminapi.Error
		alert   tls.AlertError
		errno   syscall.Errno
		netErr  net.Error
	)
	msg := err.Error()
	switch {
	case errors.As(err, &connack):
		return fmt.Sprintf("CONNACK 0x%02x", connack.Code)
	case errors.As(err, &estErr):
		return fmt.Sprintf("EST %d", estErr.StatusCode)
	case errors.As(err, &apiErr):
		return fmt.Sprintf("admin API %d", apiErr.StatusCode)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, mqttc.ErrKeepalive):
		return "keepalive timeout"
	case errors.Is(err, mqttc.ErrProtocol):
		return "protocol error"
	case errors.Is(err, mqttc.ErrClosed):
		return "closed locally"
	case errors.As(err, &alert), strings.Contains(msg, "remote error: tls:"):
		if i := strings.Index(msg, "remote error: tls: "); i >= 0 {
			return "TLS alert: " + msg[i+len("remote error: tls: "):]
		}
		return "TLS alert " + alert.Error()
	case errors.Is(err, mqttc.ErrNoConnack):
		if errors.Is(err, syscall.ECONNRESET) {
			return "reset before CONNACK"
		}
		return "closed before CONNACK"
	case errors.As(err, &errno):
		switch errno {
		case syscall.ECONNREFUSED:
			return "connection refused"
		case syscall.ECONNRESET, syscall.EPIPE:
			return "connection reset"
		case syscall.EMFILE, syscall.ENFILE:
			return "out of file descriptors"
		case syscall.EADDRNOTAVAIL, syscall.EADDRINUSE:
			return "out of source ports"
		}
		return errno.Error()
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed by server"
	case errors.Is(err, os.ErrDeadlineExceeded):
		return "timeout"
	case strings.Contains(msg, "tls:"):
		return "TLS error"
	default:
		if len(msg) > 60 {
			msg = msg[:60] + "…"
		}
		return msg
	}
}

// Refused reports whether a connect error is the server refusing the
// device (a TLS alert about its certificate or a CONNACK refusal) rather
// than the network or the server failing. See also Denied.
func Refused(err error) bool {
	if err == nil {
		return false
	}
	var connack *mqttc.ConnackError
	if errors.As(err, &connack) {
		return true
	}
	msg := err.Error()
	for _, s := range []string{"bad certificate", "certificate revoked", "unknown certificate", "certificate required", "unknown certificate authority"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// Denied reports whether a connect error means the server gave the device
// no session after the TLS handshake: a refusal (Refused) or a connection
// closed before CONNACK, which is how a TLS 1.3 server's rejection of the
// client certificate usually reaches a client that already sent CONNECT.
func Denied(err error) bool {
	return Refused(err) || errors.Is(err, mqttc.ErrNoConnack)
}
