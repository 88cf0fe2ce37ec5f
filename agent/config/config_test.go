package config

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// parse runs the agent's flag handling on args with the system config file
// at sysFile (which need not exist).
func parse(t *testing.T, sysFile string, args ...string) (Config, error) {
	t.Helper()
	old := systemConfigFile
	systemConfigFile = sysFile
	t.Cleanup(func() { systemConfigFile = old })
	var c Config
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	finish := c.Flags(fs)
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	return c, finish()
}

func writeFile(t *testing.T, path, data string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// clearEnv hides FLEETGATE_ variables of the environment the test runs in.
func clearEnv(t *testing.T) {
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "FLEETGATE_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
}

const base = "gateway: https://gw.example:8443\ndevice_id: sensor-0001\n"

func TestNewSettings(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	none := filepath.Join(dir, "none.yaml")
	noBundle := "--bundle-dir=" + filepath.Join(dir, "no-bundle")

	t.Run("defaults", func(t *testing.T) {
		c, err := parse(t, none, "--gateway", "https://gw:8443", "--device-id", "a", noBundle)
		if err != nil {
			t.Fatal(err)
		}
		if c.SpoolMax != DefaultSpoolMax || c.SpoolMaxMessages != DefaultSpoolMaxMessages || c.MaxInflight != DefaultMaxInflight ||
			!c.System || c.Exec != "" || c.ExecTimeout != DefaultExecTimeout || c.LocalSocket != "" {
			t.Fatalf("defaults %+v", c)
		}
		if c.SpoolPath() != filepath.Join(DefaultStateDir, "spool.db") {
			t.Errorf("spool path %s", c.SpoolPath())
		}
	})
	t.Run("from a config file", func(t *testing.T) {
		f := writeFile(t, filepath.Join(dir, "full.yaml"), base+`
spool_max: 4MiB
spool_max_messages: 5000
max_inflight: 8
system: false
exec: "vcgencmd measure_volts | jq -R '{volts: .}'"
exec_timeout: 3s
local_socket: /run/fleetgate-agent/telemetry.sock
interval: 10s
`)
		c, err := parse(t, none, "--config", f)
		if err != nil {
			t.Fatal(err)
		}
		if c.SpoolMax != 4<<20 || c.SpoolMaxMessages != 5000 || c.MaxInflight != 8 || c.System ||
			c.Exec != "vcgencmd measure_volts | jq -R '{volts: .}'" || c.ExecTimeout != 3*time.Second ||
			c.LocalSocket != "/run/fleetgate-agent/telemetry.sock" || c.Interval != 10*time.Second {
			t.Fatalf("settings %+v", c)
		}
		if !slices.Equal(c.Files, []string{f}) {
			t.Errorf("files %v", c.Files)
		}
	})
	t.Run("flags beat the file and the environment beats the file", func(t *testing.T) {
		f := writeFile(t, filepath.Join(dir, "f.yaml"), base+"spool_max: 4MiB\nexec_timeout: 3s\n")
		t.Setenv("FLEETGATE_EXEC_TIMEOUT", "7s")
		c, err := parse(t, none, "--config", f, "--spool-max", "1048576")
		if err != nil {
			t.Fatal(err)
		}
		if c.SpoolMax != 1<<20 || c.ExecTimeout != 7*time.Second {
			t.Fatalf("spool max %v, exec timeout %v", c.SpoolMax, c.ExecTimeout)
		}
	})
	for _, tc := range []struct {
		name, arg, want string
	}{
		{"spool bound below the minimum", "--spool-max=100KiB", "--spool-max 100KiB: at least 256KiB"},
		{"spool bound not a size", "--spool-max=lots", `size "lots"`},
		{"count bound too small", "--spool-max-messages=1", "--spool-max-messages 1"},
		{"no inflight", "--max-inflight=0", "--max-inflight 0"},
		{"exec timeout zero", "--exec-timeout=0s", "--exec-timeout 0s"},
		{"socket path too long", "--local-socket=/" + strings.Repeat("x", 120), "--local-socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse(t, none, "--gateway", "https://gw:8443", "--device-id", "a", noBundle, tc.arg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want it to mention %q", err, tc.want)
			}
		})
	}
	t.Run("unknown key in a file", func(t *testing.T) {
		f := writeFile(t, filepath.Join(dir, "bad.yaml"), base+"spool_size: 1MiB\n")
		if _, err := parse(t, none, "--config", f); err == nil || !strings.Contains(err.Error(), `unknown setting "spool_size"`) {
			t.Fatalf("err %v", err)
		}
	})
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]ByteSize{
		"0": 0, "1048576": 1 << 20, "16MiB": 16 << 20, "512KiB": 512 << 10, "1GiB": 1 << 30,
		"10MB": 10_000_000, "2KB": 2000, "64K": 64 << 10, "3M": 3 << 20, "100B": 100, " 8 MiB ": 8 << 20,
	} {
		got, err := ParseByteSize(in)
		if err != nil || got != want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "-1", "1.5MiB", "1TiB", "9999999999999GiB", "12 apples"} {
		if _, err := ParseByteSize(in); err == nil {
			t.Errorf("ParseByteSize(%q) accepted", in)
		}
	}
	for v, want := range map[ByteSize]string{16 << 20: "16MiB", 1 << 30: "1GiB", 1536: "1536", 3 << 10: "3KiB", 0: "0"} {
		if got := v.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", int64(v), got, want)
		}
	}
}

