// Package registrytest is the conformance suite of registry.Store. Every
// implementation runs it from its own tests:
//
//	func TestStore(t *testing.T) {
//		registrytest.Run(t, func(t *testing.T) registry.Store { ... })
//	}
//
// The suite checks behaviour through the interface only; what only one
// implementation can show (restoring a backup, file locks) belongs in that
// implementation's tests.
package registrytest

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
	"github.com/fleetgate/fleetgate/pkg/registry"
)

// Operator is the actor of the operator actions in the suite.
const Operator = "operator:alice"

// CertRecord turns an issued certificate into the record a store keeps.
// DeviceID is left empty: Enroll and Renew fill it in.
func CertRecord(c *x509.Certificate) registry.Certificate {
	r := registry.Certificate{
		Serial:    c.SerialNumber.Text(16),
		NotBefore: c.NotBefore,
		NotAfter:  c.NotAfter,
		DER:       c.Raw,
	}
	if len(c.URIs) > 0 {
		r.Subject = c.URIs[0].String()
	}
	return r
}

// Run runs the suite. newStore is called once per test and returns an
// empty, open store; it should register its own cleanup (the suite closes
// some stores itself, so cleanup must accept registry.ErrClosed).
func Run(t *testing.T, newStore func(t *testing.T) registry.Store) {
	f := pkitest.New(t)
	groups := []struct {
		name  string
		cases []testCase
	}{
		{"tokens", tokenCases},
		{"enroll", enrollCases},
		{"concurrency", concurrencyCases},
		{"renew", renewCases},
		{"revoke device", revokeDeviceCases},
		{"revoke certificate", revokeCertCases},
		{"devices", deviceListCases},
		{"audit", auditCases},
		{"crl number", crlNumberCases},
		{"last seen", lastSeenCases},
		{"prune tokens", pruneCases},
		{"backup", backupCases},
		{"closed", closedCases},
	}
	for _, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			for _, tc := range g.cases {
				t.Run(tc.name, func(t *testing.T) {
					tc.run(t, newHarness(t, f, newStore(t)))
				})
			}
		})
	}
}

type testCase struct {
	name string
	run  func(t *testing.T, h *harness)
}

// harness holds one store and the helpers the cases share. Times are
// whole milliseconds so that stores which serialize time (JSON, protobuf)
// give back values that compare Equal.
type harness struct {
	t   *testing.T
	s   registry.Store
	f   *pkitest.Fixture
	ctx context.Context
	now time.Time
}

func newHarness(t *testing.T, f *pkitest.Fixture, s registry.Store) *harness {
	return &harness{t: t, s: s, f: f, ctx: t.Context(), now: time.Now().Truncate(time.Millisecond)}
}

// at is the harness clock plus d.
func (h *harness) at(d time.Duration) time.Time { return h.now.Add(d) }

// newToken returns an unsaved token for device, valid for ttl from now.
func (h *harness) newToken(device string, ttl time.Duration) registry.Token {
	h.t.Helper()
	_, hash, err := registry.NewToken()
	if err != nil {
		h.t.Fatal(err)
	}
	return registry.Token{Hash: hash, DeviceID: device, Batch: "suite", CreatedAt: h.now, ExpiresAt: h.now.Add(ttl)}
}

// token stores a token for device valid for ttl and returns its hash.
func (h *harness) token(device string, ttl time.Duration) []byte {
	h.t.Helper()
	tok := h.newToken(device, ttl)
	if err := h.s.CreateTokens(h.ctx, []registry.Token{tok}, Operator); err != nil {
		h.t.Fatalf("CreateTokens: %v", err)
	}
	return tok.Hash
}

// cert issues a device certificate for device.
func (h *harness) cert(device string) registry.Certificate {
	h.t.Helper()
	c, _ := h.f.Device(h.t, device)
	return CertRecord(c)
}

// shortCert issues a device certificate for device that expires after ttl.
func (h *harness) shortCert(device string, ttl time.Duration) registry.Certificate {
	h.t.Helper()
	c, _ := h.f.Identity(h.t, identity.Device(h.f.Issuer.TrustDomain, device), ttl)
	return CertRecord(c)
}

// enroll enrolls device with a fresh token and certificate.
func (h *harness) enroll(device string) (registry.Device, registry.Certificate) {
	h.t.Helper()
	return h.enrollCert(device, h.cert(device))
}

func (h *harness) enrollCert(device string, c registry.Certificate) (registry.Device, registry.Certificate) {
	h.t.Helper()
	d, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: device, TokenHash: h.token(device, time.Hour), Cert: c, Time: h.now})
	if err != nil {
		h.t.Fatalf("Enroll %s: %v", device, err)
	}
	return d, c
}

func (h *harness) device(id string) registry.Device {
	h.t.Helper()
	d, err := h.s.Device(h.ctx, id)
	if err != nil {
		h.t.Fatalf("Device %s: %v", id, err)
	}
	return d
}

func (h *harness) audit(f registry.AuditFilter) []registry.AuditEvent {
	h.t.Helper()
	evs, err := h.s.Audit(h.ctx, f)
	if err != nil {
		h.t.Fatalf("Audit: %v", err)
	}
	return evs
}

func (h *harness) revocations() []registry.Revocation {
	h.t.Helper()
	rs, err := h.s.Revocations(h.ctx)
	if err != nil {
		h.t.Fatalf("Revocations: %v", err)
	}
	return rs
}

// lastAudit is the newest event, which must have action.
func (h *harness) lastAudit(action string) registry.AuditEvent {
	h.t.Helper()
	evs := h.audit(registry.AuditFilter{})
	if len(evs) == 0 {
		h.t.Fatalf("no audit events, want %s", action)
	}
	ev := evs[len(evs)-1]
	if ev.Action != action {
		h.t.Fatalf("last audit event is %+v, want action %s", ev, action)
	}
	return ev
}

