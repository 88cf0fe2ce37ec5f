package keystore_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/fleetgate/fleetgate/pkg/keystore"
)

// Tests against swtpm, the software TPM that QEMU and CI use. They need the
// swtpm binary and skip without it, unless FLEETGATE_REQUIRE_TOOLS=1.

// needTool returns the path of an outside tool, or skips the test (fails
// with FLEETGATE_REQUIRE_TOOLS=1) when it is not installed.
func needTool(t testing.TB, name, pkg string) string {
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

// swtpm is an swtpm process serving a TPM 2.0 on a unix socket.
type swtpm struct {
	t     testing.TB
	bin   string
	state string // TPM state directory (NV, seeds): the TPM's identity
	sock  string
	ctrl  string
	log   string
	cmd   *exec.Cmd
	done  chan struct{}
}

// startSwtpm starts swtpm with a fresh state directory; it is killed at
// cleanup. swtpm_setup is not needed: with --tpm2 and an empty state
// directory swtpm manufactures a TPM (new seeds) on first start, and
// --flags not-need-init,startup-clear makes it ready for commands without
// the control channel's INIT or a TPM2_Startup.
func startSwtpm(t testing.TB) *swtpm {
	t.Helper()
	bin := needTool(t, "swtpm", "swtpm")
	// Unix socket paths are limited to 108 bytes: t.TempDir() with a long
	// test name can exceed that.
	run, err := os.MkdirTemp("", "fgswtpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	sw := &swtpm{
		t:     t,
		bin:   bin,
		state: filepath.Join(run, "state"),
		sock:  filepath.Join(run, "tpm.sock"),
		ctrl:  filepath.Join(run, "ctrl.sock"),
		log:   filepath.Join(run, "swtpm.log"),
	}
	if err := os.Mkdir(sw.state, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sw.kill)
	sw.start()
	return sw
}

// start runs swtpm on the state directory and waits until it accepts
// connections.
func (sw *swtpm) start() {
	sw.t.Helper()
	// A killed swtpm leaves its sockets behind.
	os.Remove(sw.sock)
	os.Remove(sw.ctrl)
	sw.cmd = exec.Command(sw.bin, "socket", "--tpm2",
		"--tpmstate", "dir="+sw.state,
		"--server", "type=unixio,path="+sw.sock,
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
			sw.t.Fatalf("swtpm exited at start: %s; log: %s", sw.cmd.ProcessState, sw.readLog())
		default:
		}
		if c, err := net.Dial("unix", sw.sock); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			sw.t.Fatalf("swtpm socket %s did not come up; log: %s", sw.sock, sw.readLog())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill stops swtpm with SIGKILL, as a power cut would, and reaps it.
func (sw *swtpm) kill() {
	if sw.cmd == nil {
		return
	}
	_ = sw.cmd.Process.Kill()
	<-sw.done
	sw.cmd = nil
}

// transientObjects counts the transient objects loaded in swtpm. swtpm has
// no resource manager: objects a store forgets to flush stay loaded across
// connections and fill its three object slots.
func (sw *swtpm) transientObjects(t testing.TB) int {
	t.Helper()
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapHandles,
		Property:      uint32(tpm2.TPMHTTransient) << 24,
		PropertyCount: 64,
	}.Execute(sockTPM(sw.sock))
	if err != nil {
		t.Fatal(err)
	}
	h, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		t.Fatal(err)
	}
	return len(h.Handle)
}

// sockTPM sends one command per connection to swtpm's socket, as
// linuxudstpm does (which does not build on Windows).
type sockTPM string

func (p sockTPM) Send(cmd []byte) ([]byte, error) {
	c, err := net.Dial("unix", string(p))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.Write(cmd); err != nil {
		return nil, err
	}
	rsp := make([]byte, 4096)
	n, err := c.Read(rsp)
	return rsp[:n], err
}

func (sw *swtpm) readLog() string {
	b, _ := os.ReadFile(sw.log)
	return string(b)
}

