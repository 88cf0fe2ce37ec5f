package keystore_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/fleetgate/fleetgate/pkg/keystore"
	"github.com/fleetgate/fleetgate/pkg/keystore/swtpmtest"
)

// Tests against swtpm, the software TPM that QEMU and CI use. They need the
// swtpm binary and skip without it, unless FLEETGATE_REQUIRE_TOOLS=1.

// swtpm wraps the test process with the checks these tests need.
type swtpm struct{ *swtpmtest.TPM }

func startSwtpm(t testing.TB) *swtpm { return &swtpm{swtpmtest.Start(t)} }

func (sw *swtpm) start() { sw.Restart() }

func (sw *swtpm) kill() { sw.Kill() }

// transientObjects counts the transient objects loaded in swtpm. swtpm has
// no resource manager: objects a store forgets to flush stay loaded across
// connections and fill its three object slots.
func (sw *swtpm) transientObjects(t testing.TB) int {
	t.Helper()
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapHandles,
		Property:      uint32(tpm2.TPMHTTransient) << 24,
		PropertyCount: 64,
	}.Execute(sockTPM(sw.Socket))
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

// open opens a store over the swtpm socket, closed at cleanup.
func (sw *swtpm) open(t testing.TB, dir string) *keystore.TPMStore {
	t.Helper()
	s, err := keystore.OpenTPM(sw.Socket, dir)
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
