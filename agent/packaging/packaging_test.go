package packaging

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/agent/config"
)

func TestDebianVersion(t *testing.T) {
	for in, want := range map[string]string{
		"v1.2.3":                   "1.2.3",
		"1.2.3":                    "1.2.3",
		"v1.2.3-rc.1":              "1.2.3~rc.1",
		"v1.2.3-rc1-dirty":         "1.2.3~rc1+dirty",
		"v1.2.3-4-gabc1234":        "1.2.3+git4.abc1234",
		"v1.2.3-4-gabc1234-dirty":  "1.2.3+git4.abc1234.dirty",
		"v1.2.3-rc.1-4-gabc1234":   "1.2.3~rc.1+git4.abc1234",
		"v2.0.0+build.7":           "2.0.0+build.7",
		"v2.0.0+build.7-dirty":     "2.0.0+build.7.dirty",
		"abc1234":                  "0.0.0~gitabc1234",
		"1234567":                  "0.0.0~git1234567",
		"abc1234-dirty":            "0.0.0~gitabc1234+dirty",
		"dev":                      "0.0.0~dev",
		"release_2024/x":           "0.0.0~release.2024.x",
		"v1.0_beta":                "1.0~beta",
		"  v3.1.4\n":               "3.1.4",
		"v10.20.30-123-g0123abcd9": "10.20.30+git123.0123abcd9",
	} {
		got, err := DebianVersion(in)
		if err != nil || got != want {
			t.Errorf("DebianVersion(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := DebianVersion(" "); err == nil {
		t.Error("empty version accepted")
	}
	// Versions that must sort in build order, checked with dpkg itself.
	if _, err := exec.LookPath("dpkg"); err == nil {
		order := []string{"0.0.0~gitabc1234", "1.2.3~rc.1", "1.2.3~rc.1+git4.abc1234", "1.2.3", "1.2.3+dirty", "1.2.3+git4.abc1234", "1.2.4"}
		for i := 1; i < len(order); i++ {
			if err := exec.Command("dpkg", "--compare-versions", order[i-1], "lt", order[i]).Run(); err != nil {
				t.Errorf("dpkg does not sort %s before %s", order[i-1], order[i])
			}
		}
	}
}

// uncomment turns the shipped agent.yaml's "#key: value" lines into YAML.
func uncomment(t *testing.T) []byte {
	t.Helper()
	data, err := Source("agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	key := regexp.MustCompile(`^#([a-z_]+): `)
	var out bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if line := sc.Text(); key.MatchString(line) {
			out.WriteString(line[1:] + "\n")
		}
	}
	return out.Bytes()
}

// TestShippedConfig keeps /etc/fleetgate/agent.yaml in step with the
// agent: it parses, its keys are the agent's flags, every flag is there,
// and shown values are the defaults where there are defaults.
func TestShippedConfig(t *testing.T) {
	data, err := Source("agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if m, err := config.Parse(data, "agent.yaml"); err != nil || len(m) != 0 {
		t.Fatalf("shipped file sets %v (%v); everything in it should be commented out", m, err)
	}
	settings, err := config.Parse(uncomment(t), "agent.yaml (uncommented)")
	if err != nil {
		t.Fatal(err)
	}
	var c config.Config
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	c.Flags(fs)
	fs.VisitAll(func(f *flag.Flag) {
		if _, ok := settings[f.Name]; !ok && f.Name != "config" {
			t.Errorf("flag --%s is not in agent.yaml", f.Name)
		}
	})
	for name, v := range settings {
		f := fs.Lookup(name)
		if f == nil {
			t.Errorf("agent.yaml shows %s, which is no flag", name)
			continue
		}
		if err := fs.Set(name, v); err != nil {
			t.Errorf("agent.yaml: %s: %q: %v", name, v, err)
			continue
		}
		// A shown value is the default unless there is none (an example)
		// or it is rounded.
		if f.DefValue != "" && name != "renew-at" && f.Value.String() != f.DefValue {
			t.Errorf("agent.yaml shows %s: %s, the default is %s", name, v, f.DefValue)
		}
	}
}

func unitLines(t *testing.T) map[string][]string {
	t.Helper()
	data, err := Source("fleetgate-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			out[k] = append(out[k], v)
		}
	}
	return out
}

func TestUnit(t *testing.T) {
	u := unitLines(t)
	for k, want := range map[string]string{
		"ExecStart": "/usr/bin/fleetgate-agent run", // no --config: bundles must be read
		"User":      "fleetgate-agent",
		"Group":     "fleetgate-agent",
		"Restart":   "on-failure",
		// The agent's exit codes for revoked (3) and refused (4).
		"RestartPreventExitStatus": "3 4",
		"SupplementaryGroups":      "tss",
		"StateDirectory":           "fleetgate-agent",
		"RuntimeDirectory":         "fleetgate-agent",
		"NoNewPrivileges":          "yes",
		"ProtectSystem":            "strict",
		"ProtectHome":              "yes",
		"PrivateTmp":               "yes",
		"CapabilityBoundingSet":    "",
		"AmbientCapabilities":      "",
		"RestrictAddressFamilies":  "AF_UNIX AF_INET AF_INET6",
		"DevicePolicy":             "closed",
		"DeviceAllow":              "/dev/tpmrm0 rw",
		"WantedBy":                 "multi-user.target",
	} {
		if got, ok := u[k]; !ok || len(got) != 1 || got[0] != want {
			t.Errorf("%s=%q, want %q", k, got, want)
		}
	}
	for _, k := range []string{"RestartSec", "StartLimitIntervalSec", "StartLimitBurst", "SystemCallFilter", "UMask"} {
		if len(u[k]) == 0 {
			t.Errorf("%s is not set", k)
		}
	}
	// ProcSubset=pid would hide /proc/loadavg and /proc/meminfo from the
	// system metrics.
	if _, ok := u["ProcSubset"]; ok {
		t.Error("ProcSubset hides the files system metrics read")
	}
}

// requireTool skips (or, with FLEETGATE_REQUIRE_TOOLS=1, fails) when an
// outside tool is missing.
func requireTool(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			if os.Getenv("FLEETGATE_REQUIRE_TOOLS") == "1" {
				t.Fatalf("%s is not installed and FLEETGATE_REQUIRE_TOOLS=1", n)
			}
			t.Skipf("%s is not installed", n)
		}
	}
}

