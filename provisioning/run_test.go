package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// result is what one run of the CLI printed and returned.
type result struct {
	code           int
	stdout, stderr string
}

// lastLine is the last non-empty line of stdout.
func (r result) lastLine() string {
	lines := strings.Split(strings.TrimRight(r.stdout, "\n"), "\n")
	return lines[len(lines)-1]
}

func runCLI(t *testing.T, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr)
	return result{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

// wantOK fails the test unless the run succeeded.
func wantOK(t *testing.T, r result) {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("exit %d, want 0\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
}

// wantError checks the exit code and that stderr is exactly one line
// prefixed "provisioning: " that contains every part.
func wantError(t *testing.T, r result, code int, parts ...string) {
	t.Helper()
	t.Logf("stderr: %s", r.stderr)
	if r.code != code {
		t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.stdout, r.stderr)
	}
	if !strings.HasPrefix(r.stderr, "provisioning: ") || strings.Count(r.stderr, "\n") != 1 || !strings.HasSuffix(r.stderr, "\n") {
		t.Fatalf("stderr is not one line prefixed 'provisioning: ': %q", r.stderr)
	}
	for _, p := range parts {
		if !strings.Contains(r.stderr, p) {
			t.Errorf("stderr %q does not mention %q", r.stderr, p)
		}
	}
}

// initDir runs provisioning init in a fresh directory.
func initDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	wantOK(t, runCLI(t, "init", "--data-dir", dir, "--hosts", "localhost,127.0.0.1"))
	return dir
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"no command", nil, []string{"missing command"}},
		{"unknown command", []string{"frobnicate"}, []string{`unknown command "frobnicate"`}},
		{"group without subcommand", []string{"token"}, []string{"missing subcommand", "create"}},
		{"unknown subcommand", []string{"devices", "delete", "x"}, []string{`unknown command "delete"`}},
		{"unknown flag", []string{"token", "create", "--device-id", "x", "--bogus"}, []string{"unknown flag: --bogus", "token create --help"}},
		{"bad duration", []string{"token", "create", "--device-id", "x", "--ttl", "soon"}, []string{"--ttl"}},
		{"token without devices", []string{"token", "create"}, []string{"--device-id"}},
		{"token with two device sources", []string{"token", "create", "--device-id", "x", "--count", "3"}, []string{"--device-id and --count exclude each other"}},
		{"prefix without count", []string{"token", "create", "--device-ids", "a,b", "--prefix", "s-", "--csv", "f"}, []string{"--prefix goes with --count"}},
		{"invalid device id", []string{"token", "create", "--device-id", "Sensor_1"}, []string{"--device-id", "invalid name"}},
		{"invalid id in list", []string{"token", "create", "--device-ids", "a,B", "--csv", "f"}, []string{"--device-ids", `"B"`}},
		{"duplicate id in list", []string{"token", "create", "--device-ids", "a,b,a", "--csv", "f"}, []string{"listed twice"}},
		{"batch without destination", []string{"token", "create", "--count", "3", "--prefix", "s-"}, []string{"--csv FILE"}},
		{"count too wide for digits", []string{"token", "create", "--count", "100", "--digits", "2", "--prefix", "s-", "--csv", "f"}, []string{"does not fit in 2 digits"}},
		{"zero count", []string{"token", "create", "--count", "0", "--csv", "f"}, []string{"--count 0"}},
		{"negative ttl", []string{"token", "create", "--device-id", "x", "--ttl", "-1h"}, []string{"--ttl"}},
		{"multi-line batch label", []string{"token", "create", "--device-id", "x", "--batch", "a\nb"}, []string{"--batch"}},
		{"revoke without id", []string{"revoke"}, []string{"missing ID"}},
		{"revoke two ids", []string{"revoke", "a", "b"}, []string{`unexpected argument "b"`}},
		{"revoke unknown reason", []string{"revoke", "sensor-1", "--reason", "stolen"}, []string{`"stolen"`, "keyCompromise", "cessationOfOperation"}},
		{"revoke invalid id", []string{"revoke", "../etc"}, []string{"device ID"}},
		{"show without id", []string{"devices", "show"}, []string{"missing ID"}},
		{"list bad status", []string{"devices", "list", "--status", "lost"}, []string{"--status"}},
		{"cert issue bad role", []string{"cert", "issue", "--role", "device", "--name", "x", "--out", dir}, []string{`--role "device"`}},
		{"cert issue without name", []string{"cert", "issue", "--out", dir}, []string{"--name"}},
		{"cert issue without out", []string{"cert", "issue", "--name", "ingest"}, []string{"--out"}},
		{"cert revoke bad serial", []string{"cert", "revoke", "xyz"}, []string{"hexadecimal"}},
		{"audit bad limit", []string{"audit", "--limit", "-3"}, []string{"--limit"}},
		{"backup without out", []string{"backup"}, []string{"--out"}},
		{"init without hosts", []string{"init", "--data-dir", dir}, []string{"--hosts"}},
		{"init bad key", []string{"init", "--data-dir", dir, "--hosts", "localhost", "--ca-key", "rsa"}, []string{"--ca-key"}},
		{"init bad trust domain", []string{"init", "--data-dir", dir, "--hosts", "localhost", "--trust-domain", "Fleet!"}, []string{"--trust-domain"}},
		{"gateway not https", []string{"devices", "list", "--gateway", "http://localhost:9443"}, []string{"https only"}},
		{"zero timeout", []string{"devices", "list", "--timeout", "0s"}, []string{"--timeout"}},
		{"version with argument", []string{"version", "now"}, []string{`unexpected argument "now"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := runCLI(t, tt.args...)
			wantError(t, r, exitUsage, tt.want...)
			if r.stdout != "" {
				t.Errorf("stdout not empty: %q", r.stdout)
			}
		})
	}
	// Usage errors are refused before anything touches the disk.
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("usage errors wrote %d files into %s", len(entries), dir)
	}
}

func TestHelpAndVersion(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--help"}, {"token", "create", "--help"}, {"help", "revoke"}} {
		r := runCLI(t, args...)
		wantOK(t, r)
		if !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("%v: no usage on stdout: %q", args, r.stdout)
		}
	}
	r := runCLI(t, "version")
	wantOK(t, r)
	if !strings.HasPrefix(r.stdout, "provisioning ") {
		t.Errorf("version printed %q", r.stdout)
	}
}

func TestInit(t *testing.T) {
	t.Parallel()

	t.Run("writes the CA, server and operator certificates", func(t *testing.T) {
		t.Parallel()
		dir := filepath.Join(t.TempDir(), "data")
		r := runCLI(t, "init", "--data-dir", dir, "--hosts", "gw.example,10.0.0.5", "--trust-domain", "acme.test", "--operator", "ops", "--ca-key", "p384")
		wantOK(t, r)
		l := pki.Layout{Dir: dir}
		for _, want := range []string{l.CABundle(), l.RootKey(), "offline", l.OperatorCert()} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("summary does not mention %q:\n%s", want, r.stdout)
			}
		}
		op, err := pki.ReadCertsFile(l.OperatorCert())
		if err != nil {
			t.Fatal(err)
		}
		id, err := identity.FromCertificate(op[0], "acme.test")
		if err != nil || id.Role != identity.RoleOperator || id.Name != "ops" {
			t.Errorf("operator identity %v, %v", id, err)
		}
		srv, err := pki.ReadCertsFile(l.ServerCert())
		if err != nil {
			t.Fatal(err)
		}
		if err := srv[0].VerifyHostname("gw.example"); err != nil {
			t.Error(err)
		}
		if err := srv[0].VerifyHostname("10.0.0.5"); err != nil {
			t.Error(err)
		}
		for _, key := range []string{l.IssuingKey(), l.RootKey(), l.OperatorKey(), l.ServerKey()} {
			if err := pki.CheckKeyFileMode(key); err != nil {
				t.Error(err)
			}
		}
	})

	t.Run("refuses to overwrite a CA", func(t *testing.T) {
		t.Parallel()
		dir := initDir(t)
		before, _ := os.ReadFile(pki.Layout{Dir: dir}.IssuingKey())
		r := runCLI(t, "init", "--data-dir", dir, "--hosts", "localhost")
		wantError(t, r, exitFailure, dir, "already holds a CA")
		after, _ := os.ReadFile(pki.Layout{Dir: dir}.IssuingKey())
		if !bytes.Equal(before, after) {
			t.Error("issuing key changed")
		}
	})

	t.Run("root key written elsewhere and never overwritten", func(t *testing.T) {
		t.Parallel()
		base := t.TempDir()
		rootKey := filepath.Join(base, "offline", "root.key")
		wantOK(t, runCLI(t, "init", "--data-dir", filepath.Join(base, "a"), "--hosts", "localhost", "--root-key-out", rootKey))
		if _, err := os.Stat(pki.Layout{Dir: filepath.Join(base, "a")}.RootKey()); err == nil {
			t.Error("root key also left in the data directory")
		}
		if err := pki.CheckKeyFileMode(rootKey); err != nil {
			t.Fatal(err)
		}
		r := runCLI(t, "init", "--data-dir", filepath.Join(base, "b"), "--hosts", "localhost", "--root-key-out", rootKey)
		wantError(t, r, exitFailure, rootKey, "refusing to overwrite")
	})
}

func TestGatewayFailuresAreOneLine(t *testing.T) {
	t.Parallel()
	dir := initDir(t)

	t.Run("no operator certificate", func(t *testing.T) {
		t.Parallel()
		empty := t.TempDir()
		r := runCLI(t, "devices", "list", "--data-dir", empty)
		wantError(t, r, exitFailure, filepath.Join(empty, "operator.crt"), "provisioning init")
	})

	t.Run("connection refused", func(t *testing.T) {
		t.Parallel()
		url := "https://" + closedAddr(t)
		r := runCLI(t, "token", "create", "--device-id", "x", "--data-dir", dir, "--gateway", url)
		wantError(t, r, exitFailure, "cannot reach", url, "--gateway")
	})

	t.Run("silent server times out", func(t *testing.T) {
		t.Parallel()
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			// Accept and say nothing, like a wedged gateway.
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				defer c.Close()
			}
		}()
		url := "https://" + l.Addr().String()
		r := runCLI(t, "devices", "list", "--data-dir", dir, "--gateway", url, "--timeout", "300ms")
		wantError(t, r, exitFailure, url, "did not answer within 300ms", "--timeout")
	})
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestBaseURL(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in, want string
		usage    bool
	}{
		{in: "https://gw:9443", want: "https://gw:9443"},
		{in: "https://gw:9443/", want: "https://gw:9443"},
		{in: "gw:9443", want: "https://gw:9443"},
		{in: "http://gw:9443", usage: true},
		{in: "https://", usage: true},
		{in: "", usage: true},
	}
	for _, tt := range tests {
		got, err := baseURL(tt.in)
		var ue *usageError
		if tt.usage {
			if !errors.As(err, &ue) {
				t.Errorf("baseURL(%q) = %q, %v; want a usage error", tt.in, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("baseURL(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestNormalizeSerial(t *testing.T) {
	t.Parallel()
	tests := map[string]string{
		"46F75849732593A90DEE1697940E51F4": "46f75849732593a90dee1697940e51f4",
		"00:46:f7:58":                      "46f758",
		"0x0abc":                           "abc",
	}
	for in, want := range tests {
		if got, err := normalizeSerial(in); err != nil || got != want {
			t.Errorf("normalizeSerial(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "00", "xyz", "12 34"} {
		if _, err := normalizeSerial(bad); err == nil {
			t.Errorf("normalizeSerial(%q) accepted", bad)
		}
	}
}

func TestTimeFormatting(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name, got, want string
	}{
		{"never seen", ago(now, time.Time{}), "never"},
		{"just now", ago(now, now.Add(-3*time.Second)), "just now"},
		{"minutes", ago(now, now.Add(-5*time.Minute)), "5m ago"},
		{"hours", ago(now, now.Add(-30*time.Hour)), "30h ago"},
		{"days", ago(now, now.Add(-10*24*time.Hour)), "10d ago"},
		{"years", ago(now, now.Add(-3*365*24*time.Hour)), "3y ago"},
		{"expiry rounds", expires(now, now.Add(24*time.Hour-time.Millisecond)), "in 24h"},
		{"expiry days", expires(now, now.Add(29*24*time.Hour)), "in 29d"},
		{"expired", expires(now, now.Add(-48*time.Hour)), "expired 2d ago"},
		{"no certificate", expires(now, time.Time{}), "-"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, tt.got, tt.want)
		}
	}
}

// checkCertFile reads a PEM chain and returns its leaf.
func checkCertFile(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	certs, err := pki.ReadCertsFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0]
}
