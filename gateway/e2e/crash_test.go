package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/registry"
	"github.com/fleetgate/fleetgate/pkg/registry/boltdb"
)

// TestCrashConsistency runs an enrollment storm and a revocation stream
// against the real gateway binary, kills it with SIGKILL at random moments
// and restarts it on the same data dir and ports. After every kill (with
// the gateway down) and after the final stop the registry file must hold
// everything the gateway acknowledged, with tokens and devices consistent
// and bbolt's consistency check passing; on the running gateway every
// acknowledged revocation must still be enforced.
func TestCrashConsistency(t *testing.T) {
	const (
		cycles    = 5
		enrollers = 3
	)
	g := newGateway(t)
	g.start(t)
	ctx := context.Background()
	opTLS, err := adminapi.OperatorTLS(g.layout())
	if err != nil {
		t.Fatal(err)
	}
	api := adminapi.NewClient(g.adminURL(), opTLS)
	estc := est.NewClient(g.estURL(), g.pool(t), nil)
	l := newLedger()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range enrollers {
		wg.Go(func() { storm(t, w, stop, api, estc, l) })
	}
	wg.Go(func() { revocations(t, stop, api, l) })
	var once sync.Once
	stopLoad := func() {
		once.Do(func() {
			close(stop)
			wg.Wait()
		})
	}
	defer stopLoad() // no client goroutine may outlive a failed test

	checks := 0
	var lastCRL uint64
	for cycle := 1; cycle <= cycles; cycle++ {
		time.Sleep(time.Duration(300+mrand.IntN(900)) * time.Millisecond)
		if err := g.proc.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-g.proc.done
		snap := l.snapshot()
		n := checkRegistryFile(t, g.layout().Registry(), snap)
		checks += n
		t.Logf("cycle %d: killed with %d certificates and %d revocations acknowledged; %d invariant checks passed offline",
			cycle, len(snap.certs), len(snap.revoked), n)
		if t.Failed() {
			break
		}
		g.start(t)
		crl, err := estc.CRL(ctx)
		if err != nil {
			t.Fatalf("CRL after restart: %v", err)
		}
		if n := crl.Number.Uint64(); n <= lastCRL {
			t.Errorf("CRL number %d after restart %d, it was %d before", n, cycle, lastCRL)
		} else {
			lastCRL = n
		}
		checks++
	}
	time.Sleep(300 * time.Millisecond)
	stopLoad()
	if t.Failed() {
		return
	}

	// Online: the restarted gateway shows every certificate and enforces
	// every acknowledged revocation, in the handshake and in the CRL.
	snap := l.snapshot()
	if len(snap.certs) < 10 || len(snap.revoked) < 3 {
		t.Fatalf("the storm acknowledged only %d enrollments and %d revocations", len(snap.certs), len(snap.revoked))
	}
	for id, e := range snap.certs {
		d, err := api.Device(ctx, id)
		if err != nil {
			t.Errorf("device %s got a certificate but the gateway does not know it: %v", id, err)
			continue
		}
		if !slices.ContainsFunc(d.Certificates, func(c adminapi.Certificate) bool { return c.Serial == pki.SerialHex(e.cert.Leaf) }) {
			t.Errorf("device %s: certificate %s missing from %+v", id, pki.SerialHex(e.cert.Leaf), d.Certificates)
		}
		checks++
	}
	crl, err := estc.CRL(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := crl.CheckSignatureFrom(g.issuing(t)); err != nil {
		t.Fatalf("CRL signature: %v", err)
	}
	listed := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		listed[e.SerialNumber.Text(16)] = true
	}
	for id, serials := range snap.revoked {
		for _, s := range serials {
			if !listed[s] {
				t.Errorf("acknowledged revocation of %s (serial %s) missing from CRL %d", id, s, crl.Number)
			}
			checks++
		}
		if err := tryConnect(t, g, id, snap.certs[id].cert); err == nil {
			t.Errorf("revoked device %s connected over MQTT", id)
		}
		checks++
	}
	for id, e := range snap.certs {
		if _, revoked := snap.revoked[id]; !revoked {
			if err := tryConnect(t, g, id, e.cert); err != nil {
				t.Errorf("control: active device %s cannot connect: %v", id, err)
			}
			checks++
			break
		}
	}

	g.proc.stop(10 * time.Second)
	if code := g.proc.wait(t, time.Second); code != 0 {
		t.Errorf("gateway exit code %d after SIGTERM", code)
	}
	checks += checkRegistryFile(t, g.layout().Registry(), snap)
	l.mu.Lock()
	lost, repeated := l.lostAnswers, l.repeatedRevokes
	l.mu.Unlock()
	t.Logf("%d kill -9 cycles survived; %d enrollments and %d revocations acknowledged (%d enrollment answers and %d revocation answers lost in a kill); %d invariant checks, 0 violations",
		cycles, len(snap.certs), len(snap.revoked), lost, repeated, checks)
}