// wantErr fails unless err matches want (nil for success).
func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Fatalf("%s: unexpected error %v", what, err)
	case want != nil && !errors.Is(err, want):
		t.Fatalf("%s: error %v, want %v", what, err, want)
	}
}

func sameTime(t *testing.T, what string, got, want time.Time) {
	t.Helper()
	if !got.Equal(want) {
		t.Errorf("%s = %s, want %s", what, got, want)
	}
}

// state is what a refused call must leave as it was.
type state struct {
	devices     []registry.Device
	revocations []registry.Revocation
	audit       int
}

func (h *harness) state() state {
	h.t.Helper()
	ds, err := h.s.Devices(h.ctx, registry.DeviceFilter{})
	if err != nil {
		h.t.Fatalf("Devices: %v", err)
	}
	return state{devices: ds, revocations: h.revocations(), audit: len(h.audit(registry.AuditFilter{}))}
}

func (h *harness) unchanged(before state) {
	h.t.Helper()
	after := h.state()
	if len(after.devices) != len(before.devices) || len(after.revocations) != len(before.revocations) || after.audit != before.audit {
		h.t.Fatalf("state changed: %d devices, %d revocations, %d audit events before; %d, %d, %d after",
			len(before.devices), len(before.revocations), before.audit, len(after.devices), len(after.revocations), after.audit)
	}
	for i := range before.devices {
		b, a := before.devices[i], after.devices[i]
		if a.ID != b.ID || a.Status != b.Status || a.CurrentSerial != b.CurrentSerial || !slices.Equal(a.Serials, b.Serials) {
			h.t.Fatalf("device changed: %+v, was %+v", a, b)
		}
	}
}

var tokenCases = []testCase{
	{"created token passes the check", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-1", hash, h.at(time.Minute)), nil)
	}},
	{"unknown token is invalid", func(t *testing.T, h *harness) {
		h.token("dev-1", time.Hour)
		hash := registry.HashToken("not a token")
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-1", hash, h.now), registry.ErrTokenInvalid)
		wantErr(t, "CheckToken short hash", h.s.CheckToken(h.ctx, "dev-1", hash[:5], h.now), registry.ErrTokenInvalid)
	}},
	{"token of another device is invalid", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-2", hash, h.now), registry.ErrTokenInvalid)
	}},
	{"expired token", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		wantErr(t, "at expiry", h.s.CheckToken(h.ctx, "dev-1", hash, h.at(time.Hour)), registry.ErrTokenExpired)
		wantErr(t, "after expiry", h.s.CheckToken(h.ctx, "dev-1", hash, h.at(2*time.Hour)), registry.ErrTokenExpired)
	}},
	{"used token", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		_, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: h.cert("dev-1"), Time: h.now})
		wantErr(t, "Enroll", err, nil)
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-1", hash, h.now), registry.ErrTokenUsed)
	}},
	{"duplicate hash conflicts and stores none of the batch", func(t *testing.T, h *harness) {
		old := h.newToken("dev-1", time.Hour)
		wantErr(t, "first batch", h.s.CreateTokens(h.ctx, []registry.Token{old}, Operator), nil)
		before := h.state()
		a, b := h.newToken("dev-2", time.Hour), h.newToken("dev-3", time.Hour)
		dup := h.newToken("dev-4", time.Hour)
		dup.Hash = old.Hash
		wantErr(t, "second batch", h.s.CreateTokens(h.ctx, []registry.Token{a, b, dup}, Operator), registry.ErrConflict)
		wantErr(t, "token a", h.s.CheckToken(h.ctx, "dev-2", a.Hash, h.now), registry.ErrTokenInvalid)
		wantErr(t, "token b", h.s.CheckToken(h.ctx, "dev-3", b.Hash, h.now), registry.ErrTokenInvalid)
		wantErr(t, "old token", h.s.CheckToken(h.ctx, "dev-1", old.Hash, h.now), nil)
		h.unchanged(before)
	}},
	{"hash repeated within a batch conflicts", func(t *testing.T, h *harness) {
		a := h.newToken("dev-1", time.Hour)
		b := a
		b.DeviceID = "dev-2"
		wantErr(t, "CreateTokens", h.s.CreateTokens(h.ctx, []registry.Token{a, b}, Operator), registry.ErrConflict)
		wantErr(t, "token a", h.s.CheckToken(h.ctx, "dev-1", a.Hash, h.now), registry.ErrTokenInvalid)
		if n := len(h.audit(registry.AuditFilter{})); n != 0 {
			t.Errorf("%d audit events, want 0", n)
		}
	}},
	{"token for a revoked device is refused with the whole batch", func(t *testing.T, h *harness) {
		h.enroll("dev-1")
		if _, err := h.s.RevokeDevice(h.ctx, "dev-1", 1, h.now, Operator); err != nil {
			t.Fatal(err)
		}
		before := h.state()
		good, bad := h.newToken("dev-2", time.Hour), h.newToken("dev-1", time.Hour)
		wantErr(t, "CreateTokens", h.s.CreateTokens(h.ctx, []registry.Token{good, bad}, Operator), registry.ErrRevoked)
		wantErr(t, "good token", h.s.CheckToken(h.ctx, "dev-2", good.Hash, h.now), registry.ErrTokenInvalid)
		h.unchanged(before)
	}},
	{"one audit event per token", func(t *testing.T, h *harness) {
		toks := []registry.Token{h.newToken("dev-1", time.Hour), h.newToken("dev-2", time.Hour), h.newToken("dev-2", time.Hour)}
		wantErr(t, "CreateTokens", h.s.CreateTokens(h.ctx, toks, Operator), nil)
		evs := h.audit(registry.AuditFilter{})
		if len(evs) != len(toks) {
			t.Fatalf("%d audit events, want %d", len(evs), len(toks))
		}
		for i, ev := range evs {
			if ev.Action != registry.ActionTokenCreate || ev.Actor != Operator || ev.DeviceID != toks[i].DeviceID {
				t.Errorf("event %d = %+v, want %s by %s for %s", i, ev, registry.ActionTokenCreate, Operator, toks[i].DeviceID)
			}
		}
	}},
	{"malformed tokens are invalid", func(t *testing.T, h *harness) {
		for _, c := range []struct {
			name string
			edit func(*registry.Token)
		}{
			{"empty device id", func(tok *registry.Token) { tok.DeviceID = "" }},
			{"device id outside the name grammar", func(tok *registry.Token) { tok.DeviceID = "Dev/1" }},
			{"empty hash", func(tok *registry.Token) { tok.Hash = nil }},
			{"short hash", func(tok *registry.Token) { tok.Hash = tok.Hash[:16] }},
			{"expires before creation", func(tok *registry.Token) { tok.ExpiresAt = tok.CreatedAt.Add(-time.Second) }},
		} {
			tok := h.newToken("dev-1", time.Hour)
			c.edit(&tok)
			wantErr(t, c.name, h.s.CreateTokens(h.ctx, []registry.Token{tok}, Operator), registry.ErrInvalid)
		}
		if n := len(h.audit(registry.AuditFilter{})); n != 0 {
			t.Errorf("%d audit events, want 0", n)
		}
	}},
	{"empty batch is a no-op", func(t *testing.T, h *harness) {
		wantErr(t, "CreateTokens", h.s.CreateTokens(h.ctx, nil, Operator), nil)
	}},
}

