// Package authority is the gateway's certificate authority service: it
// enrolls and renews devices, issues service and operator certificates,
// revokes, keeps the in-memory revocation set the TLS handshakes consult and
// signs the CRL. It knows nothing of HTTP or MQTT; the transports call it.
package authority

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetgate/fleetgate/gateway/metrics"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/registry"
)

// Errors of the authority itself; registry and pki errors pass through
// wrapped.
var (
	// ErrCertRevoked is returned by VerifyConnection for a revoked serial.
	ErrCertRevoked = errors.New("certificate revoked")
	// ErrNotDevice: a device-only operation was attempted with another identity.
	ErrNotDevice = errors.New("not a device certificate")
)

// Defaults.
const (
	DefaultTokenTTL    = 24 * time.Hour
	MaxTokenTTL        = 90 * 24 * time.Hour
	DefaultCRLValidity = 24 * time.Hour
)

// Config configures an Authority.
type Config struct {
	Issuer *pki.Issuer
	Store  registry.Store
	// DeviceTTL is the lifetime of device certificates.
	DeviceTTL time.Duration
	// TokenTTL is the default lifetime of enrollment tokens.
	TokenTTL time.Duration
	// IdentityTTL is the default lifetime of service and operator certificates.
	IdentityTTL time.Duration
	// CRLValidity is the span between a CRL's thisUpdate and nextUpdate; the
	// CRL is re-signed at half of it.
	CRLValidity time.Duration
	// CRLFile, when set, receives every new CRL in PEM.
	CRLFile string
	// LockoutFailures bad tokens for one device ID within LockoutWindow
	// lock that ID out of enrollment for LockoutWindow, right token or not
	// (defaults DefaultLockoutFailures and DefaultLockoutWindow; a negative
	// LockoutFailures turns the lockout off).
	LockoutFailures int
	LockoutWindow   time.Duration
	Logger          *slog.Logger
	Metrics         *metrics.Metrics
	// Now overrides the clock (tests).
	Now func() time.Time
}

// Authority issues and revokes. It is safe for concurrent use.
type Authority struct {
	cfg   Config
	log   *slog.Logger
	m     *metrics.Metrics
	store registry.Store

	// revoked is the set of revoked serials (hex), replaced whole on each
	// revocation so handshakes read it without a lock.
	revoked atomic.Pointer[map[string]struct{}]
	crl     atomic.Pointer[CRL]

	// setMu serializes updates of the revoked set (copy-on-write); crlMu
	// serializes CRL signing, so CRL numbers and contents move forward
	// together. Neither is held across a registry commit of a revocation,
	// so concurrent revocations cut their sessions without waiting for
	// each other's CRL.
	setMu sync.Mutex
	crlMu sync.Mutex

	listenersMu sync.Mutex
	listeners   []func(deviceID string) bool

	seen seenTracker

	lock *lockouts
	// lockAudit bounds the audit events lockouts write, the only registry
	// writes an unauthenticated client can cause: a flood of bad tokens for
	// random IDs would otherwise grow the audit log without bound.
	lockAudit *rate.Limiter
}

// ActionEnrollLockout is the audit action of an enrollment lockout.
const ActionEnrollLockout = "device.enroll_lockout"

// CRL is a signed revocation list.
type CRL struct {
	DER        []byte
	Number     uint64
	ThisUpdate time.Time
	NextUpdate time.Time
}

