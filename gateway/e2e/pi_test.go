package e2e

import (
	"debug/buildinfo"
	"debug/elf"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// buildAgentFor cross-compiles the agent as make dist does (static, CGO
// off, stripped) into a temp dir.
func buildAgentFor(t *testing.T, goos, goarch, goarm string) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "agent-"+goos+"-"+goarch+goarm)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X github.com/fleetgate/fleetgate/pkg/cli.Version=v0.0.0-pi-test", "-o", out, "./agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+goos, "GOARCH="+goarch, "GOARM="+goarm)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build agent for %s/%s%s: %v\n%s", goos, goarch, goarm, err, b)
	}
	return out
}

// startProgram runs any program in the background, like start does for
// the binaries built in TestMain; it is stopped at the end of the test.
func startProgram(t *testing.T, path string, args ...string) *proc {
	t.Helper()
	p := &proc{done: make(chan struct{})}
	p.cmd = exec.Command(path, args...)
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop(10 * time.Second)
		if t.Failed() {
			t.Logf("--- %s output ---\n%s", filepath.Base(path), p.output())
		}
	})
	return p
}

// piTelemetry is the part of a telemetry message these tests read.
type piTelemetry struct {
	DeviceID     string          `json:"device_id"`
	Seq          uint64          `json:"seq"`
	Time         time.Time       `json:"time"`
	SpoolDropped uint64          `json:"spool_dropped"`
	System       json.RawMessage `json:"system"`
	Exec         json.RawMessage `json:"exec"`
	Local        json.RawMessage `json:"local"`
}

// TestRaspberryPiAgentUnderQEMU runs the agent built for the oldest
// Raspberry Pi (linux/arm, GOARM=6: Pi Zero and Pi 1) under qemu-arm-static
// against a real gateway on loopback. The device is set up the way the
// factory line does it: provisioning token create --bundle writes its
// first-boot bundle, and the agent, given no config, picks the bundle up,
// enrolls, deletes the spent token and publishes telemetry from all three
// sources (system metrics, an exec command, the local socket).
func TestRaspberryPiAgentUnderQEMU(t *testing.T) {
	requireTool(t, "qemu-arm-static")
	armAgent := buildAgentFor(t, "linux", "arm", "6")

	// The binary is what make dist ships for armhf: 32-bit ARM, ARMv6,
	// static, no cgo.
	ef, err := elf.Open(armAgent)
	if err != nil {
		t.Fatal(err)
	}
	if ef.Machine != elf.EM_ARM || ef.Class != elf.ELFCLASS32 {
		t.Errorf("ELF machine %v class %v, want ARM 32-bit", ef.Machine, ef.Class)
	}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the agent is dynamically linked")
		}
	}
	ef.Close()
	bi, err := buildinfo.ReadFile(armAgent)
	if err != nil {
		t.Fatal(err)
	}
	settings := map[string]string{}
	for _, s := range bi.Settings {
		settings[s.Key] = s.Value
	}
	if settings["GOARCH"] != "arm" || settings["GOARM"] != "6" || settings["CGO_ENABLED"] != "0" {
		t.Errorf("build settings %v", settings)
	}
	if out, code := sh(t, time.Minute, "qemu-arm-static", armAgent, "version"); code != 0 || !strings.Contains(out, "agent v0.0.0-pi-test") {
		t.Fatalf("agent version under qemu: exit %d: %s", code, out)
	}

	g := newGateway(t)
	g.start(t)
	svcDir := t.TempDir()
	g.prov(t, "cert", "issue", "--role", "service", "--name", "backend", "--out", svcDir)
	sub := g.subscribe(t, filepath.Join(svcDir, "backend.crt"), filepath.Join(svcDir, "backend.key"), "backend-pi", "devices/+/telemetry/#")

	// The factory line. On a Pi the bundle lands in /boot/firmware/fleetgate;
	// here the "boot partition" is a temp dir.
	const id = "pi-0001"
	bundles := t.TempDir()
	boot := filepath.Join(bundles, id)
	g.prov(t, "token", "create", "--batch", "pi-line", "--count", "1", "--prefix", "pi-",
		"--bundle", bundles, "--bundle-path", boot, "--bundle-gateway", g.estURL(), "--bundle-mqtt", g.mqttAddr())
	for _, f := range []string{"agent.yaml", "ca.pem", "token"} {
		if _, err := os.Stat(filepath.Join(boot, f)); err != nil {
			t.Fatalf("bundle: %v", err)
		}
	}

	// Unix socket paths are short: keep this one out of the long temp dir.
	sockDir, err := os.MkdirTemp("", "fg-pi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "telemetry.sock")
	state := filepath.Join(t.TempDir(), "state")
	agent := startProgram(t, "qemu-arm-static", armAgent, "run", "--bundle-dir", boot, "--state-dir", state,
		"--interval", "500ms", "--exec", `echo '{"fan":"on"}'`, "--local-socket", sock, "--log-format", "text")

	tm := sub.await(t, 2*time.Minute, "telemetry from the ARMv6 agent", func(m mqttMsg) bool {
		return m.topic == "devices/"+id+"/telemetry"
	})
	var msg piTelemetry
	if err := json.Unmarshal(tm.payload, &msg); err != nil {
		t.Fatalf("telemetry %s: %v", tm.payload, err)
	}
	if msg.DeviceID != id || msg.Seq == 0 || len(msg.System) == 0 || string(msg.Exec) != `{"fan":"on"}` {
		t.Fatalf("telemetry %s", tm.payload)
	}
	if _, err := os.Stat(filepath.Join(boot, "token")); !os.IsNotExist(err) {
		t.Errorf("the spent token is still in the bundle (err %v)", err)
	}
	for _, f := range []string{"device.key", "device.crt", "spool.db"} {
		if _, err := os.Stat(filepath.Join(state, f)); err != nil {
			t.Errorf("state dir: %v", err)
		}
	}

	// A local sensor program writes a line; it arrives on a subtopic.
	waitFor(t, 30*time.Second, "the local socket", func() bool { _, err := os.Stat(sock); return err == nil })
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(c, `{"topic":"soil","data":{"moisture":0.41}}`)
	c.Close()
	lm := sub.await(t, time.Minute, "the local socket's line", func(m mqttMsg) bool { return m.topic == "devices/"+id+"/telemetry/soil" })
	if err := json.Unmarshal(lm.payload, &msg); err != nil || string(msg.Local) != `{"moisture":0.41}` || msg.Seq == 0 {
		t.Fatalf("local message %s (%v)", lm.payload, err)
	}

	agent.stop(30 * time.Second)
	if code := agent.wait(t, time.Second); code != 0 {
		t.Fatalf("agent exit code %d after SIGTERM", code)
	}
}
