//go:build tpmsimulator

package keystore_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpmutil"

	"github.com/fleetgate/fleetgate/pkg/keystore"
)

// The Microsoft reference TPM simulator (cgo) is one global instance per
// process: simulator.Get blocks until the previous one is closed, so these
// tests do not run in parallel.

const simSeed = 42

// simTransport talks to a simulator the test owns: the store's Close must
// not power the simulator off, so the test can look at it afterwards.
type simTransport struct{ sim *simulator.Simulator }

func (t simTransport) Send(cmd []byte) ([]byte, error) { return tpmutil.RunCommandRaw(t.sim, cmd) }

func (simTransport) Close() error { return nil }

// openSim starts a simulator with random hierarchy seeds, which survive
// sim.Reset (a reboot) as a real TPM's do.
func openSim(t testing.TB) *simulator.Simulator {
	t.Helper()
	sim, err := simulator.Get()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeSim(t, sim) })
	return sim
}

// openSimSeeded starts a simulator whose hierarchy seeds derive from seed:
// two simulators with the same seed are the same TPM. Pitfall: the fixed
// seeds live only in RAM (go-tpm-tools v0.4.11 does not write them to the
// simulated NV), so sim.Reset turns it into another TPM; use openSim for
// reboot tests.
func openSimSeeded(t testing.TB, seed int64) *simulator.Simulator {
	t.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeSim(t, sim) })
	return sim
}

func closeSim(t testing.TB, sim *simulator.Simulator) {
	t.Helper()
	if !sim.IsClosed() {
		if err := sim.Close(); err != nil {
			t.Error(err)
		}
	}
}

// newSimStore opens a store in dir over sim, closed at cleanup.
func newSimStore(t testing.TB, sim *simulator.Simulator, dir string) *keystore.TPMStore {
	t.Helper()
	s := keystore.NewTPMStore(simTransport{sim}, dir)
	t.Cleanup(func() { s.Close() })
	return s
}

// transientObjects counts the transient objects loaded in the TPM.
func transientObjects(t testing.TB, sim *simulator.Simulator) int {
	t.Helper()
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapHandles,
		Property:      uint32(tpm2.TPMHTTransient) << 24,
		PropertyCount: 64,
	}.Execute(simTransport{sim})
	if err != nil {
		t.Fatal(err)
	}
	h, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		t.Fatal(err)
	}
	return len(h.Handle)
}

// enroll generates and commits a key.
func enroll(t testing.TB, s keystore.Store) crypto.Signer {
	t.Helper()
	k, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	return k
}

func TestTPMSimLifecycle(t *testing.T) {
	sim := openSim(t)
	dir := t.TempDir()
	s := newSimStore(t, sim, dir)
	if s.Kind() != "tpm" {
		t.Fatalf("kind %q", s.Kind())
	}
	_, err := s.Load()
	mustNoKey(t, "empty store Load", err)
	_, err = s.LoadPending()
	mustNoKey(t, "empty store LoadPending", err)
	mustNoKey(t, "commit without pending", s.Commit())
	if err := s.Discard(); err != nil {
		t.Fatalf("discard without pending: %v", err)
	}

	k, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	checkSigns(t, k, "pending key signs before commit")
	_, err = s.Load()
	mustNoKey(t, "pending key visible as current before commit", err)
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, keystore.TPMKeyFile)
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key blob mode %v, want 0600", st.Mode().Perm())
	}
	if _, err := os.Stat(path + ".next"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pending blob left after commit: %v", err)
	}

	cur, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !ecPub(t, cur).Equal(k.Public()) {
		t.Fatal("loaded key differs from the generated one")
	}
	checkSigns(t, cur, "current key")
	checkSigns(t, k, "the generated key object stays usable after commit")
	checkRejectsOtherHashes(t, cur)
}