// enrolled is a certificate a client received, with its key.
type enrolled struct {
	cert tls.Certificate // Leaf set
	used time.Time       // when the client received it
}

// ledger is what clients were told: the ground truth the registry must
// match after a crash.
type ledger struct {
	mu      sync.Mutex
	tokens  map[string][]string // device ID → tokens minted (HTTP 201)
	certs   map[string]enrolled // device ID → certificate received (HTTP 200)
	revoked map[string][]string // device ID → serials of an acknowledged revocation (HTTP 200)
	pending []string            // enrolled devices to revoke
	// lostAnswers counts enrollments that committed while their answer
	// died with the gateway; repeatedRevokes revocations that did.
	lostAnswers, repeatedRevokes int
}

func newLedger() *ledger {
	return &ledger{tokens: map[string][]string{}, certs: map[string]enrolled{}, revoked: map[string][]string{}}
}

type snapshot struct {
	tokens  map[string][]string
	certs   map[string]enrolled
	revoked map[string][]string
}

func (l *ledger) snapshot() snapshot {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := snapshot{tokens: map[string][]string{}, certs: map[string]enrolled{}, revoked: map[string][]string{}}
	for k, v := range l.tokens {
		s.tokens[k] = slices.Clone(v)
	}
	for k, v := range l.certs {
		s.certs[k] = v
	}
	for k, v := range l.revoked {
		s.revoked[k] = slices.Clone(v)
	}
	return s
}

// stopped reports whether stop is closed.
func stopped(stop <-chan struct{}) bool {
	select {
	case <-stop:
		return true
	default:
		return false
	}
}

// retryAfter reports whether err is the gateway being away (killed,
// restarting) or asking to come back later (429, 503) rather than an
// answer, and how long to wait before trying again.
func retryAfter(err error) (time.Duration, bool) {
	const pause = 20 * time.Millisecond
	var estErr *est.Error
	var apiErr *adminapi.Error
	switch {
	case err == nil:
		return 0, false
	case errors.As(err, &estErr):
		return max(pause, estErr.RetryAfter), estErr.Temporary()
	case errors.As(err, &apiErr):
		return pause, apiErr.StatusCode == http.StatusTooManyRequests || apiErr.StatusCode == http.StatusServiceUnavailable
	}
	return pause, true
}

