package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/est"
)

// TestBackupRestoreRoundTrip backs up a running gateway with the CLI,
// restores the copy offline into a fresh copy of the data dir (the disaster
// recovery path: CA files from their own safe place, registry from its
// backup) and starts a gateway on it: every device and revocation is back
// and the revoked certificate is still refused.
func TestBackupRestoreRoundTrip(t *testing.T) {
	g := newGateway(t)
	g.start(t)
	ctx := context.Background()
	estc := est.NewClient(g.estURL(), g.pool(t), nil)
	enroll := func(id string) enrolled {
		t.Helper()
		token := lastLine(g.prov(t, "token", "create", "--device-id", id))
		key, csr, err := newCSR(id)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := estc.SimpleEnroll(ctx, csr, id, token)
		if err != nil {
			t.Fatalf("enroll %s: %v", id, err)
		}
		return enrolled{cert: tls.Certificate{Certificate: [][]byte{cert.Raw, g.issuing(t).Raw}, PrivateKey: key, Leaf: cert}}
	}
	active, stolen := enroll("sensor-ok"), enroll("sensor-stolen")
	g.prov(t, "revoke", "sensor-stolen", "--reason", "keyCompromise")
	backup := filepath.Join(t.TempDir(), "registry.backup")
	g.prov(t, "backup", "--out", backup)

	// Restore is offline: refused while the gateway holds the registry.
	if _, errOut, code := runCode(t, "provisioning", "restore", "--from", backup, "--data-dir", g.dir); code != 1 || !strings.Contains(errOut, "stop the gateway first") {
		t.Fatalf("restore beside a running gateway: exit %d, %s", code, errOut)
	}
	// A device enrolled after the backup is lost with the old registry.
	enroll("sensor-late")
	g.proc.stop(10 * time.Second)

	fresh := &gateway{dir: filepath.Join(t.TempDir(), "restored"), mqtt: freeAddr(t), est: freeAddr(t), admin: freeAddr(t)}
	copyDataDir(t, g.dir, fresh.dir)
	out := run(t, "provisioning", "restore", "--from", backup, "--data-dir", fresh.dir)
	if !strings.Contains(out, "restored 2 devices (1 revoked) and 1 revoked certificate") {
		t.Errorf("restore said %q", out)
	}
	fresh.start(t)

	var list struct {
		Devices []struct {
			ID     string `json:"id"`
			Status string `json:"status"`
		} `json:"devices"`
	}
	if err := json.Unmarshal([]byte(fresh.prov(t, "devices", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, d := range list.Devices {
		got[d.ID] = d.Status
	}
	if len(got) != 2 || got["sensor-ok"] != "active" || got["sensor-stolen"] != "revoked" {
		t.Fatalf("devices after restore: %v", got)
	}
	if err := tryConnect(t, fresh, "sensor-stolen", stolen.cert); err == nil {
		t.Fatal("the revoked certificate connects after the restore")
	}
	if err := tryConnect(t, fresh, "sensor-ok", active.cert); err != nil {
		t.Fatalf("the active device cannot connect after the restore: %v", err)
	}
	crl, err := est.NewClient(fresh.estURL(), fresh.pool(t), nil).CRL(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(crl.RevokedCertificateEntries) != 1 || crl.RevokedCertificateEntries[0].SerialNumber.Cmp(stolen.cert.Leaf.SerialNumber) != 0 {
		t.Errorf("CRL after restore lists %d entries, want the stolen device's serial", len(crl.RevokedCertificateEntries))
	}
	audit := fresh.prov(t, "audit", "--json")
	if !strings.Contains(audit, "registry.restore") {
		t.Errorf("audit log does not record the restore:\n%s", audit)
	}
}

// copyDataDir copies a stopped gateway's data dir without its registry.
func copyDataDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "registry.db" || !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), data, info.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
}
