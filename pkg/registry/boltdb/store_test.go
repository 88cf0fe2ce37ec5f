package boltdb

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
	"github.com/fleetgate/fleetgate/pkg/registry"
	"github.com/fleetgate/fleetgate/pkg/registry/registrytest"
)

// openTest opens a store at path and, when the test ends, closes it and
// runs the consistency check on the file (bbolt's habit after every test).
func openTest(t testing.TB, path string) *Store {
	t.Helper()
	s, err := Open(path, Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { checkAndClose(t, s) })
	return s
}

func checkAndClose(t testing.TB, s *Store) {
	t.Helper()
	if err := s.Check(); err != nil && !errors.Is(err, registry.ErrClosed) {
		t.Errorf("consistency check: %v", err)
	}
	if err := s.Close(); err != nil && !errors.Is(err, registry.ErrClosed) {
		t.Errorf("close: %v", err)
	}
	if err := verifyFile(s.Path()); err != nil {
		t.Errorf("file after close: %v", err)
	}
}

func newTestStore(t testing.TB) *Store {
	t.Helper()
	return openTest(t, filepath.Join(t.TempDir(), "registry.db"))
}

func TestStore(t *testing.T) {
	registrytest.Run(t, func(t *testing.T) registry.Store { return newTestStore(t) })
}

// fixture fills a store with a little of everything.
type fixture struct {
	ctx context.Context
	f   *pkitest.Fixture
	now time.Time
}

func newFixture(t testing.TB) *fixture {
	return &fixture{ctx: context.Background(), f: pkitest.New(t), now: time.Now().Truncate(time.Millisecond)}
}

// mint stores one unused token, valid for an hour, for each device.
func (x *fixture) mint(t testing.TB, s *Store, ids ...string) []registry.Token {
	t.Helper()
	toks := make([]registry.Token, len(ids))
	for i, id := range ids {
		_, hash, err := registry.NewToken()
		if err != nil {
			t.Fatal(err)
		}
		toks[i] = registry.Token{Hash: hash, DeviceID: id, CreatedAt: x.now, ExpiresAt: x.now.Add(time.Hour)}
	}
	if err := s.CreateTokens(x.ctx, toks, registrytest.Operator); err != nil {
		t.Fatal(err)
	}
	return toks
}

// ids are the device IDs prefix0 … prefix(n-1).
func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%d", prefix, i)
	}
	return out
}