// New loads the revocations from the store and signs a first CRL.
func New(ctx context.Context, cfg Config) (*Authority, error) {
	if cfg.Issuer == nil || cfg.Store == nil {
		return nil, errors.New("authority: issuer and store are required")
	}
	if cfg.DeviceTTL <= 0 {
		cfg.DeviceTTL = pki.DefaultDeviceValidity
	}
	if cfg.TokenTTL <= 0 {
		cfg.TokenTTL = DefaultTokenTTL
	}
	if cfg.IdentityTTL <= 0 {
		cfg.IdentityTTL = pki.DefaultIdentityValidity
	}
	if cfg.CRLValidity <= 0 {
		cfg.CRLValidity = DefaultCRLValidity
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.LockoutFailures == 0 {
		cfg.LockoutFailures = DefaultLockoutFailures
	}
	if cfg.LockoutWindow <= 0 {
		cfg.LockoutWindow = DefaultLockoutWindow
	}
	a := &Authority{cfg: cfg, log: cfg.Logger.With("component", "authority"), m: cfg.Metrics, store: cfg.Store,
		lock:      newLockouts(cfg.LockoutFailures, cfg.LockoutWindow, DefaultMaxTracked),
		lockAudit: rate.NewLimiter(rate.Every(10*time.Second), 20),
	}
	revs, err := cfg.Store.Revocations(ctx)
	if err != nil {
		return nil, fmt.Errorf("load revocations: %w", err)
	}
	set := make(map[string]struct{}, len(revs))
	for _, r := range revs {
		set[r.Serial] = struct{}{}
	}
	a.revoked.Store(&set)
	a.m.RevokedSerials.Set(float64(len(set)))
	a.crlMu.Lock()
	err = a.signCRL(ctx, revs)
	a.crlMu.Unlock()
	if err != nil {
		return nil, err
	}
	return a, nil
}

// TrustDomain of the fleet.
func (a *Authority) TrustDomain() string { return a.cfg.Issuer.TrustDomain }

// IssuingCA returns the issuing CA certificate.
func (a *Authority) IssuingCA() *x509.Certificate { return a.cfg.Issuer.CA.Cert }

// CACerts returns the issuing CA and the certificates above it.
func (a *Authority) CACerts() []*x509.Certificate {
	return append([]*x509.Certificate{a.cfg.Issuer.CA.Cert}, a.cfg.Issuer.CA.Chain...)
}

// ClientCAs is the pool client certificates must chain to: the issuing CA
// alone, so certificates of another CA under the same root, or of a
// foreign CA, are refused.
func (a *Authority) ClientCAs() *x509.CertPool {
	return pki.NewPool(a.cfg.Issuer.CA.Cert)
}

// OnRevoke registers fn to be called with each revoked device's ID right
// after the revocation is committed and enforced in handshakes; fn reports
// whether it closed a live session.
func (a *Authority) OnRevoke(fn func(deviceID string) bool) {
	a.listenersMu.Lock()
	a.listeners = append(a.listeners, fn)
	a.listenersMu.Unlock()
}

// IsRevoked reports whether the certificate's serial is revoked.
func (a *Authority) IsRevoked(c *x509.Certificate) bool {
	_, ok := (*a.revoked.Load())[pki.SerialHex(c)]
	return ok
}

// VerifyConnection is a tls.Config.VerifyConnection that refuses revoked
// client certificates during the handshake, resumed sessions included.
// Connections without a client certificate pass (the listener's ClientAuth
// decides whether one is required).
func (a *Authority) VerifyConnection(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return nil
	}
	if a.IsRevoked(cs.PeerCertificates[0]) {
		return ErrCertRevoked
	}
	return nil
}

func (a *Authority) now() time.Time { return a.cfg.Now() }

// PeerIdentity maps a verified client certificate to its identity.
func (a *Authority) PeerIdentity(c *x509.Certificate) (identity.Identity, error) {
	return identity.FromCertificate(c, a.TrustDomain())
}

func certRecord(c *x509.Certificate, deviceID string) registry.Certificate {
	subject := ""
	if len(c.URIs) == 1 {
		subject = c.URIs[0].String()
	}
	return registry.Certificate{
		Serial:    pki.SerialHex(c),
		Subject:   subject,
		DeviceID:  deviceID,
		NotBefore: c.NotBefore,
		NotAfter:  c.NotAfter,
		DER:       c.Raw,
	}
}

// Enroll trades a one-time token and a CSR for a device certificate. The
// token is checked before any signing work, and consumed in the same
// registry transaction that records the device and certificate.
//
// The registry never holds tokens, only their SHA-256 hashes, and finds a
// token by its hash: the lookup's timing can tell a caller at most about
// the hash of its own guess, never about a stored token, and the stored
// hash is then compared in constant time (registry.HashEqual). Repeated
// bad tokens for one device ID lock it out for a while (ErrLockedOut).
func (a *Authority) Enroll(ctx context.Context, deviceID, token string, csr *x509.CertificateRequest) (*x509.Certificate, error) {
	start := time.Now()
	cert, err := a.enroll(ctx, deviceID, token, csr)
	a.m.Enrollments.WithLabelValues(resultLabel(err)).Inc()
	if errors.Is(err, registry.ErrTokenInvalid) && identity.ValidateName(deviceID) == nil {
		a.enrollFailed(deviceID)
	}
	if err != nil {
		return nil, err
	}
	a.lock.clear(deviceID)
	a.m.EnrollDuration.Observe(time.Since(start).Seconds())
	a.log.Info("device enrolled", "device", deviceID, "serial", pki.SerialHex(cert), "not_after", cert.NotAfter)
	return cert, nil
}

