// Package admin serves the operator API over mutual TLS: tokens, devices,
// revocation, service certificates, audit log, CRL and backups. Only
// operator certificates are admitted (services may read /metrics).
package admin

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/gateway/authority"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/registry"
)

// Authority is what the admin API needs of the certificate authority.
type Authority interface {
	CreateTokens(ctx context.Context, deviceIDs []string, ttl time.Duration, batch, actor string) ([]authority.TokenGrant, error)
	RevokeDevice(ctx context.Context, deviceID string, reason int, actor string) (authority.Revocation, error)
	RevokeCertificate(ctx context.Context, serial string, reason int, actor string) (registry.Revocation, error)
	IssueIdentity(ctx context.Context, id identity.Identity, csr *x509.CertificateRequest, ttl time.Duration, actor string) (*x509.Certificate, error)
	PeerIdentity(c *x509.Certificate) (identity.Identity, error)
	IsRevoked(c *x509.Certificate) bool
	IssuingCA() *x509.Certificate
	TrustDomain() string
	CRL() *authority.CRL
}

// Sessions tells whether a device has a live MQTT session.
type Sessions interface {
	Connected(deviceID string) bool
}

// Config configures the handler.
type Config struct {
	Authority Authority
	Store     registry.Store
	Sessions  Sessions
	// Metrics, when set, is served at /metrics to operators and services.
	Metrics http.Handler
	Logger  *slog.Logger
}

// Handler serves the admin API.
type Handler struct {
	cfg Config
	log *slog.Logger
	mux *http.ServeMux
}

// NewHandler returns the admin API handler.
func NewHandler(cfg Config) *Handler {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	h := &Handler{cfg: cfg, log: cfg.Logger.With("component", "admin"), mux: http.NewServeMux()}
	op := h.operatorOnly
	h.mux.Handle("POST "+adminapi.PathTokens, op(h.createTokens))
	h.mux.Handle("GET "+adminapi.PathDevices, op(h.listDevices))
	h.mux.Handle("GET "+adminapi.PathDevices+"/{id}", op(h.showDevice))
	h.mux.Handle("POST "+adminapi.PathDevices+"/{id}/revoke", op(h.revokeDevice))
	h.mux.Handle("POST "+adminapi.PathCertificates, op(h.issueCertificate))
	h.mux.Handle("POST "+adminapi.PathCertificates+"/{serial}/revoke", op(h.revokeCertificate))
	h.mux.Handle("GET "+adminapi.PathAudit, op(h.audit))
	h.mux.Handle("GET "+adminapi.PathCRL, op(h.crl))
	h.mux.Handle("GET "+adminapi.PathBackup, op(h.backup))
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "ok\n")
	})
	if cfg.Metrics != nil {
		h.mux.Handle("GET /metrics", h.roles(cfg.Metrics, identity.RoleOperator, identity.RoleService))
	}
	return h
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

type ctxKey struct{}

// caller returns the authenticated identity stored by roles.
func caller(r *http.Request) identity.Identity {
	id, _ := r.Context().Value(ctxKey{}).(identity.Identity)
	return id
}

func actor(r *http.Request) string {
	id := caller(r)
	return string(id.Role) + ":" + id.Name
}

func (h *Handler) operatorOnly(fn http.HandlerFunc) http.Handler {
	return h.roles(fn, identity.RoleOperator)
}

// roles admits only clients whose verified certificate carries one of the
// given roles.
func (h *Handler) roles(next http.Handler, allowed ...identity.Role) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			httpError(w, http.StatusUnauthorized, "the admin API needs an operator client certificate")
			return
		}
		id, err := h.cfg.Authority.PeerIdentity(r.TLS.PeerCertificates[0])
		if err != nil {
			httpError(w, http.StatusForbidden, "client certificate: "+err.Error())
			return
		}
		for _, role := range allowed {
			if id.Role == role {
				next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, id)))
				return
			}
		}
		h.log.Info("admin request refused", "identity", id.String(), "path", r.URL.Path)
		httpError(w, http.StatusForbidden, fmt.Sprintf("%s may not use %s", id, r.URL.Path))
	})
}

func (h *Handler) createTokens(w http.ResponseWriter, r *http.Request) {
	var req adminapi.TokenRequest
	if !decode(w, r, &req) {
		return
	}
	if len(req.DeviceIDs) > adminapi.MaxTokensPerRequest {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("at most %d tokens per request", adminapi.MaxTokensPerRequest))
		return
	}
	ttl, ok := parseTTL(w, req.TTL)
	if !ok {
		return
	}
	if len(req.Batch) > 128 || strings.ContainsAny(req.Batch, "\r\n") {
		httpError(w, http.StatusBadRequest, "batch label must be one line of at most 128 bytes")
		return
	}
	grants, err := h.cfg.Authority.CreateTokens(r.Context(), req.DeviceIDs, ttl, req.Batch, actor(r))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	out := adminapi.TokenResponse{Tokens: make([]adminapi.Token, len(grants))}
	for i, g := range grants {
		out.Tokens[i] = adminapi.Token{DeviceID: g.DeviceID, Token: g.Token, ExpiresAt: g.ExpiresAt}
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusCreated, out)
}