func (x *fixture) enroll(t testing.TB, s *Store, id string) registry.Device {
	t.Helper()
	hash := x.mint(t, s, id)[0].Hash
	c, _ := x.f.Device(t, id)
	d, err := s.Enroll(x.ctx, registry.Enrollment{DeviceID: id, TokenHash: hash, Cert: registrytest.CertRecord(c), Time: x.now})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func (x *fixture) populate(t testing.TB, s *Store) {
	t.Helper()
	for i := range 5 {
		x.enroll(t, s, fmt.Sprintf("dev-%d", i))
	}
	if _, err := s.RevokeDevice(x.ctx, "dev-2", 1, x.now, registrytest.Operator); err != nil {
		t.Fatal(err)
	}
}

// snapshot renders what a store holds as JSON, for comparisons across a
// reopen or a restore.
func snapshot(t testing.TB, s *Store) string {
	t.Helper()
	ctx := context.Background()
	ds, err := s.Devices(ctx, registry.DeviceFilter{})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := s.Revocations(ctx)
	if err != nil {
		t.Fatal(err)
	}
	evs, err := s.Audit(ctx, registry.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal([]any{ds, rs, evs})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestReopenKeepsData(t *testing.T) {
	x := newFixture(t)
	path := filepath.Join(t.TempDir(), "registry.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	x.populate(t, s)
	var crl uint64
	for range 3 {
		if crl, err = s.NextCRLNumber(x.ctx); err != nil {
			t.Fatal(err)
		}
	}
	before := snapshot(t, s)
	evs, _ := s.Audit(x.ctx, registry.AuditFilter{})
	lastSeq := evs[len(evs)-1].Seq
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openTest(t, path)
	if after := snapshot(t, s); after != before {
		t.Errorf("after reopen:\n%s\nbefore:\n%s", after, before)
	}
	if d, err := s.Device(x.ctx, "dev-2"); err != nil || d.Status != registry.StatusRevoked {
		t.Errorf("dev-2 = %+v, %v; want revoked", d, err)
	}
	if n, err := s.NextCRLNumber(x.ctx); err != nil || n <= crl {
		t.Errorf("CRL number after reopen %d, %v; want more than %d", n, err, crl)
	}
	if err := s.AppendAudit(x.ctx, registry.AuditEvent{Actor: "gateway", Action: "test.event"}); err != nil {
		t.Fatal(err)
	}
	evs, _ = s.Audit(x.ctx, registry.AuditFilter{AfterSeq: lastSeq})
	if len(evs) != 1 || evs[0].Seq <= lastSeq {
		t.Errorf("events after reopen %+v, want one after seq %d", evs, lastSeq)
	}
}

func TestOpen(t *testing.T) {
	t.Run("new file is private", func(t *testing.T) {
		s := newTestStore(t)
		fi, err := os.Stat(s.Path())
		if err != nil {
			t.Fatal(err)
		}
		if m := fi.Mode().Perm(); m != 0o600 {
			t.Errorf("mode %v, want 0600", m)
		}
	})
	t.Run("missing directory", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "nope", "registry.db")
		_, err := Open(path, Options{})
		if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), path) {
			t.Errorf("error %v, want not-exist naming %s", err, path)
		}
	})
	t.Run("locked by another holder", func(t *testing.T) {
		// flock locks belong to the open file, so a second Open in this
		// process meets the lock just as another process would.
		s := newTestStore(t)
		start := time.Now()
		_, err := Open(s.Path(), Options{Timeout: 100 * time.Millisecond})
		t.Logf("gave up after %v: %v", time.Since(start), err)
		if !errors.Is(err, berrors.ErrTimeout) || !strings.Contains(err.Error(), "is locked by another process") {
			t.Errorf("error %v, want a lock timeout", err)
		}
	})
	t.Run("foreign bbolt file is refused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "other.db")
		s, err := Open(path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		// Make it someone else's file: drop one of our buckets.
		if err := s.db.Update(func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketAudit) }); err != nil {
			t.Fatal(err)
		}
		s.Close()
		if _, err := Open(path, Options{}); err == nil || !strings.Contains(err.Error(), "not a fleetgate registry") {
			t.Errorf("error %v, want not a registry", err)
		}
	})
	t.Run("not a bbolt file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "junk.db")
		if err := os.WriteFile(path, bytes.Repeat([]byte("junk"), 4096), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(path, Options{}); err == nil {
			t.Error("opened a junk file")
		}
	})
}