func (a *Authority) enroll(ctx context.Context, deviceID, token string, csr *x509.CertificateRequest) (*x509.Certificate, error) {
	if err := identity.ValidateName(deviceID); err != nil {
		return nil, fmt.Errorf("%w: device ID: %v", registry.ErrTokenInvalid, err)
	}
	now := a.now()
	if err := a.lock.check(deviceID, now); err != nil {
		return nil, err
	}
	if token == "" {
		return nil, fmt.Errorf("%w: empty token", registry.ErrTokenInvalid)
	}
	hash := registry.HashToken(token)
	if err := a.store.CheckToken(ctx, deviceID, hash, now); err != nil {
		return nil, err
	}
	cert, err := a.cfg.Issuer.IssueDevice(csr, deviceID, a.cfg.DeviceTTL)
	if err != nil {
		return nil, err
	}
	if _, err := a.store.Enroll(ctx, registry.Enrollment{DeviceID: deviceID, TokenHash: hash, Cert: certRecord(cert, deviceID), Time: now}); err != nil {
		return nil, err
	}
	return cert, nil
}

// enrollFailed counts a bad token for deviceID; the attempt that starts a
// lockout is logged and audited. The audit write runs on its own short
// context: the lockout stands even if the client has gone.
func (a *Authority) enrollFailed(deviceID string) {
	until, started := a.lock.fail(deviceID, a.now())
	if !started {
		return
	}
	a.m.EnrollLockouts.Inc()
	detail := fmt.Sprintf("%d bad enrollment tokens within %s; enrollment refused until %s",
		a.cfg.LockoutFailures, shortDuration(a.cfg.LockoutWindow), until.UTC().Format(time.RFC3339))
	a.log.Warn("enrollment locked out", "device", deviceID, "until", until, "failures", a.cfg.LockoutFailures, "window", a.cfg.LockoutWindow)
	if !a.lockAudit.Allow() {
		a.log.Warn("lockout not audited: too many lockouts", "device", deviceID)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ev := registry.AuditEvent{Time: a.now(), Actor: "gateway", Action: ActionEnrollLockout, DeviceID: deviceID, Detail: detail}
	if err := a.store.AppendAudit(ctx, ev); err != nil {
		a.log.Warn("audit lockout", "device", deviceID, "error", err)
	}
}

// shortDuration drops zero minutes and seconds: "15m", not "15m0s".
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// Reenroll renews the certificate of the device that authenticated with
// peer (verified by TLS). The CSR must ask for the same identity; its key
// may be new.
func (a *Authority) Reenroll(ctx context.Context, peer *x509.Certificate, csr *x509.CertificateRequest) (*x509.Certificate, error) {
	start := time.Now()
	cert, err := a.reenroll(ctx, peer, csr)
	a.m.Renewals.WithLabelValues(resultLabel(err)).Inc()
	if err != nil {
		return nil, err
	}
	a.m.EnrollDuration.Observe(time.Since(start).Seconds())
	a.log.Info("device renewed", "device", cert.Subject.CommonName, "old_serial", pki.SerialHex(peer), "serial", pki.SerialHex(cert), "not_after", cert.NotAfter)
	return cert, nil
}

func (a *Authority) reenroll(ctx context.Context, peer *x509.Certificate, csr *x509.CertificateRequest) (*x509.Certificate, error) {
	id, err := a.PeerIdentity(peer)
	if err != nil {
		return nil, err
	}
	if id.Role != identity.RoleDevice {
		return nil, fmt.Errorf("%w: %s", ErrNotDevice, id)
	}
	if a.IsRevoked(peer) {
		return nil, fmt.Errorf("device %s: %w", id.Name, registry.ErrRevoked)
	}
	cert, err := a.cfg.Issuer.IssueDevice(csr, id.Name, a.cfg.DeviceTTL)
	if err != nil {
		return nil, err
	}
	if _, err := a.store.Renew(ctx, registry.Renewal{DeviceID: id.Name, OldSerial: pki.SerialHex(peer), Cert: certRecord(cert, id.Name), Time: a.now()}); err != nil {
		return nil, err
	}
	return cert, nil
}

// resultLabel names an enrollment outcome for metrics.
func resultLabel(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, registry.ErrTokenInvalid):
		return "invalid_token"
	case errors.Is(err, registry.ErrTokenUsed):
		return "token_used"
	case errors.Is(err, registry.ErrTokenExpired):
		return "token_expired"
	case errors.Is(err, registry.ErrRevoked):
		return "revoked"
	case errors.Is(err, ErrLockedOut):
		return "locked_out"
	case errors.Is(err, pki.ErrBadCSR), errors.Is(err, pki.ErrKeyPolicy), errors.Is(err, pki.ErrSubjectMismatch):
		return "bad_csr"
	case errors.Is(err, registry.ErrUnknownSerial), errors.Is(err, ErrNotDevice), errors.Is(err, identity.ErrNoIdentity):
		return "not_authorized"
	default:
		if _, ok := Unavailable(err); ok {
			return "registry_unavailable"
		}
		return "error"
	}
}