func (h *Handler) apiDevice(ctx context.Context, d registry.Device) adminapi.Device {
	out := adminapi.Device{
		ID:            d.ID,
		Status:        string(d.Status),
		CurrentSerial: d.CurrentSerial,
		EnrolledAt:    d.EnrolledAt,
		RenewedAt:     d.RenewedAt,
		LastSeen:      d.LastSeen,
		RevokedAt:     d.RevokedAt,
	}
	if d.Status == registry.StatusRevoked {
		out.RevocationReason = pki.ReasonName(d.RevocationReason)
	}
	if h.cfg.Sessions != nil {
		out.Connected = h.cfg.Sessions.Connected(d.ID)
	}
	return out
}

func (h *Handler) listDevices(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := registry.DeviceFilter{
		Status: registry.DeviceStatus(q.Get("status")),
		Prefix: q.Get("prefix"),
		After:  q.Get("after"),
		Limit:  1000,
	}
	switch f.Status {
	case "", registry.StatusActive, registry.StatusRevoked:
	default:
		httpError(w, http.StatusBadRequest, fmt.Sprintf("status %q: want active or revoked", f.Status))
		return
	}
	limit, ok := queryLimit(w, q, f.Limit)
	if !ok {
		return
	}
	f.Limit = limit
	devs, err := h.cfg.Store.Devices(r.Context(), f)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	out := adminapi.DeviceList{Devices: make([]adminapi.Device, 0, len(devs))}
	for _, d := range devs {
		ad := h.apiDevice(r.Context(), d)
		if c, err := h.cfg.Store.Certificate(r.Context(), d.CurrentSerial); err == nil {
			ad.CertNotAfter = c.NotAfter
		}
		out.Devices = append(out.Devices, ad)
	}
	if len(devs) == f.Limit {
		out.Next = devs[len(devs)-1].ID
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) showDevice(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	d, err := h.cfg.Store.Device(r.Context(), id)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	out := adminapi.DeviceDetail{Device: h.apiDevice(r.Context(), d), Certificates: []adminapi.Certificate{}}
	for _, serial := range d.Serials {
		c, err := h.cfg.Store.Certificate(r.Context(), serial)
		if err != nil {
			h.fail(w, r, err)
			return
		}
		if serial == d.CurrentSerial {
			out.CertNotAfter = c.NotAfter
		}
		out.Certificates = append(out.Certificates, adminapi.Certificate{
			Serial: c.Serial, Subject: c.Subject, NotBefore: c.NotBefore, NotAfter: c.NotAfter,
			Revoked: h.isRevokedSerial(c),
		})
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) isRevokedSerial(c registry.Certificate) bool {
	cert, err := x509.ParseCertificate(c.DER)
	if err != nil {
		return false
	}
	return h.cfg.Authority.IsRevoked(cert)
}

func (h *Handler) revokeDevice(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var req adminapi.RevokeRequest
	if !decode(w, r, &req) {
		return
	}
	reason, err := pki.ParseReason(req.Reason)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	id := r.PathValue("id")
	res, err := h.cfg.Authority.RevokeDevice(r.Context(), id, reason, actor(r))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	out := adminapi.RevokeResponse{
		Device:         h.apiDevice(r.Context(), res.Device),
		RevokedSerials: []string{},
		AlreadyRevoked: res.AlreadyRevoked,
		Disconnected:   res.Disconnected,
		CRLNumber:      res.CRLNumber,
	}
	for _, rv := range res.Revocations {
		out.RevokedSerials = append(out.RevokedSerials, rv.Serial)
	}
	h.log.Info("revoke request served", "device", id, "actor", actor(r), "took", time.Since(start))
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) issueCertificate(w http.ResponseWriter, r *http.Request) {
	var req adminapi.CertificateRequest
	if !decode(w, r, &req) {
		return
	}
	role := identity.Role(req.Role)
	if role != identity.RoleService && role != identity.RoleOperator {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("role %q: want service or operator", req.Role))
		return
	}
	ttl, ok := parseTTL(w, req.TTL)
	if !ok {
		return
	}
	csr, err := est.DecodeCSR([]byte(req.CSR))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	id := identity.Identity{TrustDomain: h.cfg.Authority.TrustDomain(), Role: role, Name: req.Name}
	cert, err := h.cfg.Authority.IssueIdentity(r.Context(), id, csr, ttl, actor(r))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	chain := pki.EncodeCertsPEM(cert, h.cfg.Authority.IssuingCA())
	writeJSON(w, http.StatusCreated, adminapi.CertificateResponse{Serial: pki.SerialHex(cert), Chain: string(chain), NotAfter: cert.NotAfter})
}

func (h *Handler) revokeCertificate(w http.ResponseWriter, r *http.Request) {
	var req adminapi.RevokeRequest
	if !decode(w, r, &req) {
		return
	}
	reason, err := pki.ParseReason(req.Reason)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	serial := strings.ToLower(strings.TrimLeft(strings.ReplaceAll(r.PathValue("serial"), ":", ""), "0"))
	rev, err := h.cfg.Authority.RevokeCertificate(r.Context(), serial, reason, actor(r))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.Certificate{Serial: rev.Serial, Subject: rev.Subject, NotAfter: rev.NotAfter, Revoked: true})
}