func TestReadOnly(t *testing.T) {
	x := newFixture(t)
	path := filepath.Join(t.TempDir(), "registry.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	x.populate(t, s)
	want := snapshot(t, s)
	s.Close()

	r1, err := Open(path, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Close()
	r2, err := Open(path, Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatalf("second reader: %v", err)
	}
	defer r2.Close()
	if got := snapshot(t, r2); got != want {
		t.Errorf("read-only store sees\n%s\nwant\n%s", got, want)
	}
	if err := r1.Check(); err != nil {
		t.Errorf("Check: %v", err)
	}
	if _, err := r1.NextCRLNumber(x.ctx); !errors.Is(err, berrors.ErrDatabaseReadOnly) {
		t.Errorf("NextCRLNumber on a read-only store: %v", err)
	}
	if _, err := Open(path, Options{Timeout: 50 * time.Millisecond}); !errors.Is(err, berrors.ErrTimeout) {
		t.Errorf("writer beside readers: %v, want a lock timeout", err)
	}
}

func TestBackupRestore(t *testing.T) {
	x := newFixture(t)
	s := newTestStore(t)
	x.populate(t, s)
	var buf bytes.Buffer
	n, err := s.Backup(x.ctx, &buf)
	if err != nil || n != int64(buf.Len()) {
		t.Fatalf("Backup = %d, %v; wrote %d", n, err, buf.Len())
	}
	backup := buf.Bytes()

	t.Run("round trip", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "restored.db")
		if err := Restore(bytes.NewReader(backup), path); err != nil {
			t.Fatal(err)
		}
		r := openTest(t, path)
		if got, want := snapshot(t, r), snapshot(t, s); got != want {
			t.Errorf("restored\n%s\nwant\n%s", got, want)
		}
		rs, _ := r.Revocations(x.ctx)
		if len(rs) != 1 || rs[0].DeviceID != "dev-2" {
			t.Errorf("restored revocations %+v", rs)
		}
		x.enroll(t, r, "dev-9") // the copy is a working registry
	})
	t.Run("refuses to overwrite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "registry.db")
		if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
			t.Fatal(err)
		}
		err := Restore(bytes.NewReader(backup), path)
		if !errors.Is(err, fs.ErrExist) {
			t.Errorf("error %v, want fs.ErrExist", err)
		}
		if b, _ := os.ReadFile(path); string(b) != "precious" {
			t.Errorf("existing file changed to %d bytes", len(b))
		}
	})
	junk := make([]byte, 64<<10)
	rand.Read(junk)
	for _, c := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"random bytes", junk},
		{"truncated", backup[:len(backup)/2]},
		{"first pages only", backup[:4*4096]},
	} {
		t.Run("rejects "+c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "registry.db")
			if err := Restore(bytes.NewReader(c.data), path); err == nil {
				t.Fatal("restored a broken backup")
			}
			if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("broken restore left a file behind: %v", err)
			}
		})
	}
	t.Run("missing directory", func(t *testing.T) {
		if err := Restore(bytes.NewReader(backup), filepath.Join(t.TempDir(), "nope", "r.db")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("error %v, want fs.ErrNotExist", err)
		}
	})
}

// A token can only be bound to a revoked device if the file was edited or
// restored from an older state; Enroll still refuses it and keeps the token.
func TestEnrollRefusesRevokedDeviceWithValidToken(t *testing.T) {
	x := newFixture(t)
	s := newTestStore(t)
	x.enroll(t, s, "dev-1")
	if _, err := s.RevokeDevice(x.ctx, "dev-1", 1, x.now, registrytest.Operator); err != nil {
		t.Fatal(err)
	}
	_, hash, _ := registry.NewToken()
	tok := registry.Token{Hash: hash, DeviceID: "dev-1", CreatedAt: x.now, ExpiresAt: x.now.Add(time.Hour)}
	if err := s.db.Update(func(tx *bolt.Tx) error { return put(tx.Bucket(bucketTokens), hash, tok) }); err != nil {
		t.Fatal(err)
	}
	if err := s.CheckToken(x.ctx, "dev-1", hash, x.now); !errors.Is(err, registry.ErrRevoked) {
		t.Errorf("CheckToken: %v, want %v", err, registry.ErrRevoked)
	}
	c, _ := x.f.Device(t, "dev-1")
	_, err := s.Enroll(x.ctx, registry.Enrollment{DeviceID: "dev-1", TokenHash: hash, Cert: registrytest.CertRecord(c), Time: x.now})
	if !errors.Is(err, registry.ErrRevoked) {
		t.Errorf("Enroll: %v, want %v", err, registry.ErrRevoked)
	}
	var stored registry.Token
	if err := s.db.View(func(tx *bolt.Tx) error {
		_, err := get(tx.Bucket(bucketTokens), "token", hash, &stored)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if !stored.UsedAt.IsZero() {
		t.Errorf("token consumed: %+v", stored)
	}
}

func TestCancelledContext(t *testing.T) {
	s := newTestStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.NextCRLNumber(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("NextCRLNumber: %v, want %v", err, context.Canceled)
	}
	if _, err := s.Devices(ctx, registry.DeviceFilter{}); !errors.Is(err, context.Canceled) {
		t.Errorf("Devices: %v, want %v", err, context.Canceled)
	}
}

func TestCloseTwice(t *testing.T) {
	s := newTestStore(t)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("second Close: %v, want %v", err, registry.ErrClosed)
	}
	if err := s.Check(); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("Check after Close: %v, want %v", err, registry.ErrClosed)
	}
}

