package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// testGateway is a real gateway on loopback ports chosen at run time, over
// a data directory made by provisioning init.
type testGateway struct {
	dir   string
	admin string // https://127.0.0.1:port of the admin API
	est   string // https://127.0.0.1:port of EST
	pool  *x509.CertPool
}

func startGateway(t *testing.T) *testGateway {
	t.Helper()
	dir := initDir(t)
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := server.New(ctx, server.Config{
		DataDir:     dir,
		MQTTListen:  "127.0.0.1:0",
		ESTListen:   "127.0.0.1:0",
		AdminListen: "127.0.0.1:0",
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("close gateway: %v", err)
		}
		cancel()
	})
	cas, err := pki.ReadCertsFile(pki.Layout{Dir: dir}.CABundle())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	return &testGateway{dir: dir, admin: "https://" + srv.Addr("admin"), est: "https://" + srv.Addr("est"), pool: pool}
}

// cli runs the CLI against the gateway, with the global flags after the
// subcommand as the external contract writes them.
func (g *testGateway) cli(t *testing.T, args ...string) result {
	t.Helper()
	return runCLI(t, append(args, "--data-dir", g.dir, "--gateway", g.admin)...)
}

// enroll trades a token and a fresh key's CSR for a device certificate
// over EST, as an agent does.
func (g *testGateway) enroll(t *testing.T, id, token string) *x509.Certificate {
	t.Helper()
	key := pkitest.Key(t)
	cert, err := est.NewClient(g.est, g.pool, nil).SimpleEnroll(context.Background(), pkitest.CSR(t, key, id), id, token)
	if err != nil {
		t.Fatalf("enroll %s: %v", id, err)
	}
	return cert
}

func decodeJSON[T any](t *testing.T, r result) T {
	t.Helper()
	wantOK(t, r)
	var v T
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, r.stdout)
	}
	return v
}