func (h *Handler) audit(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := registry.AuditFilter{DeviceID: q.Get("device"), Limit: 1000}
	if s := q.Get("after"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			httpError(w, http.StatusBadRequest, "after must be a sequence number")
			return
		}
		f.AfterSeq = n
	}
	limit, ok := queryLimit(w, q, f.Limit)
	if !ok {
		return
	}
	f.Limit = limit
	evs, err := h.cfg.Store.Audit(r.Context(), f)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	out := adminapi.AuditList{Events: make([]adminapi.AuditEvent, 0, len(evs))}
	for _, e := range evs {
		out.Events = append(out.Events, adminapi.AuditEvent{Seq: e.Seq, Time: e.Time, Actor: e.Actor, Action: e.Action, DeviceID: e.DeviceID, Serial: e.Serial, Detail: e.Detail})
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) crl(w http.ResponseWriter, r *http.Request) {
	crl := h.cfg.Authority.CRL()
	if strings.Contains(r.Header.Get("Accept"), "pem") {
		w.Header().Set("Content-Type", "application/x-pem-file")
		_, _ = w.Write(pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: crl.DER}))
		return
	}
	w.Header().Set("Content-Type", est.TypePKIXCRL)
	_, _ = w.Write(crl.DER)
}

func (h *Handler) backup(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="registry.db"`)
	n, err := h.cfg.Store.Backup(r.Context(), w)
	if err != nil {
		h.log.Error("backup failed", "error", err, "written", n)
		if n == 0 {
			h.fail(w, r, err)
			return
		}
		// The status line is gone: abort the connection so the client
		// sees a broken transfer, never a short file that looks complete.
		panic(http.ErrAbortHandler)
	}
	h.log.Info("backup served", "bytes", n, "actor", actor(r))
}

// queryLimit reads the optional limit parameter (1 to 10000), answering 400
// itself when it is malformed.
func queryLimit(w http.ResponseWriter, q url.Values, def int) (int, bool) {
	s := q.Get("limit")
	if s == "" {
		return def, true
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 || n > 10000 {
		httpError(w, http.StatusBadRequest, "limit must be 1 to 10000")
		return 0, false
	}
	return n, true
}

// parseTTL reads an optional positive duration; zero means the default.
func parseTTL(w http.ResponseWriter, s string) (time.Duration, bool) {
	if s == "" {
		return 0, true
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("ttl %q is not a positive duration", s))
		return 0, false
	}
	return d, true
}

// decode reads a JSON body of bounded size, refusing unknown fields.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, adminapi.MaxBodySize))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			httpError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body larger than %d bytes", adminapi.MaxBodySize))
			return false
		}
		if errors.Is(err, io.EOF) {
			httpError(w, http.StatusBadRequest, "empty body: a JSON object is required")
			return false
		}
		httpError(w, http.StatusBadRequest, "malformed JSON: "+err.Error())
		return false
	}
	if dec.More() {
		httpError(w, http.StatusBadRequest, "malformed JSON: trailing data after the object")
		return false
	}
	return true
}

func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	code := StatusOf(err)
	msg := err.Error()
	if code >= 500 {
		h.log.Error("admin request failed", "path", r.URL.Path, "error", err)
		msg = "internal error; see the gateway log"
		if reason, ok := authority.Unavailable(err); ok {
			// The errno's text only: the error itself names files.
			msg = "registry unavailable: " + reason + "; try again later"
			w.Header().Set("Retry-After", "30")
		}
	}
	httpError(w, code, msg)
}

// StatusOf maps an error to the admin API's HTTP status.
func StatusOf(err error) int {
	switch {
	case errors.Is(err, registry.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, registry.ErrConflict), errors.Is(err, registry.ErrRevoked):
		return http.StatusConflict
	case errors.Is(err, registry.ErrInvalid), errors.Is(err, est.ErrMalformed), errors.Is(err, pki.ErrBadCSR),
		errors.Is(err, pki.ErrKeyPolicy), errors.Is(err, pki.ErrSubjectMismatch), errors.Is(err, identity.ErrInvalidName),
		errors.Is(err, identity.ErrNoIdentity):
		return http.StatusBadRequest
	}
	// A full, failing or read-only disk, a closed registry.
	if _, ok := authority.Unavailable(err); ok {
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func httpError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, strings.ReplaceAll(msg, "\n", " ")+"\n")
}