var enrollCases = []testCase{
	{"first enrollment records device, certificate, token use and audit event", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		c := h.cert("dev-1")
		d, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: c, Time: h.at(time.Minute)})
		wantErr(t, "Enroll", err, nil)
		for what, d := range map[string]registry.Device{"returned": d, "stored": h.device("dev-1")} {
			if d.ID != "dev-1" || d.Status != registry.StatusActive || d.CurrentSerial != c.Serial || !slices.Equal(d.Serials, []string{c.Serial}) {
				t.Errorf("%s device = %+v", what, d)
			}
			sameTime(t, what+" EnrolledAt", d.EnrolledAt, h.at(time.Minute))
			if !d.RenewedAt.IsZero() || !d.RevokedAt.IsZero() {
				t.Errorf("%s device = %+v, want no renewal or revocation", what, d)
			}
		}
		got, err := h.s.Certificate(h.ctx, c.Serial)
		wantErr(t, "Certificate", err, nil)
		if !bytes.Equal(got.DER, c.DER) || got.DeviceID != "dev-1" || got.Subject != c.Subject || got.Serial != c.Serial {
			t.Errorf("certificate = %+v", got)
		}
		sameTime(t, "NotAfter", got.NotAfter, c.NotAfter)
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-1", hash, h.at(time.Minute)), registry.ErrTokenUsed)
		ev := h.lastAudit(registry.ActionEnroll)
		if ev.DeviceID != "dev-1" || ev.Serial != c.Serial {
			t.Errorf("audit event = %+v", ev)
		}
		sameTime(t, "audit time", ev.Time, h.at(time.Minute))
	}},
	{"second use of a token is refused without change", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		_, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: h.cert("dev-1"), Time: h.now})
		wantErr(t, "first Enroll", err, nil)
		before := h.state()
		c2 := h.cert("dev-1")
		_, err = h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: c2, Time: h.now})
		wantErr(t, "second Enroll", err, registry.ErrTokenUsed)
		h.unchanged(before)
		_, err = h.s.Certificate(h.ctx, c2.Serial)
		wantErr(t, "Certificate", err, registry.ErrNotFound)
	}},
	{"token of another device is invalid", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		_, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-2", TokenHash: hash, Cert: h.cert("dev-2"), Time: h.now})
		wantErr(t, "Enroll", err, registry.ErrTokenInvalid)
		_, err = h.s.Device(h.ctx, "dev-2")
		wantErr(t, "Device", err, registry.ErrNotFound)
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-1", hash, h.now), nil)
	}},
	{"unknown token is invalid", func(t *testing.T, h *harness) {
		_, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: registry.HashToken("guess"), Cert: h.cert("dev-1"), Time: h.now})
		wantErr(t, "Enroll", err, registry.ErrTokenInvalid)
	}},
	{"expired token", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		_, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: h.cert("dev-1"), Time: h.at(time.Hour + time.Second)})
		wantErr(t, "Enroll", err, registry.ErrTokenExpired)
		_, err = h.s.Device(h.ctx, "dev-1")
		wantErr(t, "Device", err, registry.ErrNotFound)
	}},
	{"duplicate serial conflicts and leaves the token unused", func(t *testing.T, h *harness) {
		_, c := h.enroll("dev-1")
		before := h.state()
		hash := h.token("dev-2", time.Hour)
		_, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-2", TokenHash: hash, Cert: c, Time: h.now})
		wantErr(t, "Enroll", err, registry.ErrConflict)
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-2", hash, h.now), nil)
		_, err = h.s.Device(h.ctx, "dev-2")
		wantErr(t, "Device", err, registry.ErrNotFound)
		if got := h.state().audit; got != before.audit+1 { // the token's own event
			t.Errorf("%d audit events, want %d", got, before.audit+1)
		}
	}},
	{"re-enrolling an active device appends a serial", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		c2 := h.cert("dev-1")
		d, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: h.token("dev-1", time.Hour), Cert: c2, Time: h.at(time.Minute)})
		wantErr(t, "second Enroll", err, nil)
		stored := h.device("dev-1")
		for what, d := range map[string]registry.Device{"returned": d, "stored": stored} {
			if d.Status != registry.StatusActive || d.CurrentSerial != c2.Serial || !slices.Equal(d.Serials, []string{c1.Serial, c2.Serial}) {
				t.Errorf("%s device = %+v", what, d)
			}
			sameTime(t, what+" EnrolledAt", d.EnrolledAt, h.at(time.Minute))
		}
		if n := len(h.audit(registry.AuditFilter{DeviceID: "dev-1"})); n != 4 { // 2 tokens, 2 enrollments
			t.Errorf("%d audit events for the device, want 4", n)
		}
	}},
	{"revoked device cannot enroll", func(t *testing.T, h *harness) {
		h.enroll("dev-1")
		spare := h.token("dev-1", time.Hour)
		if _, err := h.s.RevokeDevice(h.ctx, "dev-1", 1, h.now, Operator); err != nil {
			t.Fatal(err)
		}
		before := h.state()
		// Revocation deleted the spare token, and no new one can be made;
		// the error must not tell a token-less caller the device's state.
		_, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: spare, Cert: h.cert("dev-1"), Time: h.now})
		wantErr(t, "Enroll", err, registry.ErrTokenInvalid)
		wantErr(t, "CreateTokens", h.s.CreateTokens(h.ctx, []registry.Token{h.newToken("dev-1", time.Hour)}, Operator), registry.ErrRevoked)
		h.unchanged(before)
		if d := h.device("dev-1"); d.Status != registry.StatusRevoked {
			t.Errorf("device = %+v, want revoked", d)
		}
	}},
	{"malformed requests are invalid", func(t *testing.T, h *harness) {
		hash := h.token("dev-1", time.Hour)
		for _, c := range []struct {
			name string
			edit func(*registry.Enrollment)
		}{
			{"empty device id", func(e *registry.Enrollment) { e.DeviceID = "" }},
			{"device id outside the name grammar", func(e *registry.Enrollment) { e.DeviceID = "../dev-1" }},
			{"empty serial", func(e *registry.Enrollment) { e.Cert.Serial = "" }},
			{"empty token hash", func(e *registry.Enrollment) { e.TokenHash = nil }},
			{"certificate of another device", func(e *registry.Enrollment) { e.Cert.DeviceID = "dev-2" }},
		} {
			e := registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: h.cert("dev-1"), Time: h.now}
			c.edit(&e)
			_, err := h.s.Enroll(h.ctx, e)
			wantErr(t, c.name, err, registry.ErrInvalid)
		}
		wantErr(t, "CheckToken", h.s.CheckToken(h.ctx, "dev-1", hash, h.now), nil)
	}},
}

