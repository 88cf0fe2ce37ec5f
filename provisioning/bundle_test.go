package main

import (
	"bytes"
	"encoding/csv"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
)

// readBundle reads and checks one device's bundle directory.
func readBundle(t *testing.T, dir, id string) (map[string]string, string) {
	t.Helper()
	dev := filepath.Join(dir, id)
	for name, mode := range map[string]os.FileMode{"": 0o700, bundleConfig: 0o644, bundleCA: 0o644, bundleToken: 0o600} {
		fi, err := os.Stat(filepath.Join(dev, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s/%s mode %v, want %v", id, name, fi.Mode().Perm(), mode)
		}
	}
	raw, err := os.ReadFile(filepath.Join(dev, bundleConfig))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(raw, []byte("# fleetgate agent first-boot bundle for "+id)) {
		t.Errorf("agent.yaml does not start with its comment:\n%s", raw)
	}
	var cfg map[string]string
	if err := yaml.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("agent.yaml: %v\n%s", err, raw)
	}
	tok, err := os.ReadFile(filepath.Join(dev, bundleToken))
	if err != nil {
		t.Fatal(err)
	}
	return cfg, strings.TrimSpace(string(tok))
}

func TestBundleUsage(t *testing.T) {
	t.Parallel()
	dir := initDir(t)
	out := filepath.Join(t.TempDir(), "bundles")
	base := []string{"token", "create", "--count", "2", "--prefix", "s-", "--data-dir", dir, "--gateway", "https://" + closedAddr(t)}
	for _, tc := range []struct {
		name  string
		args  []string
		parts []string
	}{
		{"bundle without addresses", []string{"--bundle", out}, []string{"--bundle-gateway", "--bundle-mqtt"}},
		{"bundle without mqtt", []string{"--bundle", out, "--bundle-gateway", "https://gw:8443"}, []string{"--bundle-mqtt"}},
		{"gateway not https", []string{"--bundle", out, "--bundle-gateway", "http://gw:8443", "--bundle-mqtt", "gw:8883"}, []string{"--bundle-gateway", "https://HOST:PORT"}},
		{"gateway with a path", []string{"--bundle", out, "--bundle-gateway", "https://gw:8443/est", "--bundle-mqtt", "gw:8883"}, []string{"--bundle-gateway"}},
		{"mqtt without port", []string{"--bundle", out, "--bundle-gateway", "https://gw:8443", "--bundle-mqtt", "gw"}, []string{"--bundle-mqtt", "HOST:PORT"}},
		{"relative device path", []string{"--bundle", out, "--bundle-gateway", "https://gw:8443", "--bundle-mqtt", "gw:8883", "--bundle-path", "boot/fleetgate"}, []string{"--bundle-path"}},
		{"bundle flags without --bundle", []string{"--csv", filepath.Join(out, "x.csv"), "--bundle-mqtt", "gw:8883"}, []string{"--bundle-mqtt goes with --bundle"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			wantError(t, runCLI(t, append(base, tc.args...)...), exitUsage, tc.parts...)
		})
	}
	t.Run("existing device directory is found before minting", func(t *testing.T) {
		t.Parallel()
		b := filepath.Join(t.TempDir(), "b")
		if err := os.MkdirAll(filepath.Join(b, "s-0002"), 0o700); err != nil {
			t.Fatal(err)
		}
		r := runCLI(t, append(base, "--bundle", b, "--bundle-gateway", "https://gw:8443", "--bundle-mqtt", "gw:8883")...)
		wantError(t, r, exitFailure, filepath.Join(b, "s-0002"), "--force")
	})
	t.Run("missing parent directory is found before minting", func(t *testing.T) {
		t.Parallel()
		r := runCLI(t, append(base, "--bundle", filepath.Join(t.TempDir(), "no", "b"), "--bundle-gateway", "https://gw:8443", "--bundle-mqtt", "gw:8883")...)
		wantError(t, r, exitFailure, "--bundle")
	})
}

