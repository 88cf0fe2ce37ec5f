// Package est serves RFC 7030 enrollment (cacerts, simpleenroll,
// simplereenroll, csrattrs) and the CRL over HTTPS.
package est

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/gateway/authority"
	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/metrics"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/registry"
)

// Authority is what the EST service needs of the certificate authority.
type Authority interface {
	Enroll(ctx context.Context, deviceID, token string, csr *x509.CertificateRequest) (*x509.Certificate, error)
	Reenroll(ctx context.Context, peer *x509.Certificate, csr *x509.CertificateRequest) (*x509.Certificate, error)
	CACerts() []*x509.Certificate
	CRL() *authority.CRL
}

// Default per-source request rates. A factory line enrolls its devices
// from behind one NAT address, a few a second at most even when a rack of
// boards boots at once: 50 enrollments a second with bursts of 100 never
// holds a line up, and still keeps one address from spending the CA's CPU
// (a CSR check and signature) and the registry's writes. Reads (CA
// certificates, CSR attributes, the CRL that every agent polls) are cheap
// and come from whole fleets behind one address: five times looser.
var (
	DefaultEnrollRate = limit.Rate{PerSecond: 50, Burst: 100}
	DefaultReadRate   = limit.Rate{PerSecond: 250, Burst: 500}
)

// Config configures the EST handler.
type Config struct {
	Authority Authority
	Logger    *slog.Logger
	Metrics   *metrics.Metrics
	// EnrollRate limits simpleenroll and simplereenroll requests per
	// source address, ReadRate every other request but /healthz
	// (defaults DefaultEnrollRate and DefaultReadRate; limit.Off for none).
	EnrollRate limit.Rate
	ReadRate   limit.Rate
	// MaxSources bounds the source addresses tracked per rate
	// (limit.DefaultMaxSources when 0).
	MaxSources int
}

// Handler serves EST and the CRL.
type Handler struct {
	ca  Authority
	log *slog.Logger
	mux *http.ServeMux
	// caBody is the cacerts answer, computed once.
	caBody []byte

	enroll, read               *limit.Sources
	enrollLimited, readLimited prometheus.Counter
}

// NewHandler returns the EST handler.
func NewHandler(cfg Config) (*Handler, error) {
	if cfg.Authority == nil {
		return nil, errors.New("est: authority is required")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New()
	}
	cfg.EnrollRate = cfg.EnrollRate.Or(DefaultEnrollRate)
	cfg.ReadRate = cfg.ReadRate.Or(DefaultReadRate)
	for name, r := range map[string]limit.Rate{"enroll rate": cfg.EnrollRate, "read rate": cfg.ReadRate} {
		if err := r.Validate(); err != nil {
			return nil, fmt.Errorf("est: %s: %w", name, err)
		}
	}
	ca := cfg.Authority
	body, err := est.EncodeCerts(ca.CACerts()...)
	if err != nil {
		return nil, err
	}
	h := &Handler{
		ca: ca, log: log.With("component", "est"), mux: http.NewServeMux(), caBody: body,
		enroll:        limit.NewSources(cfg.EnrollRate, 0, cfg.MaxSources),
		read:          limit.NewSources(cfg.ReadRate, 0, cfg.MaxSources),
		enrollLimited: cfg.Metrics.RateLimited.WithLabelValues("est_enroll"),
		readLimited:   cfg.Metrics.RateLimited.WithLabelValues("est_read"),
	}
	h.mux.HandleFunc("GET "+est.PathCACerts, h.cacerts)
	h.mux.HandleFunc("POST "+est.PathEnroll, h.simpleenroll)
	h.mux.HandleFunc("POST "+est.PathReenroll, h.simplereenroll)
	h.mux.HandleFunc("GET "+est.PathCSRAttrs, h.csrattrs)
	h.mux.HandleFunc("GET "+est.PathCRL, h.crl)
	h.mux.HandleFunc("GET /crl.pem", h.crlPEM)
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "ok\n")
	})
	return h, nil
}

// ServeHTTP implements http.Handler: the per-source rate first, then the
// EST handlers.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	src, limited := h.read, h.readLimited
	switch r.URL.Path {
	case "/healthz":
		src = nil // load balancers poll it; it costs nothing
	case est.PathEnroll, est.PathReenroll:
		src, limited = h.enroll, h.enrollLimited
	}
	if src != nil {
		if ok, wait := src.Allow(limit.SourceOf(r.RemoteAddr), time.Now()); !ok {
			limited.Inc()
			secs := retryAfterSeconds(wait)
			w.Header().Set("Retry-After", strconv.Itoa(secs))
			h.log.Debug("request refused: rate limited", "remote", r.RemoteAddr, "path", r.URL.Path)
			httpError(w, http.StatusTooManyRequests, fmt.Sprintf("too many requests from your address; retry in %d s", secs))
			return
		}
	}
	h.mux.ServeHTTP(w, r)
}

// retryAfterSeconds rounds a wait up to whole seconds, at least one.
func retryAfterSeconds(d time.Duration) int {
	return max(1, int((d+time.Second-1)/time.Second))
}

func (h *Handler) cacerts(w http.ResponseWriter, r *http.Request) {
	writeCerts(w, h.caBody)
}

func (h *Handler) csrattrs(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", est.TypeCSRAttrs)
	w.Header().Set("Content-Transfer-Encoding", "base64")
	_, _ = w.Write(est.CSRAttrs())
}