// TokenGrant is a freshly minted token.
type TokenGrant struct {
	DeviceID  string
	Token     string
	ExpiresAt time.Time
}

// CreateTokens mints one token per device ID, valid for ttl (the default
// when zero), all or nothing.
func (a *Authority) CreateTokens(ctx context.Context, deviceIDs []string, ttl time.Duration, batch, actor string) ([]TokenGrant, error) {
	if ttl <= 0 {
		ttl = a.cfg.TokenTTL
	}
	if ttl > MaxTokenTTL {
		return nil, fmt.Errorf("%w: token TTL %v exceeds %v", registry.ErrInvalid, ttl, MaxTokenTTL)
	}
	if len(deviceIDs) == 0 {
		return nil, fmt.Errorf("%w: no device IDs", registry.ErrInvalid)
	}
	now := a.now()
	seen := make(map[string]bool, len(deviceIDs))
	grants := make([]TokenGrant, 0, len(deviceIDs))
	toks := make([]registry.Token, 0, len(deviceIDs))
	for _, id := range deviceIDs {
		if err := identity.ValidateName(id); err != nil {
			return nil, fmt.Errorf("%w: device ID: %v", registry.ErrInvalid, err)
		}
		if seen[id] {
			return nil, fmt.Errorf("%w: device %s listed twice", registry.ErrInvalid, id)
		}
		seen[id] = true
		tok, hash, err := registry.NewToken()
		if err != nil {
			return nil, fmt.Errorf("mint token: %w", err)
		}
		grants = append(grants, TokenGrant{DeviceID: id, Token: tok, ExpiresAt: now.Add(ttl)})
		toks = append(toks, registry.Token{Hash: hash, DeviceID: id, Batch: batch, CreatedAt: now, ExpiresAt: now.Add(ttl)})
	}
	if err := a.store.CreateTokens(ctx, toks, actor); err != nil {
		return nil, err
	}
	// An operator minting a token for a device decides who may enroll it:
	// a lockout of its ID ends.
	for _, id := range deviceIDs {
		a.lock.clear(id)
	}
	a.log.Info("tokens created", "count", len(toks), "batch", batch, "actor", actor, "ttl", ttl)
	return grants, nil
}

// IssueIdentity issues a service or operator certificate from a CSR.
func (a *Authority) IssueIdentity(ctx context.Context, id identity.Identity, csr *x509.CertificateRequest, ttl time.Duration, actor string) (*x509.Certificate, error) {
	if id.Role != identity.RoleService && id.Role != identity.RoleOperator {
		return nil, fmt.Errorf("%w: role %q (want service or operator)", registry.ErrInvalid, id.Role)
	}
	if ttl <= 0 {
		ttl = a.cfg.IdentityTTL
	}
	if err := pki.CheckCSR(csr, id); err != nil {
		return nil, err
	}
	cert, err := a.cfg.Issuer.IssueIdentity(csr.PublicKey, id, ttl)
	if err != nil {
		return nil, err
	}
	rec := certRecord(cert, "")
	ev := registry.AuditEvent{Time: a.now(), Actor: actor, Action: registry.ActionCertIssue, Serial: rec.Serial, Detail: id.String()}
	if err := a.store.RecordCertificate(ctx, rec, ev); err != nil {
		return nil, err
	}
	a.log.Info("certificate issued", "identity", id.String(), "serial", rec.Serial, "actor", actor)
	return cert, nil
}

// Revocation is what RevokeDevice did.
type Revocation struct {
	registry.RevokeResult
	// Disconnected is true when a live session was closed.
	Disconnected bool
	// CRLNumber of the CRL that lists the revocation.
	CRLNumber uint64
}

// RevokeDevice revokes a device: the registry records it, its serials join
// the in-memory set at once (refused in handshakes from then on), its live
// sessions are cut through the OnRevoke listeners, and a new CRL is signed.
func (a *Authority) RevokeDevice(ctx context.Context, deviceID string, reason int, actor string) (Revocation, error) {
	res, err := a.store.RevokeDevice(ctx, deviceID, reason, a.now(), actor)
	if err != nil {
		return Revocation{}, err
	}
	out := Revocation{RevokeResult: res}
	if !res.AlreadyRevoked {
		a.addRevoked(res.Revocations)
		a.m.Revocations.Inc()
		a.log.Info("device revoked", "device", deviceID, "reason", pki.ReasonName(reason), "serials", len(res.Revocations), "actor", actor)
	}
	// Listeners run even for a repeated revocation, so a session that
	// somehow survived is cut now.
	out.Disconnected = a.notify(deviceID)
	if !res.AlreadyRevoked {
		if err := a.resign(ctx); err != nil {
			return out, err
		}
	}
	out.CRLNumber = a.crl.Load().Number
	return out, nil
}