func TestAgainstGateway(t *testing.T) {
	t.Parallel()
	g := startGateway(t)
	var (
		token42   string
		csvTokens = map[string]string{}
	)

	t.Run("token create prints the token alone on the last line", func(t *testing.T) {
		r := g.cli(t, "token", "create", "--device-id", "sensor-0042")
		wantOK(t, r)
		token42 = r.lastLine()
		if len(token42) < 22 || strings.ContainsAny(token42, " \t") {
			t.Fatalf("token %q: want at least 22 characters, no blanks", token42)
		}
		if !strings.Contains(r.stderr, "sensor-0042") {
			t.Errorf("stderr does not name the device: %q", r.stderr)
		}
	})

	t.Run("global flags before the subcommand", func(t *testing.T) {
		r := runCLI(t, "--data-dir", g.dir, "--gateway", g.admin, "token", "create", "--device-id", "sensor-0043", "--ttl", "1h", "--json")
		resp := decodeJSON[adminapi.TokenResponse](t, r)
		if len(resp.Tokens) != 1 || resp.Tokens[0].DeviceID != "sensor-0043" || resp.Tokens[0].Token == "" {
			t.Errorf("answer %+v", resp)
		}
	})

	t.Run("batch to CSV", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "line-3.csv")
		r := g.cli(t, "token", "create", "--batch", "line-3", "--count", "5", "--prefix", "sensor-", "--ttl", "72h", "--csv", path)
		wantOK(t, r)
		if !strings.Contains(r.stderr, "minted 5 tokens") || !strings.Contains(r.stderr, path) {
			t.Errorf("summary %q", r.stderr)
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("CSV mode %04o, want 0600", st.Mode().Perm())
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		rows, err := csv.NewReader(f).ReadAll()
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != 6 || strings.Join(rows[0], ",") != "device_id,token,expires_at" {
			t.Fatalf("CSV rows %v", rows)
		}
		for i, row := range rows[1:] {
			if want := []string{"sensor-0001", "sensor-0002", "sensor-0003", "sensor-0004", "sensor-0005"}[i]; row[0] != want {
				t.Errorf("row %d device %s, want %s", i+1, row[0], want)
			}
			csvTokens[row[0]] = row[1]
		}
	})

	t.Run("batch larger than one request", func(t *testing.T) {
		if testing.Short() {
			t.Skip("mints more than 10000 tokens")
		}
		path := filepath.Join(t.TempDir(), "big.csv")
		n := adminapi.MaxTokensPerRequest + 1
		r := g.cli(t, "token", "create", "--count", strconv.Itoa(n), "--prefix", "bulk-", "--digits", "5", "--csv", path)
		wantOK(t, r)
		if !strings.Contains(r.stderr, fmt.Sprintf("minted %d/%d tokens", adminapi.MaxTokensPerRequest, n)) {
			t.Errorf("no progress on stderr: %q", r.stderr)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if lines := strings.Count(string(data), "\n"); lines != n+1 {
			t.Errorf("%d CSV lines, want %d", lines, n+1)
		}
	})

	t.Run("batch from an ID file as JSON", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "ids.txt")
		if err := os.WriteFile(path, []byte("# order 17\npi-a\npi-b # spare\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		resp := decodeJSON[adminapi.TokenResponse](t, g.cli(t, "token", "create", "--device-ids-file", path, "--json"))
		if len(resp.Tokens) != 2 || resp.Tokens[1].DeviceID != "pi-b" {
			t.Errorf("answer %+v", resp)
		}
	})

	t.Run("empty device list", func(t *testing.T) {
		list := decodeJSON[adminapi.DeviceList](t, g.cli(t, "devices", "list", "--json"))
		if list.Devices == nil || len(list.Devices) != 0 {
			t.Errorf("devices %#v, want an empty list", list.Devices)
		}
		r := g.cli(t, "devices", "list")
		wantOK(t, r)
		if r.stdout != "" || !strings.Contains(r.stderr, "no devices") {
			t.Errorf("stdout %q, stderr %q", r.stdout, r.stderr)
		}
	})

	var cert42 *x509.Certificate
	t.Run("enrolled devices show up", func(t *testing.T) {
		cert42 = g.enroll(t, "sensor-0042", token42)
		for _, id := range []string{"sensor-0001", "sensor-0002", "sensor-0003"} {
			g.enroll(t, id, csvTokens[id])
		}

		r := g.cli(t, "devices", "list")
		wantOK(t, r)
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		if len(lines) != 5 || !strings.HasPrefix(lines[0], "ID") || !strings.Contains(lines[0], "CERT EXPIRES") {
			t.Fatalf("table:\n%s", r.stdout)
		}
		if !strings.HasPrefix(lines[4], "sensor-0042") || !strings.Contains(lines[4], "active") || !strings.Contains(lines[4], "in 30d") {
			t.Errorf("row %q", lines[4])
		}

		// One device per page: the CLI follows the cursor to the end.
		list := decodeJSON[adminapi.DeviceList](t, g.cli(t, "devices", "list", "--json", "--page-size", "1"))
		if len(list.Devices) != 4 || list.Next != "" {
			t.Fatalf("%d devices (next %q), want all 4", len(list.Devices), list.Next)
		}
		list = decodeJSON[adminapi.DeviceList](t, g.cli(t, "devices", "list", "--json", "--prefix", "sensor-004"))
		if len(list.Devices) != 1 || list.Devices[0].ID != "sensor-0042" || list.Devices[0].CurrentSerial != pki.SerialHex(cert42) {
			t.Errorf("prefix listing %+v", list.Devices)
		}
	})

	t.Run("devices show", func(t *testing.T) {
		d := decodeJSON[adminapi.DeviceDetail](t, g.cli(t, "devices", "show", "sensor-0042", "--json"))
		if len(d.Certificates) != 1 || d.Certificates[0].Serial != pki.SerialHex(cert42) || d.Certificates[0].Revoked {
			t.Errorf("certificates %+v", d.Certificates)
		}
		r := g.cli(t, "devices", "show", "sensor-0042")
		wantOK(t, r)
		for _, want := range []string{"sensor-0042", "active", pki.SerialHex(cert42), "SERIAL"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("show does not mention %q:\n%s", want, r.stdout)
			}
		}
		wantError(t, g.cli(t, "devices", "show", "sensor-9999"), exitFailure, "no device sensor-9999")
	})

	t.Run("revoke", func(t *testing.T) {
		r := g.cli(t, "revoke", "sensor-0042", "--reason", "keycompromise")
		wantOK(t, r)
		if !strings.HasPrefix(r.stdout, "revoked sensor-0042 (keyCompromise): 1 certificate revoked") || !strings.Contains(r.stdout, "CRL #") {
			t.Errorf("revoke said %q", r.stdout)
		}
		list := decodeJSON[adminapi.DeviceList](t, g.cli(t, "devices", "list", "--status", "revoked", "--json"))
		if len(list.Devices) != 1 || list.Devices[0].ID != "sensor-0042" || list.Devices[0].Status != "revoked" {
			t.Errorf("revoked devices %+v", list.Devices)
		}
		d := decodeJSON[adminapi.DeviceDetail](t, g.cli(t, "devices", "show", "sensor-0042", "--json"))
		if !d.Certificates[0].Revoked || d.RevocationReason != "keyCompromise" {
			t.Errorf("device after revoke %+v", d)
		}

		r = g.cli(t, "revoke", "sensor-0042", "--reason", "keyCompromise")
		wantOK(t, r)
		if !strings.Contains(r.stdout, "already revoked at") {
			t.Errorf("second revoke said %q", r.stdout)
		}
		res := decodeJSON[adminapi.RevokeResponse](t, g.cli(t, "revoke", "sensor-0042", "--json"))
		if !res.AlreadyRevoked {
			t.Errorf("JSON answer %+v", res)
		}

		wantError(t, g.cli(t, "revoke", "sensor-9999"), exitFailure, "no device sensor-9999")
		wantError(t, g.cli(t, "token", "create", "--device-id", "sensor-0042"), exitFailure, "409", "revoked")
	})

	t.Run("cert issue", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "certs")
		r := g.cli(t, "cert", "issue", "--role", "service", "--name", "ingest", "--out", out)
		wantOK(t, r)
		certPath, keyPath := filepath.Join(out, "ingest.crt"), filepath.Join(out, "ingest.key")
		st, err := os.Stat(keyPath)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("key mode %04o, want 0600", st.Mode().Perm())
		}
		if st, err := os.Stat(out); err != nil || st.Mode().Perm() != 0o700 {
			t.Errorf("out dir: %v, mode %04o", err, st.Mode().Perm())
		}
		leaf := checkCertFile(t, certPath)
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://fleetgate.local/service/ingest" {
			t.Errorf("URI SANs %v", leaf.URIs)
		}
		id, err := identity.FromCertificate(leaf, "fleetgate.local")
		if err != nil || id.Role != identity.RoleService {
			t.Errorf("identity %v, %v", id, err)
		}
		key, err := pki.ReadKeyFile(keyPath)
		if err != nil {
			t.Fatal(err)
		}
		if err := pki.KeyMatches(leaf, key); err != nil {
			t.Error(err)
		}
		if !strings.Contains(r.stdout, pki.SerialHex(leaf)) || !strings.Contains(r.stdout, certPath) {
			t.Errorf("output does not name serial and path:\n%s", r.stdout)
		}

		wantError(t, g.cli(t, "cert", "issue", "--role", "service", "--name", "ingest", "--out", out), exitFailure, "--force")
		wantOK(t, g.cli(t, "cert", "issue", "--role", "service", "--name", "ingest", "--out", out, "--force"))
		if again := checkCertFile(t, certPath); again.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
			t.Error("--force kept the old certificate")
		}

		r = g.cli(t, "cert", "revoke", strings.ToUpper(pki.SerialHex(leaf)), "--reason", "superseded")
		wantOK(t, r)
		if !strings.Contains(r.stdout, "revoked certificate "+pki.SerialHex(leaf)) {
			t.Errorf("cert revoke said %q", r.stdout)
		}
		wantError(t, g.cli(t, "cert", "revoke", "abcdef"), exitFailure, "no certificate with serial abcdef")
	})

	t.Run("audit", func(t *testing.T) {
		list := decodeJSON[adminapi.AuditList](t, g.cli(t, "audit", "--device", "sensor-0042", "--json"))
		actions := map[string]bool{}
		for _, e := range list.Events {
			if e.DeviceID != "sensor-0042" {
				t.Errorf("event of %s in a sensor-0042 query", e.DeviceID)
			}
			actions[e.Action] = true
		}
		if len(actions) < 3 {
			t.Errorf("actions %v: want token, enrollment and revocation", actions)
		}
		r := g.cli(t, "audit", "--limit", "2")
		wantOK(t, r)
		if lines := strings.Split(strings.TrimSpace(r.stdout), "\n"); len(lines) != 3 || !strings.HasPrefix(lines[0], "SEQ") {
			t.Errorf("audit table:\n%s", r.stdout)
		}
		if !strings.Contains(r.stderr, "--after 2") {
			t.Errorf("no hint at the next page: %q", r.stderr)
		}
	})

	t.Run("backup", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "registry.db")
		r := g.cli(t, "backup", "--out", path)
		wantOK(t, r)
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() == 0 || st.Mode().Perm() != 0o600 {
			t.Errorf("backup size %d, mode %04o", st.Size(), st.Mode().Perm())
		}
		if !strings.Contains(r.stdout, path) {
			t.Errorf("output %q", r.stdout)
		}
		leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".*tmp*"))
		if len(leftovers) != 0 {
			t.Errorf("temporary files left: %v", leftovers)
		}

		// A copy cut short still ends in a clean 200: the CLI must notice.
		good, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for name, body := range map[string][]byte{
			"truncated": good[:len(good)/2],
			"garbage":   []byte(strings.Repeat("not a registry ", 1000)),
		} {
			fake := fakeAdmin(t, g.dir, func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(body) })
			out := filepath.Join(t.TempDir(), "registry.db")
			r := runCLI(t, "backup", "--out", out, "--data-dir", g.dir, "--gateway", fake)
			wantError(t, r, exitFailure, "not a sound registry")
			if _, err := os.Stat(out); err == nil {
				t.Errorf("%s backup was kept", name)
			}
			if leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(out), ".*")); len(leftovers) != 0 {
				t.Errorf("%s backup left %v", name, leftovers)
			}
		}
	})

	t.Run("wrong CA bundle is a TLS error", func(t *testing.T) {
		other := initDir(t)
		r := g.cli(t, "devices", "list", "--ca", pki.Layout{Dir: other}.CABundle())
		wantError(t, r, exitFailure, "TLS", g.admin, "--ca")
	})

	t.Run("foreign operator certificate is refused", func(t *testing.T) {
		other := pki.Layout{Dir: initDir(t)}
		r := g.cli(t, "devices", "list", "--cert", other.OperatorCert(), "--key", other.OperatorKey())
		wantError(t, r, exitFailure, g.admin, "refused the operator certificate", "--cert")
	})
}

// fakeAdmin serves h over TLS with the gateway's server certificate from
// dir, standing in for a gateway that misbehaves.
func fakeAdmin(t *testing.T, dir string, h http.HandlerFunc) string {
	t.Helper()
	l := pki.Layout{Dir: dir}
	cert, err := tls.LoadX509KeyPair(l.ServerCert(), l.ServerKey())
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.URL
}