var concurrencyCases = []testCase{
	{"one token, many enrollments: exactly one succeeds", func(t *testing.T, h *harness) {
		const n = 64
		hash := h.token("dev-1", time.Hour)
		certs := make([]registry.Certificate, n)
		for i := range certs {
			certs[i] = h.cert("dev-1")
		}
		errs := make([]error, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range n {
			wg.Go(func() {
				<-start
				_, errs[i] = h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: certs[i], Time: h.now})
			})
		}
		close(start)
		wg.Wait()
		winner := -1
		for i, err := range errs {
			switch {
			case err == nil && winner >= 0:
				t.Fatalf("enrollments %d and %d both succeeded", winner, i)
			case err == nil:
				winner = i
			case !errors.Is(err, registry.ErrTokenUsed):
				t.Errorf("enrollment %d: %v, want %v", i, err, registry.ErrTokenUsed)
			}
		}
		if winner < 0 {
			t.Fatal("no enrollment succeeded")
		}
		if d := h.device("dev-1"); !slices.Equal(d.Serials, []string{certs[winner].Serial}) {
			t.Errorf("device serials %v, want only the winner's %s", d.Serials, certs[winner].Serial)
		}
		if evs := h.audit(registry.AuditFilter{DeviceID: "dev-1"}); len(evs) != 2 {
			t.Errorf("%d audit events, want token creation and one enrollment", len(evs))
		}
	}},
	{"different tokens enroll concurrently", func(t *testing.T, h *harness) {
		const n = 32
		reqs := make([]registry.Enrollment, n)
		for i := range reqs {
			id := fmt.Sprintf("dev-%02d", i)
			reqs[i] = registry.Enrollment{DeviceID: id, TokenHash: h.token(id, time.Hour), Cert: h.cert(id), Time: h.now}
		}
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { _, errs[i] = h.s.Enroll(h.ctx, reqs[i]) })
		}
		wg.Wait()
		for i, err := range errs {
			wantErr(t, reqs[i].DeviceID, err, nil)
		}
		ds, err := h.s.Devices(h.ctx, registry.DeviceFilter{Status: registry.StatusActive})
		wantErr(t, "Devices", err, nil)
		if len(ds) != n {
			t.Errorf("%d active devices, want %d", len(ds), n)
		}
	}},
}

