package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/gateway/authority"
	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
	"github.com/fleetgate/fleetgate/pkg/registry"
	"github.com/fleetgate/fleetgate/pkg/registry/boltdb"
)

// runGateway starts an in-process gateway on dir and returns it with a
// stop function (safe to call twice).
func runGateway(t *testing.T, dir string) (*testGateway, func()) {
	t.Helper()
	srv, err := server.New(context.Background(), server.Config{
		DataDir: dir, MQTTListen: "127.0.0.1:0", ESTListen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		t.Fatal(err)
	}
	stop := func() {
		if err := srv.Close(); err != nil {
			t.Errorf("close gateway: %v", err)
		}
	}
	t.Cleanup(stop)
	cas, err := pki.ReadCertsFile(pki.Layout{Dir: dir}.CABundle())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	return &testGateway{dir: dir, admin: "https://" + srv.Addr("admin"), est: "https://" + srv.Addr("est"), pool: pool}, stop
}

// registryWith writes a registry file in a temp dir holding the given
// devices, enrolled with certificates from issuer, the first of them
// revoked, and returns a backup of it.
func registryWith(t *testing.T, issuer *pki.Issuer, devices ...string) string {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	st, err := boltdb.Open(filepath.Join(dir, "registry.db"), boltdb.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ca, err := authority.New(ctx, authority.Config{Issuer: issuer, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	if len(devices) > 0 {
		grants, err := ca.CreateTokens(ctx, devices, 0, "", "operator:test")
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range grants {
			csr, err := x509.ParseCertificateRequest(pkitest.CSR(t, pkitest.Key(t), g.DeviceID))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ca.Enroll(ctx, g.DeviceID, g.Token, csr); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := ca.RevokeDevice(ctx, devices[0], 1, "operator:test"); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, "backup.db")
	var buf bytes.Buffer
	if _, err := st.Backup(ctx, &buf); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// ownIssuer is the issuing CA of a data dir made by provisioning init.
func ownIssuer(t *testing.T, dir string) *pki.Issuer {
	t.Helper()
	ca, err := pki.LoadIssuingCA(pki.Layout{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	return &pki.Issuer{CA: ca, TrustDomain: pki.DefaultTrustDomain}
}

// readRegistry lists the devices of the registry in dir and its audit actions.
func readRegistry(t *testing.T, dir string) (map[string]registry.DeviceStatus, []string) {
	t.Helper()
	st, err := boltdb.Open(pki.Layout{Dir: dir}.Registry(), boltdb.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Check(); err != nil {
		t.Fatal(err)
	}
	devs, err := st.Devices(context.Background(), registry.DeviceFilter{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]registry.DeviceStatus{}
	for _, d := range devs {
		out[d.ID] = d.Status
	}
	evs, err := st.Audit(context.Background(), registry.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, e := range evs {
		actions = append(actions, e.Action)
	}
	return out, actions
}

// TestRestoreRoundTrip backs up a running gateway with the CLI, changes
// the registry after the backup, stops the gateway and restores: the
// registry is the backup's again with the later revocations carried over,
// the old one is kept, and the restarted gateway serves it with CRL numbers
// that kept increasing.
func TestRestoreRoundTrip(t *testing.T) {
	ctx := context.Background()
	dir := initDir(t)
	l := pki.Layout{Dir: dir}
	g, stop := runGateway(t, dir)
	api := func(t *testing.T, url string) *adminapi.Client {
		conf, err := adminapi.OperatorTLS(l)
		if err != nil {
			t.Fatal(err)
		}
		return adminapi.NewClient(url, conf)
	}
	c := api(t, g.admin)
	toks, err := c.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: []string{"kept-1", "kept-2", "later", "later-revoked"}})
	if err != nil {
		t.Fatal(err)
	}
	serial := map[string]string{}
	enroll := func(i int) {
		cert := g.enroll(t, toks.Tokens[i].DeviceID, toks.Tokens[i].Token)
		serial[toks.Tokens[i].DeviceID] = pki.SerialHex(cert)
	}
	enroll(0)
	enroll(1)
	if _, err := c.Revoke(ctx, "kept-1", "keyCompromise"); err != nil {
		t.Fatal(err)
	}
	backup := filepath.Join(t.TempDir(), "backup.db")
	wantOK(t, runCLI(t, "backup", "--out", backup, "--data-dir", dir, "--gateway", g.admin))
	// After the backup: two more devices, one of them revoked, and the
	// revocation of a device the backup knows as active.
	enroll(2)
	enroll(3)
	if _, err := c.Revoke(ctx, "kept-2", "superseded"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Revoke(ctx, "later-revoked", "keyCompromise"); err != nil {
		t.Fatal(err)
	}

	r := runCLI(t, "restore", "--from", backup, "--data-dir", dir)
	wantError(t, r, exitFailure, "in use by a running gateway", "stop the gateway first")

	stop()
	lastCRL := publishedCRLNumber(l.CRL(), ownIssuer(t, dir).CA.Cert)
	if lastCRL == 0 {
		t.Fatal("the gateway left no readable crl.pem")
	}
	before, _ := os.ReadFile(l.Registry())
	r = runCLI(t, "restore", "--from", backup, "--data-dir", dir)
	wantOK(t, r)
	t.Logf("restore said:\n%s", r.stdout)
	for _, want := range []string{
		"restored 2 devices (2 revoked) and 3 revoked certificates",
		"carried over 2 revocations made after the backup",
		"warning: 1 device enrolled after the backup is not in the restored registry: later;",
		"registry.db.bak-", "start the gateway",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	baks, _ := filepath.Glob(l.Registry() + ".bak-*")
	if len(baks) != 1 {
		t.Fatalf("backups of the old registry: %v", baks)
	}
	if kept, _ := os.ReadFile(baks[0]); !bytes.Equal(kept, before) {
		t.Error("the replaced registry was not kept byte for byte")
	}
	if st, err := os.Stat(l.Registry()); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("restored registry: %v %v", st, err)
	}
	if leftovers, _ := filepath.Glob(l.Registry() + ".restore-*"); len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
	devs, actions := readRegistry(t, dir)
	if len(devs) != 2 || devs["kept-1"] != registry.StatusRevoked || devs["kept-2"] != registry.StatusRevoked {
		t.Errorf("restored devices %v", devs)
	}
	if !slices.Contains(actions, actionRestore) || !slices.Contains(actions, actionCarry) {
		t.Errorf("audit actions %v lack %s and %s", actions, actionRestore, actionCarry)
	}

	g2, _ := runGateway(t, dir)
	c2 := api(t, g2.admin)
	d, err := c2.Device(ctx, "kept-2")
	if err != nil || d.Status != "revoked" || d.RevocationReason != "superseded" || len(d.Certificates) != 1 || !d.Certificates[0].Revoked {
		t.Fatalf("device revoked after the backup: %+v %v", d, err)
	}
	crl, err := est.NewClient(g2.est, g2.pool, nil).CRL(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if crl.Number.Uint64() <= lastCRL {
		t.Errorf("CRL number %d after restore, the gateway had published %d", crl.Number, lastCRL)
	}
	listed := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		listed[e.SerialNumber.Text(16)] = true
	}
	for _, id := range []string{"kept-1", "kept-2", "later-revoked"} {
		if !listed[serial[id]] {
			t.Errorf("CRL after restore does not list %s's certificate", id)
		}
	}
	if listed[serial["later"]] || len(listed) != 3 {
		t.Errorf("CRL lists %d serials", len(listed))
	}
}

func TestRestoreRefusals(t *testing.T) {
	t.Parallel()
	dir := initDir(t)
	l := pki.Layout{Dir: dir}
	own := registryWith(t, ownIssuer(t, dir), "dev-1", "dev-2")
	foreign := registryWith(t, pkitest.NewDomain(t, pki.DefaultTrustDomain).Issuer, "dev-1")
	good, err := os.ReadFile(own)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		p := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The data dir's current registry, which no refusal may touch.
	if err := os.WriteFile(l.Registry(), good, 0o600); err != nil {
		t.Fatal(err)
	}
	noCA := t.TempDir()

	cases := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"no --from", []string{"restore", "--data-dir", dir}, exitUsage, []string{"--from FILE is required"}},
		{"missing backup file", []string{"restore", "--from", filepath.Join(t.TempDir(), "nope.db"), "--data-dir", dir}, exitFailure, []string{"no such file"}},
		{"garbage backup", []string{"restore", "--from", write("garbage.db", bytes.Repeat([]byte("not a registry "), 1000)), "--data-dir", dir}, exitFailure, []string{"not a sound registry", "nothing changed"}},
		{"truncated backup", []string{"restore", "--from", write("short.db", good[:len(good)/2]), "--data-dir", dir}, exitFailure, []string{"not a sound registry"}},
		{"empty backup", []string{"restore", "--from", write("empty.db", nil), "--data-dir", dir}, exitFailure, []string{"not a sound registry"}},
		{"backup of another CA's registry", []string{"restore", "--from", foreign, "--data-dir", dir}, exitFailure, []string{"belongs to another CA", "dev-1", "--force"}},
		{"the registry onto itself", []string{"restore", "--from", l.Registry(), "--data-dir", dir}, exitFailure, []string{"is the registry itself"}},
		{"data dir without a CA", []string{"restore", "--from", own, "--data-dir", noCA}, exitFailure, []string{"holds no issuing CA"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			wantError(t, runCLI(t, tc.args...), tc.code, tc.want...)
			if now, _ := os.ReadFile(l.Registry()); !bytes.Equal(now, good) {
				t.Fatal("the registry changed")
			}
			if left, _ := filepath.Glob(l.Registry() + ".*"); len(left) != 0 {
				t.Fatalf("files left beside the registry: %v", left)
			}
			if _, err := os.Stat(filepath.Join(noCA, "registry.db")); err == nil {
				t.Fatal("restored into a data dir without a CA")
			}
		})
	}

	t.Run("registry held by another process", func(t *testing.T) {
		st, err := boltdb.Open(l.Registry(), boltdb.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		start := time.Now()
		wantError(t, runCLI(t, "restore", "--from", own, "--data-dir", dir), exitFailure, "in use by a running gateway", l.Registry())
		t.Logf("refused after %v", time.Since(start))
	})
}

func TestRestoreCases(t *testing.T) {
	t.Parallel()
	t.Run("into a data dir without a registry", func(t *testing.T) {
		dir := initDir(t)
		backup := registryWith(t, ownIssuer(t, dir), "dev-1")
		r := runCLI(t, "restore", "--from", backup, "--data-dir", dir)
		wantOK(t, r)
		if strings.Contains(r.stdout, ".bak-") {
			t.Errorf("mentions a kept registry that never existed: %q", r.stdout)
		}
		if devs, _ := readRegistry(t, dir); devs["dev-1"] != registry.StatusRevoked {
			t.Errorf("devices %v", devs)
		}
	})
	t.Run("over a damaged registry", func(t *testing.T) {
		dir := initDir(t)
		l := pki.Layout{Dir: dir}
		if err := os.WriteFile(l.Registry(), []byte("scribbled over"), 0o600); err != nil {
			t.Fatal(err)
		}
		r := runCLI(t, "restore", "--from", registryWith(t, ownIssuer(t, dir), "dev-1", "dev-2"), "--data-dir", dir)
		wantOK(t, r)
		if !strings.Contains(r.stdout, "could not be read") || !strings.Contains(r.stdout, "restored 2 devices (1 revoked)") {
			t.Errorf("output %q", r.stdout)
		}
		baks, _ := filepath.Glob(l.Registry() + ".bak-*")
		if len(baks) != 1 {
			t.Fatalf("kept registries %v", baks)
		}
		if data, _ := os.ReadFile(baks[0]); string(data) != "scribbled over" {
			t.Errorf("the damaged registry was not kept: %q", data)
		}
	})
	t.Run("another CA's backup with --force", func(t *testing.T) {
		dir := initDir(t)
		foreign := registryWith(t, pkitest.NewDomain(t, pki.DefaultTrustDomain).Issuer, "dev-1")
		r := runCLI(t, "restore", "--from", foreign, "--data-dir", dir, "--force")
		wantOK(t, r)
		if !strings.Contains(r.stdout, "warning: 1 device certificate not issued by") {
			t.Errorf("output %q", r.stdout)
		}
	})
	t.Run("twice in the same second keeps both old registries", func(t *testing.T) {
		dir := initDir(t)
		backup := registryWith(t, ownIssuer(t, dir), "dev-1")
		l := pki.Layout{Dir: dir}
		now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
		for i := range 3 {
			if _, err := restoreRegistry(context.Background(), l, backup, false, now); err != nil {
				t.Fatalf("restore %d: %v", i, err)
			}
		}
		if baks, _ := filepath.Glob(l.Registry() + ".bak-20300102T030405Z*"); len(baks) != 2 {
			t.Errorf("kept registries %v, want 2", baks)
		}
	})
	t.Run("an identity certificate is not a device", func(t *testing.T) {
		// Service and operator certificates live in the registry without a
		// device; the CA check looks at devices only.
		dir := initDir(t)
		is := ownIssuer(t, dir)
		st, err := boltdb.Open(filepath.Join(t.TempDir(), "r.db"), boltdb.Options{})
		if err != nil {
			t.Fatal(err)
		}
		ca, err := authority.New(context.Background(), authority.Config{Issuer: is, Store: st})
		if err != nil {
			t.Fatal(err)
		}
		csr, _ := x509.ParseCertificateRequest(pkitest.CSR(t, pkitest.Key(t), "backend"))
		if _, err := ca.IssueIdentity(context.Background(), identity.Service(is.TrustDomain, "backend"), csr, 0, "operator:test"); err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if _, err := st.Backup(context.Background(), &buf); err != nil {
			t.Fatal(err)
		}
		st.Close()
		path := filepath.Join(t.TempDir(), "b.db")
		if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		wantOK(t, runCLI(t, "restore", "--from", path, "--data-dir", dir))
	})
}