// open opens a store over the swtpm socket, closed at cleanup.
func (sw *swtpm) open(t testing.TB, dir string) *keystore.TPMStore {
	t.Helper()
	s, err := keystore.OpenTPM(sw.sock, dir)
	if err != nil {
		t.Fatalf("OpenTPM: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestTPMSwtpm(t *testing.T) {
	sw := startSwtpm(t)
	dir := t.TempDir()
	s := sw.open(t, dir)

	_, err := s.Load()
	mustNoKey(t, "empty store Load", err)
	k, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	checkCSR(t, k)
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	cur, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !ecPub(t, cur).Equal(k.Public()) {
		t.Fatal("loaded key differs from the generated one")
	}
	checkSigns(t, cur, "swtpm")
	checkRejectsOtherHashes(t, cur)
	t.Run("TLS 1.3 client authenticates with the swtpm key", func(t *testing.T) { checkMutualTLS(t, cur, tls.VersionTLS13) })
	t.Run("TLS 1.2 client authenticates with the swtpm key", func(t *testing.T) { checkMutualTLS(t, cur, tls.VersionTLS12) })

	// Power cut: swtpm killed. The open store reports the TPM gone...
	sw.kill()
	sum := sha256.Sum256([]byte("while swtpm is down"))
	if _, err := cur.Sign(rand.Reader, sum[:], crypto.SHA256); !errors.Is(err, keystore.ErrTPMUnavailable) {
		t.Fatalf("sign with swtpm down: got %v, want ErrTPMUnavailable", err)
	}
	// ...and signs again once it is back, although the restart dropped
	// the key it kept loaded.
	sw.start()
	checkSigns(t, cur, "same store after the restart")

	// A new agent process after the restart loads the same key.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	sw.kill()
	sw.start()
	s2 := sw.open(t, dir)
	again, err := s2.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !ecPub(t, again).Equal(k.Public()) {
		t.Fatal("public key changed across the swtpm restart")
	}
	checkSigns(t, again, "new store after the restart")
	if n := sw.transientObjects(t); n != 1 {
		t.Errorf("%d transient objects loaded, want the store's one key", n)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if n := sw.transientObjects(t); n != 0 {
		t.Errorf("%d transient objects left after Close", n)
	}
}

func TestTPMSwtpmForeignState(t *testing.T) {
	// A new swtpm state directory is another TPM, as a cleared or replaced
	// TPM would be.
	dir := t.TempDir()
	first := startSwtpm(t)
	s1 := first.open(t, dir)
	if _, err := s1.Generate(); err != nil {
		t.Fatal(err)
	}
	if err := s1.Commit(); err != nil {
		t.Fatal(err)
	}
	other := startSwtpm(t)
	_, err := other.open(t, dir).Load()
	if !errors.Is(err, keystore.ErrKeyUnusable) {
		t.Fatalf("key from another TPM: got %v, want ErrKeyUnusable", err)
	}
}

func TestOpenTPMUnavailable(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "not-a-tpm")
	if err := os.WriteFile(regular, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A socket nobody listens on: an swtpm that died without cleaning up.
	run, err := os.MkdirTemp("", "fgtpm")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(run)
	dead := filepath.Join(run, "dead.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: dead, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()

	for _, tc := range []struct{ name, path string }{
		{"missing device node", filepath.Join(dir, "tpmrm0")},
		{"regular file", regular},
		{"socket refuses connections", dead},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := keystore.OpenTPM(tc.path, dir)
			if err == nil {
				s.Close()
				t.Fatal("OpenTPM succeeded")
			}
			if !errors.Is(err, keystore.ErrTPMUnavailable) {
				t.Fatalf("got %v, want ErrTPMUnavailable", err)
			}
			t.Log(err)
		})
	}
}

// BenchmarkSwtpmSign measures signatures by swtpm over its unix socket (one
// connection per command) with the key kept loaded ("hot") and with a
// reload before each signature ("reload").
func BenchmarkSwtpmSign(b *testing.B) {
	sw := startSwtpm(b)
	s := sw.open(b, b.TempDir())
	k1, err := s.Generate()
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Commit(); err != nil {
		b.Fatal(err)
	}
	k2, err := s.Generate()
	if err != nil {
		b.Fatal(err)
	}
	sum := sha256.Sum256([]byte("benchmark"))
	b.Run("hot", func(b *testing.B) {
		for b.Loop() {
			if _, err := k1.Sign(rand.Reader, sum[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sigs/s")
	})
	b.Run("reload", func(b *testing.B) {
		keys := []crypto.Signer{k1, k2}
		i := 0
		for b.Loop() {
			if _, err := keys[i%2].Sign(rand.Reader, sum[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
			i++
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sigs/s")
	})
}