var renewCases = []testCase{
	{"renewal records the new certificate", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		c2 := h.cert("dev-1")
		d, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: c2, Time: h.at(time.Hour)})
		wantErr(t, "Renew", err, nil)
		for what, d := range map[string]registry.Device{"returned": d, "stored": h.device("dev-1")} {
			if d.Status != registry.StatusActive || d.CurrentSerial != c2.Serial || !slices.Equal(d.Serials, []string{c1.Serial, c2.Serial}) {
				t.Errorf("%s device = %+v", what, d)
			}
			sameTime(t, what+" RenewedAt", d.RenewedAt, h.at(time.Hour))
			sameTime(t, what+" EnrolledAt", d.EnrolledAt, h.now)
		}
		got, err := h.s.Certificate(h.ctx, c2.Serial)
		wantErr(t, "Certificate", err, nil)
		if got.DeviceID != "dev-1" || !bytes.Equal(got.DER, c2.DER) {
			t.Errorf("certificate = %+v", got)
		}
		ev := h.lastAudit(registry.ActionRenew)
		if ev.DeviceID != "dev-1" || ev.Serial != c2.Serial {
			t.Errorf("audit event = %+v", ev)
		}
	}},
	{"any unrevoked certificate of the device may renew", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		c2, c3 := h.cert("dev-1"), h.cert("dev-1")
		_, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: c2, Time: h.now})
		wantErr(t, "first Renew", err, nil)
		d, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: c3, Time: h.now})
		wantErr(t, "Renew from the older certificate", err, nil)
		if d.CurrentSerial != c3.Serial || len(d.Serials) != 3 {
			t.Errorf("device = %+v", d)
		}
	}},
	{"unknown device", func(t *testing.T, h *harness) {
		_, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: "abc", Cert: h.cert("dev-1"), Time: h.now})
		wantErr(t, "Renew", err, registry.ErrNotFound)
	}},
	{"serial not issued to the device", func(t *testing.T, h *harness) {
		h.enroll("dev-1")
		_, other := h.enroll("dev-2")
		before := h.state()
		for what, serial := range map[string]string{"another device's": other.Serial, "unknown": "abcdef"} {
			_, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: serial, Cert: h.cert("dev-1"), Time: h.now})
			wantErr(t, what+" serial", err, registry.ErrUnknownSerial)
		}
		h.unchanged(before)
	}},
	{"revoked device", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		if _, err := h.s.RevokeDevice(h.ctx, "dev-1", 0, h.now, Operator); err != nil {
			t.Fatal(err)
		}
		before := h.state()
		_, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: h.cert("dev-1"), Time: h.now})
		wantErr(t, "Renew", err, registry.ErrRevoked)
		h.unchanged(before)
	}},
	{"revoked old serial", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		if _, err := h.s.RevokeCertificate(h.ctx, c1.Serial, 1, h.now, Operator); err != nil {
			t.Fatal(err)
		}
		before := h.state()
		_, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: h.cert("dev-1"), Time: h.now})
		wantErr(t, "Renew", err, registry.ErrRevoked)
		h.unchanged(before)
		if d := h.device("dev-1"); d.Status != registry.StatusActive {
			t.Errorf("device = %+v, want still active", d)
		}
	}},
	{"new serial exists", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		_, c2 := h.enroll("dev-2")
		_, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: c2, Time: h.now})
		wantErr(t, "Renew", err, registry.ErrConflict)
	}},
	{"malformed requests are invalid", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		for _, c := range []struct {
			name string
			edit func(*registry.Renewal)
		}{
			{"empty device id", func(r *registry.Renewal) { r.DeviceID = "" }},
			{"empty old serial", func(r *registry.Renewal) { r.OldSerial = "" }},
			{"empty serial", func(r *registry.Renewal) { r.Cert.Serial = "" }},
		} {
			r := registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: h.cert("dev-1"), Time: h.now}
			c.edit(&r)
			_, err := h.s.Renew(h.ctx, r)
			wantErr(t, c.name, err, registry.ErrInvalid)
		}
	}},
}

var revokeDeviceCases = []testCase{
	{"revokes the device, its unexpired certificates and unused tokens", func(t *testing.T, h *harness) {
		short := h.shortCert("dev-1", time.Minute)
		_, c1 := h.enrollCert("dev-1", short)
		c2 := h.cert("dev-1")
		if _, err := h.s.Renew(h.ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c1.Serial, Cert: c2, Time: h.now}); err != nil {
			t.Fatal(err)
		}
		spare := h.token("dev-1", 48*time.Hour)
		other := h.token("dev-2", 48*time.Hour)
		when := h.at(time.Hour) // the short certificate has expired by then
		res, err := h.s.RevokeDevice(h.ctx, "dev-1", 1, when, Operator)
		wantErr(t, "RevokeDevice", err, nil)
		if res.AlreadyRevoked {
			t.Error("AlreadyRevoked on the first revocation")
		}
		for what, d := range map[string]registry.Device{"returned": res.Device, "stored": h.device("dev-1")} {
			if d.Status != registry.StatusRevoked || d.RevocationReason != 1 {
				t.Errorf("%s device = %+v", what, d)
			}
			sameTime(t, what+" RevokedAt", d.RevokedAt, when)
		}
		if len(res.Revocations) != 1 || res.Revocations[0].Serial != c2.Serial {
			t.Fatalf("revocations %+v, want only %s (%s had expired)", res.Revocations, c2.Serial, c1.Serial)
		}
		r := res.Revocations[0]
		if r.DeviceID != "dev-1" || r.Reason != 1 || r.Subject != c2.Subject {
			t.Errorf("revocation = %+v", r)
		}
		sameTime(t, "RevokedAt", r.RevokedAt, when)
		sameTime(t, "NotAfter", r.NotAfter, c2.NotAfter)
		if rs := h.revocations(); len(rs) != 1 || rs[0].Serial != c2.Serial {
			t.Errorf("Revocations() = %+v", rs)
		}
		wantErr(t, "spare token", h.s.CheckToken(h.ctx, "dev-1", spare, h.now), registry.ErrTokenInvalid)
		wantErr(t, "other device's token", h.s.CheckToken(h.ctx, "dev-2", other, h.now), nil)
		ev := h.lastAudit(registry.ActionRevoke)
		if ev.DeviceID != "dev-1" || ev.Actor != Operator {
			t.Errorf("audit event = %+v", ev)
		}
	}},
	{"second revocation changes nothing", func(t *testing.T, h *harness) {
		h.enroll("dev-1")
		if _, err := h.s.RevokeDevice(h.ctx, "dev-1", 1, h.now, Operator); err != nil {
			t.Fatal(err)
		}
		before := h.state()
		res, err := h.s.RevokeDevice(h.ctx, "dev-1", 4, h.at(time.Hour), Operator)
		wantErr(t, "second RevokeDevice", err, nil)
		if !res.AlreadyRevoked || len(res.Revocations) != 0 {
			t.Errorf("result = %+v, want AlreadyRevoked and no revocations", res)
		}
		sameTime(t, "RevokedAt", res.Device.RevokedAt, h.now)
		if res.Device.RevocationReason != 1 {
			t.Errorf("reason %d, want the first revocation's 1", res.Device.RevocationReason)
		}
		h.unchanged(before)
	}},
	{"unknown device", func(t *testing.T, h *harness) {
		_, err := h.s.RevokeDevice(h.ctx, "dev-1", 1, h.now, Operator)
		wantErr(t, "RevokeDevice", err, registry.ErrNotFound)
	}},
	{"empty device id is invalid", func(t *testing.T, h *harness) {
		_, err := h.s.RevokeDevice(h.ctx, "", 1, h.now, Operator)
		wantErr(t, "RevokeDevice", err, registry.ErrInvalid)
	}},
	{"certificate revoked before keeps its revocation", func(t *testing.T, h *harness) {
		_, c1 := h.enroll("dev-1")
		first, err := h.s.RevokeCertificate(h.ctx, c1.Serial, 1, h.now, Operator)
		wantErr(t, "RevokeCertificate", err, nil)
		res, err := h.s.RevokeDevice(h.ctx, "dev-1", 5, h.at(time.Hour), Operator)
		wantErr(t, "RevokeDevice", err, nil)
		if len(res.Revocations) != 0 {
			t.Errorf("revocations %+v, want none new", res.Revocations)
		}
		rs := h.revocations()
		if len(rs) != 1 || rs[0].Reason != first.Reason {
			t.Errorf("Revocations() = %+v, want the first revocation", rs)
		}
	}},
}

