package keystore_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetgate/fleetgate/pkg/keystore"
)

func TestFileStoreLifecycle(t *testing.T) {
	path := filepath.Join(t.TempDir(), "device.key")
	s := keystore.NewFileStore(path)
	if _, err := s.Load(); !errors.Is(err, keystore.ErrNoKey) {
		t.Fatalf("empty store Load: %v", err)
	}
	if err := s.Commit(); !errors.Is(err, keystore.ErrNoKey) {
		t.Fatalf("commit without pending: %v", err)
	}
	k1, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(); !errors.Is(err, keystore.ErrNoKey) {
		t.Fatal("pending key visible as current before commit")
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v", st.Mode().Perm())
	}
	cur, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !cur.Public().(*ecdsa.PublicKey).Equal(k1.Public()) {
		t.Fatal("reloaded key differs")
	}
	sum := sha256.Sum256([]byte("msg"))
	sig, err := cur.Sign(rand.Reader, sum[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(k1.Public().(*ecdsa.PublicKey), sum[:], sig) {
		t.Fatalf("signature does not verify: %v", err)
	}

	k2, err := s.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if p, err := s.LoadPending(); err != nil || !p.Public().(*ecdsa.PublicKey).Equal(k2.Public()) {
		t.Fatalf("pending: %v", err)
	}
	if err := s.Discard(); err != nil {
		t.Fatal(err)
	}
	if cur, _ := s.Load(); !cur.Public().(*ecdsa.PublicKey).Equal(k1.Public()) {
		t.Fatal("discard changed the current key")
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(); err == nil {
		t.Fatal("world-readable key accepted")
	}
}