// storm enrolls new devices one after another: mint a token through the
// admin API, then trade it and a CSR over EST, retrying both across
// gateway restarts.
func storm(t *testing.T, worker int, stop <-chan struct{}, api *adminapi.Client, estc *est.Client, l *ledger) {
	for i := 0; !stopped(stop); i++ {
		id := fmt.Sprintf("crash-%d-%d", worker, i)
		var token string
		for token == "" && !stopped(stop) {
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			resp, err := api.CreateTokens(rctx, adminapi.TokenRequest{DeviceIDs: []string{id}})
			cancel()
			switch {
			case err == nil:
				token = resp.Tokens[0].Token
				l.mu.Lock()
				l.tokens[id] = append(l.tokens[id], token)
				l.mu.Unlock()
			default:
				if wait, ok := retryAfter(err); ok {
					time.Sleep(wait)
					continue
				}
				t.Errorf("mint token for %s: %v", id, err)
				return
			}
		}
		key, csr, err := newCSR(id)
		if err != nil {
			t.Error(err)
			return
		}
		for token != "" && !stopped(stop) {
			rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			cert, err := estc.SimpleEnroll(rctx, csr, id, token)
			cancel()
			wait, again := retryAfter(err)
			switch {
			case err == nil:
				l.mu.Lock()
				l.certs[id] = enrolled{cert: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}, used: time.Now()}
				if i%3 == 0 {
					l.pending = append(l.pending, id)
				}
				l.mu.Unlock()
				token = ""
			case again:
				time.Sleep(wait)
			case est.IsStatus(err, http.StatusUnauthorized):
				// The enrollment committed but its answer died with the
				// gateway: the device exists, this client never learns
				// its certificate. Allowed; the registry check covers it.
				l.mu.Lock()
				l.lostAnswers++
				l.mu.Unlock()
				token = ""
			default:
				t.Errorf("enroll %s: %v", id, err)
				return
			}
		}
	}
}

// revocations revokes every third enrolled device, retrying across
// gateway restarts until the revocation is acknowledged.
func revocations(t *testing.T, stop <-chan struct{}, api *adminapi.Client, l *ledger) {
	for !stopped(stop) {
		l.mu.Lock()
		var id string
		if len(l.pending) > 0 {
			id, l.pending = l.pending[0], l.pending[1:]
		}
		serial := ""
		if id != "" {
			serial = pki.SerialHex(l.certs[id].cert.Leaf)
		}
		l.mu.Unlock()
		if id == "" {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		for !stopped(stop) {
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			res, err := api.Revoke(rctx, id, "keyCompromise")
			cancel()
			if wait, again := retryAfter(err); again {
				time.Sleep(wait)
				continue
			}
			if err != nil {
				t.Errorf("revoke %s: %v", id, err)
				return
			}
			// A repeated revocation (the first answer died with the
			// gateway) lists no serials: the device's one certificate is
			// what was revoked.
			serials := res.RevokedSerials
			if res.AlreadyRevoked {
				serials = []string{serial}
				l.mu.Lock()
				l.repeatedRevokes++
				l.mu.Unlock()
			}
			if !slices.Contains(serials, serial) {
				t.Errorf("revoke %s: serials %v lack its certificate %s", id, serials, serial)
			}
			l.mu.Lock()
			l.revoked[id] = serials
			l.mu.Unlock()
			break
		}
	}
}

func newCSR(id string) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}}, key)
	return key, csr, err
}