var revokeCertCases = []testCase{
	{"service certificate", func(t *testing.T, h *harness) {
		x, _ := h.f.Identity(t, identity.Service(h.f.Issuer.TrustDomain, "telemetry"), 0)
		c := CertRecord(x)
		ev := registry.AuditEvent{Time: h.now, Actor: Operator, Action: registry.ActionCertIssue, Serial: c.Serial, Detail: "telemetry"}
		wantErr(t, "RecordCertificate", h.s.RecordCertificate(h.ctx, c, ev), nil)
		got, err := h.s.Certificate(h.ctx, c.Serial)
		wantErr(t, "Certificate", err, nil)
		if !bytes.Equal(got.DER, c.DER) || got.Subject != c.Subject || got.DeviceID != "" {
			t.Errorf("certificate = %+v", got)
		}
		h.lastAudit(registry.ActionCertIssue)
		rev, err := h.s.RevokeCertificate(h.ctx, c.Serial, 1, h.at(time.Minute), Operator)
		wantErr(t, "RevokeCertificate", err, nil)
		if rev.Serial != c.Serial || rev.Subject != c.Subject || rev.Reason != 1 {
			t.Errorf("revocation = %+v", rev)
		}
		sameTime(t, "RevokedAt", rev.RevokedAt, h.at(time.Minute))
		sameTime(t, "NotAfter", rev.NotAfter, c.NotAfter)
		if rs := h.revocations(); len(rs) != 1 || rs[0].Serial != c.Serial {
			t.Errorf("Revocations() = %+v", rs)
		}
		if ev := h.lastAudit(registry.ActionCertRevoke); ev.Serial != c.Serial || ev.Actor != Operator {
			t.Errorf("audit event = %+v", ev)
		}
	}},
	{"revoking twice is fine", func(t *testing.T, h *harness) {
		x, _ := h.f.Identity(t, identity.Operator(h.f.Issuer.TrustDomain, "bob"), 0)
		c := CertRecord(x)
		wantErr(t, "RecordCertificate", h.s.RecordCertificate(h.ctx, c, registry.AuditEvent{Time: h.now, Actor: Operator, Action: registry.ActionCertIssue}), nil)
		_, err := h.s.RevokeCertificate(h.ctx, c.Serial, 1, h.now, Operator)
		wantErr(t, "first RevokeCertificate", err, nil)
		rev, err := h.s.RevokeCertificate(h.ctx, c.Serial, 1, h.at(time.Hour), Operator)
		wantErr(t, "second RevokeCertificate", err, nil)
		if rev.Serial != c.Serial {
			t.Errorf("revocation = %+v", rev)
		}
		if rs := h.revocations(); len(rs) != 1 {
			t.Errorf("Revocations() = %+v, want one", rs)
		}
	}},
	{"unknown serial", func(t *testing.T, h *harness) {
		_, err := h.s.RevokeCertificate(h.ctx, "abcdef", 1, h.now, Operator)
		wantErr(t, "RevokeCertificate", err, registry.ErrNotFound)
	}},
	{"recording a serial twice conflicts", func(t *testing.T, h *harness) {
		x, _ := h.f.Identity(t, identity.Service(h.f.Issuer.TrustDomain, "telemetry"), 0)
		c := CertRecord(x)
		ev := registry.AuditEvent{Time: h.now, Actor: Operator, Action: registry.ActionCertIssue}
		wantErr(t, "first RecordCertificate", h.s.RecordCertificate(h.ctx, c, ev), nil)
		wantErr(t, "second RecordCertificate", h.s.RecordCertificate(h.ctx, c, ev), registry.ErrConflict)
	}},
}