func TestTPMSimReloadAfterRestart(t *testing.T) {
	// enroll, close the store, restart the TPM, reopen and reload.
	check := func(t *testing.T, sim *simulator.Simulator, restart func() *simulator.Simulator) {
		dir := t.TempDir()
		s := newSimStore(t, sim, dir)
		want := ecPub(t, enroll(t, s))
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s = newSimStore(t, restart(), dir)
		k, err := s.Load()
		if err != nil {
			t.Fatal(err)
		}
		if !want.Equal(k.Public()) {
			t.Fatal("public key changed across the restart")
		}
		checkSigns(t, k, "after restart")
	}
	t.Run("TPM reboot", func(t *testing.T) {
		sim := openSim(t)
		check(t, sim, func() *simulator.Simulator {
			// TPM2_Shutdown + TPM2_Startup(CLEAR): transient objects
			// are gone, the seeds stay.
			if err := sim.Reset(); err != nil {
				t.Fatal(err)
			}
			return sim
		})
	})
	t.Run("new simulator instance with the same seeds", func(t *testing.T) {
		sim := openSimSeeded(t, simSeed)
		check(t, sim, func() *simulator.Simulator {
			closeSim(t, sim)
			return openSimSeeded(t, simSeed)
		})
	})
}

func TestTPMSimCSR(t *testing.T) {
	sim := openSim(t)
	s := newSimStore(t, sim, t.TempDir())
	k, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	checkCSR(t, k)
}

func TestTPMSimMutualTLS(t *testing.T) {
	sim := openSim(t)
	s := newSimStore(t, sim, t.TempDir())
	enroll(t, s)
	k, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		version uint16
	}{
		{"TLS 1.3 client authenticates with the TPM key", tls.VersionTLS13},
		{"TLS 1.2 client authenticates with the TPM key", tls.VersionTLS12},
	} {
		t.Run(tc.name, func(t *testing.T) { checkMutualTLS(t, k, tc.version) })
	}
}

func TestTPMSimRekey(t *testing.T) {
	sim := openSim(t)
	s := newSimStore(t, sim, t.TempDir())
	k1 := enroll(t, s)

	k2, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.LoadPending()
	if err != nil {
		t.Fatal(err)
	}
	if !ecPub(t, p).Equal(k2.Public()) || ecPub(t, p).Equal(k1.Public()) {
		t.Fatal("pending key is not the newly generated one")
	}
	// Renewal signs with both keys in turn (CSR with the new key, mTLS
	// with the old one): the store swaps the loaded key.
	for i := range 3 {
		checkSigns(t, k1, fmt.Sprint("old ", i))
		checkSigns(t, p, fmt.Sprint("new ", i))
	}

	if err := s.Discard(); err != nil {
		t.Fatal(err)
	}
	_, err = s.LoadPending()
	mustNoKey(t, "LoadPending after Discard", err)
	cur, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !ecPub(t, cur).Equal(k1.Public()) {
		t.Fatal("discard changed the current key")
	}

	k3, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	cur, err = s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !ecPub(t, cur).Equal(k3.Public()) {
		t.Fatal("commit did not switch the current key")
	}
	_, err = s.LoadPending()
	mustNoKey(t, "LoadPending after Commit", err)
}

func TestTPMSimUnusableBlob(t *testing.T) {
	sim := openSim(t)
	dir := t.TempDir()
	s := newSimStore(t, sim, dir)
	path := filepath.Join(dir, keystore.TPMKeyFile)
	enroll(t, s)
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Generate(); err != nil {
		t.Fatal(err)
	}
	other, err := os.ReadFile(path + ".next")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Discard(); err != nil {
		t.Fatal(err)
	}

	edit := func(data []byte, f func(b *blobFile)) []byte {
		b := decodeBlob(t, data)
		f(&b)
		out, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"flipped bit in the private area fails the TPM integrity check", edit(good, func(b *blobFile) { b.Private[len(b.Private)-5] ^= 1 })},
		{"flipped bit in the integrity HMAC", edit(good, func(b *blobFile) { b.Private[4] ^= 0x80 })},
		{"public half of another key", edit(good, func(b *blobFile) { b.Public = decodeBlob(t, other).Public })},
		{"truncated private area", edit(good, func(b *blobFile) { b.Private = b.Private[:len(b.Private)/2] })},
		{"public key moved off the curve", edit(good, func(b *blobFile) { b.Public[len(b.Public)-1] ^= 1 })},
		{"truncated file", good[:len(good)/2]},
		{"empty file", nil},
		{"unknown format", edit(good, func(b *blobFile) { b.Format = "fleetgate-tpm-key/v9" })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := s.Load()
			if !errors.Is(err, keystore.ErrKeyUnusable) {
				t.Fatalf("got %v, want ErrKeyUnusable", err)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "re-enroll") {
				t.Errorf("error lacks the path or the recovery step: %v", err)
			}
			if n := transientObjects(t, sim); n != 0 {
				t.Errorf("%d transient objects left after a failed load", n)
			}
		})
	}
}

