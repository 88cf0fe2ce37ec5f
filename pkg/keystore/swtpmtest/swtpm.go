// Package swtpmtest runs swtpm, the software TPM that QEMU and CI use, for
// tests in any package. Tests that need it skip when swtpm is not
// installed, and fail instead when FLEETGATE_REQUIRE_TOOLS=1.
package swtpmtest

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// NeedTool returns the path of an outside tool, or skips the test (fails
// with FLEETGATE_REQUIRE_TOOLS=1) when it is not installed.
func NeedTool(t testing.TB, name, pkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s not on PATH (install package %s): %v", name, pkg, err)
		}
		t.Skipf("%s not on PATH (install package %s to run this test; FLEETGATE_REQUIRE_TOOLS=1 makes this a failure)", name, pkg)
	}
	return path
}

// TPM is an swtpm process serving a TPM 2.0 on a unix socket.
type TPM struct {
	t   testing.TB
	bin string
	// State is the TPM state directory (NV, seeds): the TPM's identity.
	State string
	// Socket is the TPM command socket, what --tpm takes.
	Socket string
	ctrl   string
	log    string
	cmd    *exec.Cmd
	done   chan struct{}
}

// Start starts swtpm with a fresh state directory; it is killed at cleanup.
// swtpm_setup is not needed: with --tpm2 and an empty state directory swtpm
// manufactures a TPM (new seeds) on first start, and --flags
// not-need-init,startup-clear makes it ready without INIT or TPM2_Startup.
func Start(t testing.TB) *TPM {
	t.Helper()
	bin := NeedTool(t, "swtpm", "swtpm")
	// Unix socket paths are limited to 108 bytes: t.TempDir() with a long
	// test name can exceed that.
	run, err := os.MkdirTemp("", "fgswtpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	sw := &TPM{
		t:      t,
		bin:    bin,
		State:  filepath.Join(run, "state"),
		Socket: filepath.Join(run, "tpm.sock"),
		ctrl:   filepath.Join(run, "ctrl.sock"),
		log:    filepath.Join(run, "swtpm.log"),
	}
	if err := os.Mkdir(sw.State, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sw.Kill)
	sw.Restart()
	return sw
}

// Restart runs swtpm on the state directory (again) and waits until it
// accepts connections.
func (sw *TPM) Restart() {
	sw.t.Helper()
	if sw.cmd != nil {
		sw.Kill()
	}
	// A killed swtpm leaves its sockets behind.
	os.Remove(sw.Socket)
	os.Remove(sw.ctrl)
	sw.cmd = exec.Command(sw.bin, "socket", "--tpm2",
		"--tpmstate", "dir="+sw.State,
		"--server", "type=unixio,path="+sw.Socket,
		"--ctrl", "type=unixio,path="+sw.ctrl,
		"--flags", "not-need-init,startup-clear",
		"--log", "level=1,file="+sw.log)
	if err := sw.cmd.Start(); err != nil {
		sw.t.Fatalf("start swtpm: %v", err)
	}
	done := make(chan struct{})
	sw.done = done
	go func(cmd *exec.Cmd) { _ = cmd.Wait(); close(done) }(sw.cmd)
	// Readiness, not speed: give a loaded CI machine plenty of time.
	for deadline := time.Now().Add(20 * time.Second); ; {
		select {
		case <-done:
			sw.t.Fatalf("swtpm exited at start: %s; log: %s", sw.cmd.ProcessState, sw.Log())
		default:
		}
		if c, err := net.Dial("unix", sw.Socket); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			sw.t.Fatalf("swtpm socket %s did not come up; log: %s", sw.Socket, sw.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Kill stops swtpm with SIGKILL, as a power cut would, and reaps it.
func (sw *TPM) Kill() {
	if sw.cmd == nil {
		return
	}
	_ = sw.cmd.Process.Kill()
	<-sw.done
	sw.cmd = nil
}

// Log returns swtpm's log.
func (sw *TPM) Log() string {
	b, _ := os.ReadFile(sw.log)
	return string(b)
}