// checkRegistryFile opens a stopped gateway's registry read-only and
// checks it against what clients were told, and against itself. It
// returns the number of checks made.
func checkRegistryFile(t *testing.T, path string, s snapshot) int {
	t.Helper()
	ctx := context.Background()
	checks := 0
	st, err := boltdb.Open(path, boltdb.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("open registry after the gateway stopped: %v", err)
	}
	defer st.Close()
	if err := st.Check(); err != nil {
		t.Errorf("bbolt consistency check: %v", err)
	}
	checks++

	devs, err := st.Devices(ctx, registry.DeviceFilter{})
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]registry.Device{}
	for _, d := range devs {
		byID[d.ID] = d
	}
	revs, err := st.Revocations(ctx)
	if err != nil {
		t.Fatal(err)
	}
	revoked := map[string]bool{}
	for _, r := range revs {
		revoked[r.Serial] = true
	}

	// Every certificate a client received is in the registry, bound to
	// its device.
	for id, e := range s.certs {
		serial := pki.SerialHex(e.cert.Leaf)
		c, err := st.Certificate(ctx, serial)
		switch {
		case err != nil:
			t.Errorf("certificate %s received by %s is not in the registry: %v", serial, id, err)
		case c.DeviceID != id || !bytes.Equal(c.DER, e.cert.Leaf.Raw):
			t.Errorf("certificate %s of %s recorded as %+v", serial, id, c.DeviceID)
		case !slices.Contains(byID[id].Serials, serial):
			t.Errorf("device %s does not list its certificate %s: %+v", id, serial, byID[id])
		}
		checks++
	}
	// Every acknowledged revocation is there.
	for id, serials := range s.revoked {
		if byID[id].Status != registry.StatusRevoked {
			t.Errorf("device %s: revocation acknowledged, registry says %q", id, byID[id].Status)
		}
		for _, serial := range serials {
			if !revoked[serial] {
				t.Errorf("device %s: acknowledged revocation of %s missing", id, serial)
			}
		}
		checks++
	}
	// The registry agrees with itself: each device's certificates exist,
	// and a revoked device has every certificate revoked.
	for _, d := range devs {
		for _, serial := range d.Serials {
			if c, err := st.Certificate(ctx, serial); err != nil || c.DeviceID != d.ID {
				t.Errorf("device %s lists certificate %s: %+v %v", d.ID, serial, c.DeviceID, err)
			}
			if d.Status == registry.StatusRevoked && !revoked[serial] {
				t.Errorf("revoked device %s keeps certificate %s unrevoked", d.ID, serial)
			}
		}
		if !slices.Contains(d.Serials, d.CurrentSerial) {
			t.Errorf("device %s: current serial %s not among %v", d.ID, d.CurrentSerial, d.Serials)
		}
		enrolls, err := st.Audit(ctx, registry.AuditFilter{DeviceID: d.ID})
		if err != nil {
			t.Fatal(err)
		}
		var nEnroll, nRevoke int
		for _, ev := range enrolls {
			switch ev.Action {
			case registry.ActionEnroll:
				nEnroll++
			case registry.ActionRevoke:
				nRevoke++
			}
		}
		wantRevoke := 0
		if d.Status == registry.StatusRevoked {
			wantRevoke = 1
		}
		if nEnroll != 1 || nRevoke != wantRevoke {
			t.Errorf("device %s (%s): %d enroll and %d revoke audit events", d.ID, d.Status, nEnroll, nRevoke)
		}
		checks += 3
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	return checks + checkTokens(t, path, s, byID)
}

// checkTokens reads the tokens bucket with bbolt directly (the Store
// interface lists no tokens): a token is used if and only if its device
// exists and was enrolled by it, and every minted token is still there.
func checkTokens(t *testing.T, path string, s snapshot, devs map[string]registry.Device) int {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	checks := 0
	used := map[string]int{}
	stored := map[string]bool{}
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("tokens"))
		if b == nil {
			return errors.New("no tokens bucket")
		}
		return b.ForEach(func(k, v []byte) error {
			var tok registry.Token
			if err := json.Unmarshal(v, &tok); err != nil {
				return fmt.Errorf("token %x: %w", k, err)
			}
			stored[string(k)] = true
			if tok.UsedAt.IsZero() {
				return nil
			}
			used[tok.DeviceID]++
			d, ok := devs[tok.DeviceID]
			switch {
			case !ok:
				t.Errorf("token of %s consumed, but no such device", tok.DeviceID)
			case !d.EnrolledAt.Equal(tok.UsedAt):
				t.Errorf("token of %s consumed at %v, device enrolled at %v", tok.DeviceID, tok.UsedAt, d.EnrolledAt)
			}
			checks++
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	for id := range devs {
		if used[id] != 1 {
			t.Errorf("device %s exists with %d consumed tokens, want 1", id, used[id])
		}
		checks++
	}
	for id, toks := range s.tokens {
		for _, tok := range toks {
			if !stored[string(registry.HashToken(tok))] {
				t.Errorf("token minted for %s is gone", id)
			}
			checks++
		}
	}
	return checks
}