// blobFile is the JSON key blob, as the tests see it.
type blobFile struct {
	Format  string `json:"format"`
	Parent  string `json:"parent"`
	Public  []byte `json:"public"`
	Private []byte `json:"private"`
}

func decodeBlob(t testing.TB, data []byte) blobFile {
	t.Helper()
	var b blobFile
	if err := json.Unmarshal(data, &b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestTPMSimForeignTPM(t *testing.T) {
	dir := t.TempDir()
	sim := openSimSeeded(t, simSeed)
	s := newSimStore(t, sim, dir)
	enroll(t, s)
	s.Close()
	closeSim(t, sim)

	// Another TPM (or this one after TPM2_Clear): other seeds, another SRK.
	other := openSimSeeded(t, simSeed+1)
	_, err := newSimStore(t, other, dir).Load()
	if !errors.Is(err, keystore.ErrKeyUnusable) {
		t.Fatalf("blob from another TPM: got %v, want ErrKeyUnusable", err)
	}
	t.Log(err)
}

func TestTPMSimConcurrentSign(t *testing.T) {
	sim := openSim(t)
	s := newSimStore(t, sim, t.TempDir())
	enroll(t, s)
	cur, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	pending, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		// Odd goroutines sign with the pending key, so the store keeps
		// swapping the loaded key under contention.
		key := cur
		if g%2 == 1 {
			key = pending
		}
		pub := key.Public().(*ecdsa.PublicKey)
		wg.Go(func() {
			for i := range 10 {
				sum := sha256.Sum256(fmt.Appendf(nil, "g%d-%d", g, i))
				sig, err := key.Sign(rand.Reader, sum[:], crypto.SHA256)
				if err != nil {
					errs <- err
					return
				}
				if !ecdsa.VerifyASN1(pub, sum[:], sig) {
					errs <- fmt.Errorf("goroutine %d: signature %d does not verify", g, i)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestTPMSimFlushesHandles(t *testing.T) {
	sim := openSim(t)
	s := newSimStore(t, sim, t.TempDir())
	check := func(step string, max int) {
		t.Helper()
		if n := transientObjects(t, sim); n > max {
			t.Fatalf("after %s: %d transient objects loaded, want at most %d", step, n, max)
		}
	}
	k1 := enroll(t, s)
	check("Generate", 1)
	cur, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	check("Load", 1)
	k2, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		checkSigns(t, k1, "a")
		checkSigns(t, k2, "b")
		checkSigns(t, cur, "c")
	}
	check("alternating signatures", 1)
	if _, err := s.LoadPending(); err != nil {
		t.Fatal(err)
	}
	check("LoadPending", 1)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	check("Close", 0)
	if _, err := cur.Sign(rand.Reader, make([]byte, 32), crypto.SHA256); err == nil {
		t.Fatal("key of a closed store signed")
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestTPMSimSignAfterTPMReset(t *testing.T) {
	sim := openSim(t)
	s := newSimStore(t, sim, t.TempDir())
	enroll(t, s)
	k, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	checkSigns(t, k, "before reset")
	// A reboot of the TPM (or an swtpm restart) drops the key the store
	// keeps loaded; the next signature must load it again.
	if err := sim.Reset(); err != nil {
		t.Fatal(err)
	}
	checkSigns(t, k, "after reset")
	if n := transientObjects(t, sim); n != 1 {
		t.Fatalf("%d transient objects, want the one reloaded key", n)
	}
}

// BenchmarkTPMSign measures TPM signatures with the key kept loaded ("hot")
// and with a reload before each signature ("reload": alternating two keys,
// as during renewal).
func BenchmarkTPMSign(b *testing.B) {
	sim := openSim(b)
	s := newSimStore(b, sim, b.TempDir())
	k1 := enroll(b, s)
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