func TestInvalidInputNeverPanics(t *testing.T) {
	s := newTestStore(t)
	ctx := context.Background()
	now := time.Now()
	weird := []string{"", "A", "dev/1", "..", strings.Repeat("a", 300), "\x00", "dev-1\n", "zz", "ABCDEF"}
	for _, w := range weird {
		_ = s.CheckToken(ctx, w, []byte(w), now)
		_, _ = s.Enroll(ctx, registry.Enrollment{DeviceID: w, TokenHash: []byte(w), Cert: registry.Certificate{Serial: w, DER: []byte(w)}, Time: now})
		_, _ = s.Renew(ctx, registry.Renewal{DeviceID: w, OldSerial: w, Cert: registry.Certificate{Serial: w}})
		_, _ = s.RevokeDevice(ctx, w, -1, now, w)
		_, _ = s.RevokeCertificate(ctx, w, 99, now, w)
		_, _ = s.Device(ctx, w)
		_, _ = s.Certificate(ctx, w)
		_, _ = s.Devices(ctx, registry.DeviceFilter{Prefix: w, After: w, Limit: -1})
		_, _ = s.Devices(ctx, registry.DeviceFilter{Prefix: w, After: w})
		_, _ = s.Audit(ctx, registry.AuditFilter{DeviceID: w, Limit: -1})
		_ = s.TouchLastSeen(ctx, map[string]time.Time{w: now})
		_ = s.CreateTokens(ctx, []registry.Token{{DeviceID: w, Hash: []byte(w)}}, w)
	}
}

func BenchmarkEnroll(b *testing.B) {
	x := newFixture(b)
	// Certificates are made up front: the benchmark measures the store.
	prepare := func(b *testing.B, s *Store, n int) []registry.Enrollment {
		c, _ := x.f.Device(b, "dev-0")
		rec := registrytest.CertRecord(c)
		toks := x.mint(b, s, ids("dev-", n)...)
		reqs := make([]registry.Enrollment, n)
		for i, tok := range toks {
			cert := rec
			cert.Serial = fmt.Sprintf("%x", i+1)
			reqs[i] = registry.Enrollment{DeviceID: tok.DeviceID, TokenHash: tok.Hash, Cert: cert, Time: x.now}
		}
		return reqs
	}
	b.Run("sequential", func(b *testing.B) {
		s := newTestStore(b)
		reqs := prepare(b, s, b.N)
		b.ResetTimer()
		for i := range b.N {
			if _, err := s.Enroll(x.ctx, reqs[i]); err != nil {
				b.Fatal(err)
			}
		}
	})
	// Concurrent enrollments share commits (group commit): with 64 in
	// flight one fsync carries many of them.
	for _, par := range []int{1, 32} {
		b.Run(fmt.Sprintf("parallel-%d", par*runtime.GOMAXPROCS(0)), func(b *testing.B) {
			s := newTestStore(b)
			reqs := prepare(b, s, b.N)
			next := make(chan registry.Enrollment, len(reqs))
			for _, r := range reqs {
				next <- r
			}
			close(next)
			b.ResetTimer()
			b.SetParallelism(par)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.Enroll(x.ctx, <-next); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "enrollments/s")
		})
	}
}