var deviceListCases = []testCase{
	{"filters and pagination in ID order", func(t *testing.T, h *harness) {
		for _, id := range []string{"b-2", "a-1", "c-1", "b-1", "a-2"} {
			h.enroll(id)
		}
		if _, err := h.s.RevokeDevice(h.ctx, "b-1", 0, h.now, Operator); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name string
			f    registry.DeviceFilter
			want []string
		}{
			{"all", registry.DeviceFilter{}, []string{"a-1", "a-2", "b-1", "b-2", "c-1"}},
			{"active", registry.DeviceFilter{Status: registry.StatusActive}, []string{"a-1", "a-2", "b-2", "c-1"}},
			{"revoked", registry.DeviceFilter{Status: registry.StatusRevoked}, []string{"b-1"}},
			{"prefix", registry.DeviceFilter{Prefix: "b-"}, []string{"b-1", "b-2"}},
			{"prefix matching nothing", registry.DeviceFilter{Prefix: "d"}, []string{}},
			{"limit", registry.DeviceFilter{Limit: 2}, []string{"a-1", "a-2"}},
			{"after", registry.DeviceFilter{After: "a-2", Limit: 2}, []string{"b-1", "b-2"}},
			{"after an absent id", registry.DeviceFilter{After: "b-11"}, []string{"b-2", "c-1"}},
			{"after the last", registry.DeviceFilter{After: "c-1"}, []string{}},
			{"prefix and after", registry.DeviceFilter{Prefix: "b-", After: "b-1"}, []string{"b-2"}},
			{"after before the prefix", registry.DeviceFilter{Prefix: "c", After: "a-1"}, []string{"c-1"}},
			{"status and limit", registry.DeviceFilter{Status: registry.StatusActive, After: "a-2", Limit: 2}, []string{"b-2", "c-1"}},
		} {
			ds, err := h.s.Devices(h.ctx, c.f)
			wantErr(t, c.name, err, nil)
			got := []string{}
			for _, d := range ds {
				got = append(got, d.ID)
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("%s: %v, want %v", c.name, got, c.want)
			}
		}
		var all []string
		after := ""
		for range 10 {
			ds, err := h.s.Devices(h.ctx, registry.DeviceFilter{After: after, Limit: 2})
			wantErr(t, "page", err, nil)
			if len(ds) == 0 {
				break
			}
			for _, d := range ds {
				all = append(all, d.ID)
			}
			after = ds[len(ds)-1].ID
		}
		if want := []string{"a-1", "a-2", "b-1", "b-2", "c-1"}; !slices.Equal(all, want) {
			t.Errorf("paging by 2 gave %v, want %v", all, want)
		}
	}},
	{"unknown device", func(t *testing.T, h *harness) {
		_, err := h.s.Device(h.ctx, "dev-1")
		wantErr(t, "Device", err, registry.ErrNotFound)
		_, err = h.s.Certificate(h.ctx, "abcdef")
		wantErr(t, "Certificate", err, registry.ErrNotFound)
	}},
}

var auditCases = []testCase{
	{"appended events come back in order with filters", func(t *testing.T, h *harness) {
		devs := []string{"dev-a", "dev-b", "dev-a", "", "dev-a", "dev-b"}
		for i, d := range devs {
			ev := registry.AuditEvent{Time: h.at(time.Duration(i) * time.Second), Actor: "service:test", Action: "test.event", DeviceID: d, Detail: fmt.Sprint(i)}
			wantErr(t, "AppendAudit", h.s.AppendAudit(h.ctx, ev), nil)
		}
		all := h.audit(registry.AuditFilter{})
		if len(all) != len(devs) {
			t.Fatalf("%d events, want %d", len(all), len(devs))
		}
		for i, ev := range all {
			if i > 0 && ev.Seq <= all[i-1].Seq {
				t.Errorf("seq %d after %d", ev.Seq, all[i-1].Seq)
			}
			if ev.Detail != fmt.Sprint(i) || ev.DeviceID != devs[i] || ev.Actor != "service:test" || ev.Action != "test.event" {
				t.Errorf("event %d = %+v", i, ev)
			}
			sameTime(t, "event time", ev.Time, h.at(time.Duration(i)*time.Second))
		}
		details := func(evs []registry.AuditEvent) []string {
			out := []string{}
			for _, ev := range evs {
				out = append(out, ev.Detail)
			}
			return out
		}
		for _, c := range []struct {
			name string
			f    registry.AuditFilter
			want []string
		}{
			{"after seq", registry.AuditFilter{AfterSeq: all[2].Seq}, []string{"3", "4", "5"}},
			{"after the last", registry.AuditFilter{AfterSeq: all[5].Seq}, []string{}},
			{"after the largest seq", registry.AuditFilter{AfterSeq: ^uint64(0)}, []string{}},
			{"device", registry.AuditFilter{DeviceID: "dev-a"}, []string{"0", "2", "4"}},
			{"limit", registry.AuditFilter{Limit: 2}, []string{"0", "1"}},
			{"device, after and limit", registry.AuditFilter{DeviceID: "dev-b", AfterSeq: all[0].Seq, Limit: 1}, []string{"1"}},
			{"unknown device", registry.AuditFilter{DeviceID: "dev-c"}, []string{}},
		} {
			if got := details(h.audit(c.f)); !slices.Equal(got, c.want) {
				t.Errorf("%s: %v, want %v", c.name, got, c.want)
			}
		}
	}},
	{"seq keeps increasing across operations", func(t *testing.T, h *harness) {
		h.enroll("dev-1")
		wantErr(t, "AppendAudit", h.s.AppendAudit(h.ctx, registry.AuditEvent{Time: h.now, Actor: "gateway", Action: "test.event"}), nil)
		h.enroll("dev-2")
		evs := h.audit(registry.AuditFilter{})
		if len(evs) != 5 {
			t.Fatalf("%d events, want 5", len(evs))
		}
		for i := 1; i < len(evs); i++ {
			if evs[i].Seq <= evs[i-1].Seq {
				t.Errorf("seq %d after %d", evs[i].Seq, evs[i-1].Seq)
			}
		}
	}},
}

var crlNumberCases = []testCase{
	{"strictly increasing", func(t *testing.T, h *harness) {
		var last uint64
		for i := range 50 {
			n, err := h.s.NextCRLNumber(h.ctx)
			wantErr(t, "NextCRLNumber", err, nil)
			if n <= last {
				t.Fatalf("call %d: %d after %d", i, n, last)
			}
			last = n
		}
	}},
	{"concurrent callers get distinct numbers", func(t *testing.T, h *harness) {
		const workers, calls = 8, 10
		var mu sync.Mutex
		seen := map[uint64]bool{}
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for range calls {
					n, err := h.s.NextCRLNumber(h.ctx)
					mu.Lock()
					if err != nil {
						t.Error(err)
					} else if seen[n] {
						t.Errorf("number %d handed out twice", n)
					}
					seen[n] = true
					mu.Unlock()
				}
			})
		}
		wg.Wait()
	}},
}