// TestBundlePrecedence pins down where settings come from when a
// first-boot bundle sits on the boot partition.
func TestBundlePrecedence(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	bundle := filepath.Join(dir, "boot", "fleetgate")
	writeFile(t, filepath.Join(bundle, "agent.yaml"), `# written by provisioning token create --bundle
device_id: sensor-0042
gateway: https://factory-gw.example:8443
mqtt: factory-gw.example:8883
ca: `+filepath.Join(bundle, "ca.pem")+`
token_file: `+filepath.Join(bundle, "token")+`
`)
	sys := writeFile(t, filepath.Join(dir, "etc", "agent.yaml"), `gateway: https://site-gw.example:8443
interval: 10s
exec: /usr/local/bin/sensors
`)
	explicit := writeFile(t, filepath.Join(dir, "explicit.yaml"), "device_id: other\ngateway: https://other.example:8443\n")

	t.Run("bundle over the system file when no config is named", func(t *testing.T) {
		c, err := parse(t, sys, "--bundle-dir", bundle)
		if err != nil {
			t.Fatal(err)
		}
		if c.DeviceID != "sensor-0042" || c.Gateway != "https://factory-gw.example:8443" || c.MQTT != "factory-gw.example:8883" {
			t.Errorf("identity from the bundle: %+v", c)
		}
		if c.TokenFile != filepath.Join(bundle, "token") || c.CA != filepath.Join(bundle, "ca.pem") {
			t.Errorf("token file %s, ca %s", c.TokenFile, c.CA)
		}
		// What the bundle leaves unsaid still comes from the system file.
		if c.Interval != 10*time.Second || c.Exec != "/usr/local/bin/sensors" {
			t.Errorf("interval %v, exec %q: want the system file's", c.Interval, c.Exec)
		}
		if !slices.Equal(c.Files, []string{sys, filepath.Join(bundle, "agent.yaml")}) {
			t.Errorf("files %v", c.Files)
		}
	})
	t.Run("flags and environment beat the bundle", func(t *testing.T) {
		t.Setenv("FLEETGATE_MQTT", "env-gw.example:8883")
		c, err := parse(t, sys, "--bundle-dir", bundle, "--device-id", "flag-id")
		if err != nil {
			t.Fatal(err)
		}
		if c.DeviceID != "flag-id" || c.MQTT != "env-gw.example:8883" || c.Gateway != "https://factory-gw.example:8443" {
			t.Errorf("got device %s, mqtt %s, gateway %s", c.DeviceID, c.MQTT, c.Gateway)
		}
	})
	t.Run("an explicit --config ignores the bundle", func(t *testing.T) {
		c, err := parse(t, sys, "--bundle-dir", bundle, "--config", explicit)
		if err != nil {
			t.Fatal(err)
		}
		if c.DeviceID != "other" || c.TokenFile != "" || c.Interval != DefaultInterval {
			t.Errorf("got %+v", c)
		}
		if !slices.Equal(c.Files, []string{explicit}) {
			t.Errorf("files %v", c.Files)
		}
	})
	t.Run("FLEETGATE_CONFIG counts as explicit", func(t *testing.T) {
		t.Setenv("FLEETGATE_CONFIG", explicit)
		c, err := parse(t, sys, "--bundle-dir", bundle)
		if err != nil {
			t.Fatal(err)
		}
		if c.DeviceID != "other" {
			t.Errorf("device %s", c.DeviceID)
		}
	})
	t.Run("bundle dir from the environment", func(t *testing.T) {
		t.Setenv("FLEETGATE_BUNDLE_DIR", bundle)
		c, err := parse(t, filepath.Join(dir, "none.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		if c.DeviceID != "sensor-0042" || c.BundleDir != bundle {
			t.Errorf("device %s, bundle dir %s", c.DeviceID, c.BundleDir)
		}
	})
	t.Run("bundle dir from the system file", func(t *testing.T) {
		sys2 := writeFile(t, filepath.Join(dir, "etc2", "agent.yaml"), "bundle_dir: "+bundle+"\n")
		c, err := parse(t, sys2)
		if err != nil {
			t.Fatal(err)
		}
		if c.DeviceID != "sensor-0042" {
			t.Errorf("device %s", c.DeviceID)
		}
	})
	t.Run("no bundle: the system file alone", func(t *testing.T) {
		c, err := parse(t, sys, "--bundle-dir", filepath.Join(dir, "empty"), "--device-id", "d")
		if err != nil {
			t.Fatal(err)
		}
		if c.Gateway != "https://site-gw.example:8443" || !slices.Equal(c.Files, []string{sys}) {
			t.Errorf("gateway %s, files %v", c.Gateway, c.Files)
		}
	})
	t.Run("empty --bundle-dir turns bundles off", func(t *testing.T) {
		c, err := parse(t, sys, "--bundle-dir=", "--device-id", "d")
		if err != nil {
			t.Fatal(err)
		}
		if c.Gateway != "https://site-gw.example:8443" {
			t.Errorf("gateway %s", c.Gateway)
		}
	})
	t.Run("a bundle may not move the bundle dir", func(t *testing.T) {
		b := filepath.Join(dir, "b2")
		writeFile(t, filepath.Join(b, "agent.yaml"), base+"bundle_dir: /elsewhere\n")
		if _, err := parse(t, sys, "--bundle-dir", b); err == nil || !strings.Contains(err.Error(), `unknown setting "bundle_dir"`) {
			t.Fatalf("err %v", err)
		}
	})
	t.Run("an unreadable bundle is an error, not ignored", func(t *testing.T) {
		b := filepath.Join(dir, "b3")
		writeFile(t, filepath.Join(b, "agent.yaml"), "device_id: [a, b]\n")
		if _, err := parse(t, sys, "--bundle-dir", b); err == nil || !strings.Contains(err.Error(), "want a single value") {
			t.Fatalf("err %v", err)
		}
	})
}