func command(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

func mustCommand(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := command(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// buildAgent builds the real agent (static, amd64 or whatever this machine
// is) for the package.
func buildAgent(t *testing.T) string {
	t.Helper()
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "agent")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X github.com/fleetgate/fleetgate/pkg/cli.Version=v9.8.7-test", "-o", out, "./agent")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build agent: %v\n%s", err, b)
	}
	return out
}

// TestDeb builds the package with the real agent, unpacks it into a
// throwaway root with dpkg and checks what lands where; systemd-analyze
// verifies the unit there and scores its sandbox.
func TestDeb(t *testing.T) {
	requireTool(t, "dpkg-deb")
	bin := buildAgent(t)
	dir := t.TempDir()
	p := Package{Version: "9.8.7~test", Arch: "amd64", Binary: bin}
	debPath, err := BuildFile(dir, p)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(debPath) != "fleetgate-agent_9.8.7~test_amd64.deb" {
		t.Errorf("file name %s", filepath.Base(debPath))
	}

	// Control: fields, conffiles, maintainer scripts.
	fields := mustCommand(t, "dpkg-deb", "-f", debPath)
	for _, want := range []string{"Package: fleetgate-agent", "Version: 9.8.7~test", "Architecture: amd64", "Maintainer: ", "Section: net"} {
		if !strings.Contains(fields, want) {
			t.Errorf("control lacks %q:\n%s", want, fields)
		}
	}
	ctl := filepath.Join(dir, "control")
	mustCommand(t, "dpkg-deb", "-e", debPath, ctl)
	if cf, _ := os.ReadFile(filepath.Join(ctl, "conffiles")); strings.TrimSpace(string(cf)) != ConfigPath {
		t.Errorf("conffiles %q, want %s", cf, ConfigPath)
	}
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		fi, err := os.Stat(filepath.Join(ctl, s))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o111 == 0 {
			t.Errorf("%s not executable: %v", s, fi.Mode())
		}
		mustCommand(t, "sh", "-n", filepath.Join(ctl, s))
	}
	postinst, _ := os.ReadFile(filepath.Join(ctl, "postinst"))
	for _, want := range []string{"systemd-sysusers", "useradd --system", "chown root:fleetgate-agent /etc/fleetgate/agent.yaml", "deb-systemd-helper enable"} {
		if !strings.Contains(string(postinst), want) {
			t.Errorf("postinst lacks %q", want)
		}
	}

	// Unpack into a throwaway root.
	root := filepath.Join(dir, "root")
	mustCommand(t, "dpkg-deb", "-x", debPath, root)
	for path, mode := range map[string]os.FileMode{
		BinaryPath:   0o755,
		UnitPath:     0o644,
		ConfigPath:   0o640,
		SysusersPath: 0o644,
	} {
		fi, err := os.Stat(filepath.Join(root, path))
		if err != nil {
			t.Errorf("%s: %v", path, err)
			continue
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", path, fi.Mode().Perm(), mode)
		}
	}
	for _, f := range []struct{ path, src string }{{UnitPath, "fleetgate-agent.service"}, {ConfigPath, "agent.yaml"}, {SysusersPath, "sysusers.conf"}} {
		got, _ := os.ReadFile(filepath.Join(root, f.path))
		want, _ := Source(f.src)
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from %s", f.path, f.src)
		}
	}
	// The packaged binary runs and knows its version.
	if out := mustCommand(t, filepath.Join(root, BinaryPath), "version"); !strings.Contains(out, "agent v9.8.7-test") {
		t.Errorf("version: %q", out)
	}
	// The packaged config is read by the packaged agent as it is.
	out, err := command(t, filepath.Join(root, BinaryPath), "status", "--config", filepath.Join(root, ConfigPath))
	if err == nil || !strings.Contains(out, "--device-id is required") {
		t.Errorf("status with the shipped config: %v\n%s", err, out)
	}

	t.Run("systemd-analyze", func(t *testing.T) {
		requireTool(t, "systemd-analyze")
		// --recursive-errors=no: the throwaway root has no sysinit.target
		// and friends; the unit itself, its ExecStart and every setting are
		// still checked.
		if out, err := command(t, "systemd-analyze", "verify", "--recursive-errors=no", "--root="+root, "fleetgate-agent.service"); err != nil || strings.TrimSpace(out) != "" {
			t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
		}
		// Exposure 0 (locked down) to 10 (unsafe); --threshold counts tenths.
		out, err := command(t, "systemd-analyze", "security", "--offline=true", "--threshold=25", "--root="+root, "fleetgate-agent.service")
		if err != nil {
			t.Fatalf("systemd-analyze security: %v\n%s", err, out)
		}
		if m := regexp.MustCompile(`Overall exposure level for fleetgate-agent.service: ([0-9.]+)`).FindStringSubmatch(out); m != nil {
			t.Logf("systemd-analyze security: exposure %s", m[1])
		}
	})
}