var lastSeenCases = []testCase{
	{"moves forward only and skips unknown devices", func(t *testing.T, h *harness) {
		h.enroll("dev-1")
		h.enroll("dev-2")
		wantErr(t, "first touch", h.s.TouchLastSeen(h.ctx, map[string]time.Time{"dev-1": h.at(time.Hour), "ghost": h.now}), nil)
		sameTime(t, "LastSeen", h.device("dev-1").LastSeen, h.at(time.Hour))
		wantErr(t, "older touch", h.s.TouchLastSeen(h.ctx, map[string]time.Time{"dev-1": h.at(time.Minute), "dev-2": h.at(time.Minute)}), nil)
		sameTime(t, "LastSeen after older time", h.device("dev-1").LastSeen, h.at(time.Hour))
		sameTime(t, "other device's LastSeen", h.device("dev-2").LastSeen, h.at(time.Minute))
		_, err := h.s.Device(h.ctx, "ghost")
		wantErr(t, "ghost", err, registry.ErrNotFound)
		wantErr(t, "empty touch", h.s.TouchLastSeen(h.ctx, nil), nil)
	}},
}

var pruneCases = []testCase{
	{"deletes expired and used tokens and keeps live ones", func(t *testing.T, h *harness) {
		expired := h.token("dev-1", time.Minute)
		used := h.token("dev-2", time.Hour)
		if _, err := h.s.Enroll(h.ctx, registry.Enrollment{DeviceID: "dev-2", TokenHash: used, Cert: h.cert("dev-2"), Time: h.now}); err != nil {
			t.Fatal(err)
		}
		live := h.token("dev-3", 48*time.Hour)
		later := h.token("dev-4", 2*time.Hour) // expires after the cut
		n, err := h.s.PruneTokens(h.ctx, h.at(time.Hour))
		wantErr(t, "PruneTokens", err, nil)
		if n != 2 {
			t.Errorf("pruned %d tokens, want 2", n)
		}
		wantErr(t, "expired token", h.s.CheckToken(h.ctx, "dev-1", expired, h.at(30*time.Second)), registry.ErrTokenInvalid)
		wantErr(t, "used token", h.s.CheckToken(h.ctx, "dev-2", used, h.now), registry.ErrTokenInvalid)
		wantErr(t, "live token", h.s.CheckToken(h.ctx, "dev-3", live, h.at(time.Hour)), nil)
		wantErr(t, "later token", h.s.CheckToken(h.ctx, "dev-4", later, h.at(time.Hour)), nil)
		h.device("dev-2") // the device stays
		n, err = h.s.PruneTokens(h.ctx, h.at(time.Hour))
		wantErr(t, "second PruneTokens", err, nil)
		if n != 0 {
			t.Errorf("second prune deleted %d tokens, want 0", n)
		}
	}},
}

var backupCases = []testCase{
	{"writes a copy", func(t *testing.T, h *harness) {
		h.enroll("dev-1")
		var buf bytes.Buffer
		n, err := h.s.Backup(h.ctx, &buf)
		wantErr(t, "Backup", err, nil)
		if n <= 0 || int64(buf.Len()) != n {
			t.Errorf("Backup reported %d bytes and wrote %d", n, buf.Len())
		}
	}},
}

var closedCases = []testCase{
	{"calls after close fail with ErrClosed", func(t *testing.T, h *harness) {
		_, c := h.enroll("dev-1")
		hash := h.token("dev-1", time.Hour)
		if err := h.s.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		s, ctx := h.s, h.ctx
		calls := []struct {
			name string
			call func() error
		}{
			{"CreateTokens", func() error { return s.CreateTokens(ctx, []registry.Token{h.newToken("dev-2", time.Hour)}, Operator) }},
			{"CheckToken", func() error { return s.CheckToken(ctx, "dev-1", hash, h.now) }},
			{"Enroll", func() error {
				_, err := s.Enroll(ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: h.cert("dev-1"), Time: h.now})
				return err
			}},
			{"Renew", func() error {
				_, err := s.Renew(ctx, registry.Renewal{DeviceID: "dev-1", OldSerial: c.Serial, Cert: h.cert("dev-1"), Time: h.now})
				return err
			}},
			{"RecordCertificate", func() error {
				x, _ := h.f.Identity(t, identity.Service(h.f.Issuer.TrustDomain, "svc"), 0)
				return s.RecordCertificate(ctx, CertRecord(x), registry.AuditEvent{Time: h.now, Actor: Operator, Action: registry.ActionCertIssue})
			}},
			{"RevokeDevice", func() error { _, err := s.RevokeDevice(ctx, "dev-1", 1, h.now, Operator); return err }},
			{"RevokeCertificate", func() error { _, err := s.RevokeCertificate(ctx, c.Serial, 1, h.now, Operator); return err }},
			{"Device", func() error { _, err := s.Device(ctx, "dev-1"); return err }},
			{"Devices", func() error { _, err := s.Devices(ctx, registry.DeviceFilter{}); return err }},
			{"Certificate", func() error { _, err := s.Certificate(ctx, c.Serial); return err }},
			{"Revocations", func() error { _, err := s.Revocations(ctx); return err }},
			{"Audit", func() error { _, err := s.Audit(ctx, registry.AuditFilter{}); return err }},
			{"AppendAudit", func() error {
				return s.AppendAudit(ctx, registry.AuditEvent{Time: h.now, Actor: "gateway", Action: "test.event"})
			}},
			{"NextCRLNumber", func() error { _, err := s.NextCRLNumber(ctx); return err }},
			{"TouchLastSeen", func() error { return s.TouchLastSeen(ctx, map[string]time.Time{"dev-1": h.now}) }},
			{"PruneTokens", func() error { _, err := s.PruneTokens(ctx, h.now); return err }},
			{"Backup", func() error { _, err := s.Backup(ctx, &bytes.Buffer{}); return err }},
		}
		for _, c := range calls {
			wantErr(t, c.name, c.call(), registry.ErrClosed)
		}
	}},
}