func (h *Handler) crl(w http.ResponseWriter, r *http.Request) {
	crl := h.ca.CRL()
	w.Header().Set("Content-Type", est.TypePKIXCRL)
	w.Header().Set("Cache-Control", "max-age=60")
	_, _ = w.Write(crl.DER)
}

func (h *Handler) crlPEM(w http.ResponseWriter, r *http.Request) {
	crl := h.ca.CRL()
	w.Header().Set("Content-Type", "application/x-pem-file")
	w.Header().Set("Cache-Control", "max-age=60")
	_, _ = w.Write(pki.EncodeCRLPEM(crl.DER))
}

func (h *Handler) simpleenroll(w http.ResponseWriter, r *http.Request) {
	deviceID, token, ok := r.BasicAuth()
	if !ok {
		w.Header().Set("WWW-Authenticate", `Basic realm="fleetgate enrollment"`)
		httpError(w, http.StatusUnauthorized, "enrollment needs HTTP Basic auth: user = device ID, password = one-time token")
		return
	}
	csr, err := readCSR(w, r)
	if err != nil {
		h.fail(w, r, "simpleenroll", deviceID, err)
		return
	}
	cert, err := h.ca.Enroll(r.Context(), deviceID, token, csr)
	if err != nil {
		h.fail(w, r, "simpleenroll", deviceID, err)
		return
	}
	h.answer(w, cert)
}

func (h *Handler) simplereenroll(w http.ResponseWriter, r *http.Request) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		httpError(w, http.StatusUnauthorized, "re-enrollment needs the current device certificate as TLS client certificate")
		return
	}
	peer := r.TLS.PeerCertificates[0]
	csr, err := readCSR(w, r)
	if err != nil {
		h.fail(w, r, "simplereenroll", peer.Subject.CommonName, err)
		return
	}
	cert, err := h.ca.Reenroll(r.Context(), peer, csr)
	if err != nil {
		h.fail(w, r, "simplereenroll", peer.Subject.CommonName, err)
		return
	}
	h.answer(w, cert)
}

func (h *Handler) answer(w http.ResponseWriter, cert *x509.Certificate) {
	body, err := est.EncodeCerts(cert)
	if err != nil {
		httpError(w, http.StatusInternalServerError, "encode certificate")
		return
	}
	writeCerts(w, body)
}

func writeCerts(w http.ResponseWriter, body []byte) {
	w.Header().Set("Content-Type", est.TypeCertsOnly)
	w.Header().Set("Content-Transfer-Encoding", "base64")
	_, _ = w.Write(body)
}

// readCSR reads and decodes a request body of bounded size.
func readCSR(w http.ResponseWriter, r *http.Request) (*x509.CertificateRequest, error) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, est.MaxRequestSize))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, fmt.Errorf("%w: body larger than %d bytes", errTooLarge, est.MaxRequestSize)
		}
		return nil, fmt.Errorf("%w: read body: %v", est.ErrMalformed, err)
	}
	return est.DecodeCSR(body)
}

var errTooLarge = errors.New("request too large")

func (h *Handler) fail(w http.ResponseWriter, r *http.Request, op, who string, err error) {
	code := StatusOf(err)
	if code == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="fleetgate enrollment"`)
	}
	var ra interface{ RetryAfter() time.Duration }
	if errors.As(err, &ra) {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(ra.RetryAfter())))
	}
	msg := err.Error()
	if code >= 500 {
		h.log.Error(op+" failed", "device", who, "remote", r.RemoteAddr, "error", err)
		msg = "internal error; see the gateway log"
		if reason, ok := authority.Unavailable(err); ok {
			// The errno's text only: the error itself names files.
			msg = "registry unavailable: " + reason + "; try again later"
			w.Header().Set("Retry-After", strconv.Itoa(retryUnavailable))
		}
	} else {
		h.log.Info(op+" refused", "device", who, "remote", r.RemoteAddr, "status", code, "error", err)
	}
	httpError(w, code, msg)
}

// StatusOf maps an enrollment error to its HTTP status: the one place where
// EST errors meet HTTP.
func StatusOf(err error) int {
	switch {
	case errors.Is(err, errTooLarge):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, registry.ErrTokenInvalid), errors.Is(err, registry.ErrTokenUsed), errors.Is(err, registry.ErrTokenExpired):
		return http.StatusUnauthorized
	case errors.Is(err, registry.ErrRevoked), errors.Is(err, registry.ErrUnknownSerial),
		errors.Is(err, authority.ErrNotDevice), errors.Is(err, identity.ErrNoIdentity), errors.Is(err, identity.ErrForeignDomain):
		return http.StatusForbidden
	case errors.Is(err, est.ErrMalformed), errors.Is(err, pki.ErrBadCSR), errors.Is(err, pki.ErrKeyPolicy),
		errors.Is(err, pki.ErrSubjectMismatch), errors.Is(err, identity.ErrInvalidName), errors.Is(err, registry.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, registry.ErrConflict):
		return http.StatusConflict
	case errors.Is(err, authority.ErrLockedOut):
		return http.StatusTooManyRequests
	}
	if _, ok := authority.Unavailable(err); ok {
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// retryUnavailable is the Retry-After, in seconds, of a 503 answer.
const retryUnavailable = 30

// httpError writes a one-line plain-text reason.
func httpError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, strings.ReplaceAll(msg, "\n", " ")+"\n")
}