// RevokeCertificate revokes a single (service or operator) certificate.
func (a *Authority) RevokeCertificate(ctx context.Context, serial string, reason int, actor string) (registry.Revocation, error) {
	rev, err := a.store.RevokeCertificate(ctx, serial, reason, a.now(), actor)
	if err != nil {
		return rev, err
	}
	a.addRevoked([]registry.Revocation{rev})
	if rev.DeviceID != "" {
		a.notify(rev.DeviceID)
	}
	a.log.Info("certificate revoked", "serial", serial, "subject", rev.Subject, "reason", pki.ReasonName(reason), "actor", actor)
	return rev, a.resign(ctx)
}

func (a *Authority) addRevoked(revs []registry.Revocation) {
	a.setMu.Lock()
	defer a.setMu.Unlock()
	old := *a.revoked.Load()
	next := make(map[string]struct{}, len(old)+len(revs))
	for s := range old {
		next[s] = struct{}{}
	}
	for _, r := range revs {
		next[r.Serial] = struct{}{}
	}
	a.revoked.Store(&next)
	a.m.RevokedSerials.Set(float64(len(next)))
}

func (a *Authority) notify(deviceID string) bool {
	a.listenersMu.Lock()
	ls := append([]func(string) bool{}, a.listeners...)
	a.listenersMu.Unlock()
	cut := false
	for _, fn := range ls {
		if fn(deviceID) {
			cut = true
		}
	}
	return cut
}

// CRL returns the current CRL.
func (a *Authority) CRL() *CRL { return a.crl.Load() }

// RefreshCRL re-signs the CRL if half its validity has passed, so relying
// parties never hold a CRL past its nextUpdate. Call it periodically.
func (a *Authority) RefreshCRL(ctx context.Context) error {
	a.crlMu.Lock()
	defer a.crlMu.Unlock()
	cur := a.crl.Load()
	if a.now().Before(cur.ThisUpdate.Add(a.cfg.CRLValidity / 2)) {
		return nil
	}
	return a.resignLocked(ctx)
}

// resign signs a new CRL that lists every revocation committed so far.
func (a *Authority) resign(ctx context.Context) error {
	a.crlMu.Lock()
	defer a.crlMu.Unlock()
	return a.resignLocked(ctx)
}

func (a *Authority) resignLocked(ctx context.Context) error {
	revs, err := a.store.Revocations(ctx)
	if err != nil {
		return fmt.Errorf("load revocations: %w", err)
	}
	return a.signCRL(ctx, revs)
}

// signCRL signs a CRL of every revocation whose certificate has not
// expired. Callers hold a.crlMu.
func (a *Authority) signCRL(ctx context.Context, revs []registry.Revocation) error {
	now := a.now()
	entries := make([]pki.CRLEntry, 0, len(revs))
	for _, r := range revs {
		if !r.NotAfter.IsZero() && r.NotAfter.Before(now) {
			continue // RFC 5280 5.1.2.6: expired certificates may leave the CRL
		}
		serial, ok := new(big.Int).SetString(r.Serial, 16)
		if !ok {
			a.log.Error("revocation with malformed serial skipped", "serial", r.Serial)
			continue
		}
		entries = append(entries, pki.CRLEntry{Serial: serial, RevokedAt: r.RevokedAt, Reason: r.Reason})
	}
	number, err := a.store.NextCRLNumber(ctx)
	if err != nil {
		return fmt.Errorf("next CRL number: %w", err)
	}
	this := now.Add(-time.Minute).Truncate(time.Second)
	next := now.Add(a.cfg.CRLValidity).Truncate(time.Second)
	der, err := a.cfg.Issuer.CRL(entries, new(big.Int).SetUint64(number), this, next)
	if err != nil {
		return err
	}
	a.crl.Store(&CRL{DER: der, Number: number, ThisUpdate: this, NextUpdate: next})
	a.m.CRLNumber.Set(float64(number))
	if a.cfg.CRLFile != "" {
		if err := pki.WriteFileAtomic(a.cfg.CRLFile, pki.EncodeCRLPEM(der), 0o644); err != nil {
			// The CRL is served from memory; the file is a convenience copy.
			a.log.Warn("write CRL file", "error", err)
		}
	}
	return nil
}