func TestBundleOutput(t *testing.T) {
	t.Parallel()
	dataDir := initDir(t)
	dir := filepath.Join(t.TempDir(), "line-3")
	o := &tokenOptions{bundle: dir, bundlePath: "/media/boot/fg", bundleGateway: "https://gw.example:8443", bundleMQTT: "gw.example:8883", batch: "line-3"}
	a := &app{dataDir: dataDir}
	// 007 is a device ID YAML would read as a number unless quoted.
	ids := []string{"sensor-0001", "007"}
	b, err := o.newBundleOutput(a, ids)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.check(); err != nil {
		t.Fatal(err)
	}
	exp := time.Now().Add(72 * time.Hour)
	toks := []adminapi.Token{{DeviceID: ids[0], Token: "tok-1", ExpiresAt: exp}, {DeviceID: ids[1], Token: "tok-2", ExpiresAt: exp}}
	if err := b.write(toks); err != nil {
		t.Fatal(err)
	}
	ca, _ := os.ReadFile(filepath.Join(dataDir, "ca.pem"))
	for i, id := range ids {
		cfg, tok := readBundle(t, dir, id)
		want := map[string]string{
			"device_id":  id,
			"gateway":    "https://gw.example:8443",
			"mqtt":       "gw.example:8883",
			"ca":         "/media/boot/fg/ca.pem",
			"token_file": "/media/boot/fg/token",
		}
		if len(cfg) != len(want) {
			t.Errorf("%s: agent.yaml has %v", id, cfg)
		}
		for k, v := range want {
			if cfg[k] != v {
				t.Errorf("%s: %s = %q, want %q", id, k, cfg[k], v)
			}
		}
		if tok != toks[i].Token {
			t.Errorf("%s: token %q", id, tok)
		}
		if got, _ := os.ReadFile(filepath.Join(dir, id, bundleCA)); !bytes.Equal(got, ca) {
			t.Errorf("%s: ca.pem is not the data dir's", id)
		}
	}
	// Quoted, so the agent's config parser reads text, not the number 7.
	if raw, _ := os.ReadFile(filepath.Join(dir, "007", bundleConfig)); !bytes.Contains(raw, []byte(`device_id: "007"`)) {
		t.Errorf("device ID 007 not quoted:\n%s", raw)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("bundle dir holds %d entries, want 2 (no temporary leftovers)", len(entries))
	}
	// Again without --force: refused; with it: replaced.
	if err := b.check(); err == nil {
		t.Error("existing bundles overwritten without --force")
	}
	b.force = true
	toks[0].Token = "tok-new"
	if err := b.check(); err != nil {
		t.Fatal(err)
	}
	if err := b.write(toks[:1]); err != nil {
		t.Fatal(err)
	}
	if _, tok := readBundle(t, dir, ids[0]); tok != "tok-new" {
		t.Errorf("token after --force: %q", tok)
	}
}

// TestBundleAgainstGateway mints a batch into bundles and a CSV on a real
// gateway and enrolls with a token read from a bundle.
func TestBundleAgainstGateway(t *testing.T) {
	t.Parallel()
	g := startGateway(t)
	dir := filepath.Join(t.TempDir(), "bundles")
	csvPath := filepath.Join(t.TempDir(), "line.csv")
	r := g.cli(t, "token", "create", "--batch", "line-7", "--count", "3", "--prefix", "pi-", "--ttl", "72h",
		"--csv", csvPath, "--bundle", dir, "--bundle-gateway", "https://factory.example:8443", "--bundle-mqtt", "factory.example:8883")
	wantOK(t, r)
	if !strings.Contains(r.stderr, "minted 3 tokens") || !strings.Contains(r.stderr, dir) {
		t.Errorf("summary: %s", r.stderr)
	}
	f, err := os.Open(csvPath)
	if err != nil {
		t.Fatal(err)
	}
	rows, _ := csv.NewReader(f).ReadAll()
	f.Close()
	for _, row := range rows[1:] {
		cfg, tok := readBundle(t, dir, row[0])
		if tok != row[1] || cfg["device_id"] != row[0] || cfg["token_file"] != defaultBundlePath+"/token" {
			t.Errorf("bundle of %s: %v, token %q; CSV says %q", row[0], cfg, tok, row[1])
		}
	}
	_, tok := readBundle(t, dir, "pi-0002")
	g.enroll(t, "pi-0002", tok)

	// One device: the bundle replaces printing the token.
	r = g.cli(t, "token", "create", "--device-id", "pi-single", "--bundle", dir,
		"--bundle-gateway", "https://factory.example:8443", "--bundle-mqtt", "factory.example:8883")
	wantOK(t, r)
	if _, tok := readBundle(t, dir, "pi-single"); tok == "" || strings.Contains(r.stdout, tok) {
		t.Errorf("single --bundle: stdout %q", r.stdout)
	}
}