func BenchmarkCheckToken(b *testing.B) {
	x := newFixture(b)
	s := newTestStore(b)
	const n = 10000
	toks := x.mint(b, s, ids("dev-", n)...)
	b.Run("sequential", func(b *testing.B) {
		for i := range b.N {
			tok := toks[i%n]
			if err := s.CheckToken(x.ctx, tok.DeviceID, tok.Hash, x.now); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				tok := toks[i%n]
				if err := s.CheckToken(x.ctx, tok.DeviceID, tok.Hash, x.now); err != nil {
					b.Error(err)
					return
				}
				i++
			}
		})
	})
}

// A file of schema version 1 (no device_tokens index) opens read-only as
// it is, and opened for writing gets the index built from its tokens, so
// revoking a device finds and deletes its unused tokens and no other's.
func TestUpgradeFromVersion1(t *testing.T) {
	x := newFixture(t)
	path := filepath.Join(t.TempDir(), "registry.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	x.enroll(t, s, "dev-a")
	unused := x.mint(t, s, "dev-a", "dev-b")
	unusedA, unusedB := unused[0].Hash, unused[1].Hash
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Make it a version 1 file, as an older gateway left it.
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketDeviceTokens); err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keySchema, u64(1))
	}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := verifyFile(path); err != nil {
		t.Fatalf("version 1 file: %v", err)
	}

	ro, err := Open(path, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open of a version 1 file: %v", err)
	}
	if _, err := ro.Device(x.ctx, "dev-a"); err != nil {
		t.Fatal(err)
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}

	s = openTest(t, path)
	var version uint64
	var indexed int
	_ = s.db.View(func(tx *bolt.Tx) error {
		version, _ = getU64(tx.Bucket(bucketMeta), keySchema)
		if b := tx.Bucket(bucketDeviceTokens); b != nil {
			indexed = b.Stats().KeyN
		}
		return nil
	})
	if version != schemaVersion || indexed != 3 {
		t.Fatalf("after upgrade: schema %d, %d tokens indexed; want %d and 3 (one used, two unused)", version, indexed, schemaVersion)
	}
	if _, err := s.RevokeDevice(x.ctx, "dev-a", 1, x.now, registrytest.Operator); err != nil {
		t.Fatal(err)
	}
	_ = s.db.View(func(tx *bolt.Tx) error {
		toks, idx := tx.Bucket(bucketTokens), tx.Bucket(bucketDeviceTokens)
		if toks.Get(unusedA) != nil || idx.Get(deviceTokenKey("dev-a", unusedA)) != nil {
			t.Error("dev-a's unused token survived its revocation")
		}
		if toks.Get(unusedB) == nil || idx.Get(deviceTokenKey("dev-b", unusedB)) == nil {
			t.Error("dev-a's revocation deleted dev-b's token")
		}
		if n := idx.Stats().KeyN; n != 2 {
			t.Errorf("%d tokens indexed after the revocation, want 2 (dev-a's used one, dev-b's)", n)
		}
		return nil
	})
	if err := s.CheckToken(x.ctx, "dev-b", unusedB, x.now); err != nil {
		t.Errorf("dev-b's token after dev-a's revocation: %v", err)
	}
}

// BenchmarkRevokeDevice revokes enrolled devices in a registry that also
// holds 50,000 tokens of other devices (a day of factory enrollments):
// the revocation reads only the device's own tokens.
func BenchmarkRevokeDevice(b *testing.B) {
	x := newFixture(b)
	s := newTestStore(b)
	x.mint(b, s, ids("other-", 50000)...)
	for i := range b.N {
		x.enroll(b, s, fmt.Sprintf("dev-%d", i))
	}
	b.ResetTimer()
	for i := range b.N {
		if _, err := s.RevokeDevice(x.ctx, fmt.Sprintf("dev-%d", i), 1, x.now, registrytest.Operator); err != nil {
			b.Fatal(err)
		}
	}
}
