// Package boltdb is the embedded registry.Store: one bbolt file on the
// gateway's disk.
//
// Every record is JSON in one of six buckets: devices (device ID), certs
// (serial), tokens (SHA-256 hash of the token), revocations (serial), audit
// (8-byte big-endian sequence number) and meta (schema version, CRL number).
// A seventh, device_tokens, indexes the tokens by device (key: device ID,
// a zero byte, the token's hash; empty value).
// Every change, with its audit events, is one fsync'd bbolt transaction.
//
// bbolt holds an exclusive file lock, so one registry file serves one
// gateway process; a registry shared by several gateways needs another Store.
package boltdb

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/fleetgate/fleetgate/pkg/registry"
)

// DefaultTimeout is how long Open waits for the file lock by default.
const DefaultTimeout = 5 * time.Second

// schemaVersion is the layout of the buckets and records this package
// writes. Open refuses a file with a newer version rather than misread it,
// and brings an older one up to date. Version 2 added device_tokens.
const schemaVersion = 2

var (
	bucketDevices     = []byte("devices")
	bucketCerts       = []byte("certs")
	bucketTokens      = []byte("tokens")
	bucketRevocations = []byte("revocations")
	bucketAudit       = []byte("audit")
	bucketMeta        = []byte("meta")
	// bucketDeviceTokens indexes tokens by device (schema version 2).
	bucketDeviceTokens = []byte("device_tokens")

	allBuckets = [][]byte{bucketDevices, bucketCerts, bucketTokens, bucketRevocations, bucketAudit, bucketMeta, bucketDeviceTokens}

	keySchema    = []byte("schema")
	keyCRLNumber = []byte("crl_number")
)

// Options tune Open. The zero value is fine.
type Options struct {
	// Timeout is how long Open waits for the file lock held by another
	// process; DefaultTimeout when zero or negative.
	Timeout time.Duration
	// ReadOnly opens the file with a shared lock and refuses every change;
	// several read-only stores (fleetctl inspecting a stopped gateway's
	// registry) may be open at once, but not beside a writer.
	ReadOnly bool
}

// Store is a registry.Store on a bbolt file. It is safe for concurrent use.
type Store struct {
	db       *bolt.DB
	path     string
	readOnly bool
	closed   atomic.Bool
	group    groupCommit
}

var _ registry.Store = (*Store)(nil)

// Open opens the registry at path, creating it (mode 0600) when it does not
// exist. The directory must exist. If another process holds the file, Open
// gives up after o.Timeout with an error wrapping bbolt's ErrTimeout.
func Open(path string, o Options) (*Store, error) {
	if path == "" {
		return nil, errors.New("open registry: empty path")
	}
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("open registry %s: directory: %w", path, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("open registry %s: %s is not a directory", path, dir)
	}
	db, err := openDB(path, o)
	if err != nil {
		return nil, err
	}
	s := &Store{db: db, path: path, readOnly: o.ReadOnly}
	if err := s.init(); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open registry %s: %w", path, err)
	}
	return s, nil
}

func openDB(path string, o Options) (*bolt.DB, error) {
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:      timeout,
		ReadOnly:     o.ReadOnly,
		FreelistType: bolt.FreelistArrayType,
	})
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("registry %s is locked by another process (waited %s): %w", path, timeout, err)
	case err != nil:
		return nil, fmt.Errorf("open registry %s: %w", path, err)
	}
	return db, nil
}

// init creates the buckets of a new file, or checks that an existing file
// is a registry this build understands.
func (s *Store) init() error {
	if s.readOnly {
		return s.db.View(checkLayout)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		if k, _ := tx.Cursor().First(); k == nil {
			// A new file: lay it out. A file with other buckets is not
			// ours and fails checkLayout below.
			for _, name := range allBuckets {
				if _, err := tx.CreateBucketIfNotExists(name); err != nil {
					return fmt.Errorf("create bucket %s: %w", name, err)
				}
			}
			return tx.Bucket(bucketMeta).Put(keySchema, u64(schemaVersion))
		}
		if err := checkLayout(tx); err != nil {
			return err
		}
		return upgrade(tx)
	})
}

// upgrade brings a file of an older schema version to this one, in the
// transaction that opens it.
func upgrade(tx *bolt.Tx) error {
	meta := tx.Bucket(bucketMeta)
	if v, _ := getU64(meta, keySchema); v >= schemaVersion {
		return nil
	}
	// Version 1 → 2: index the tokens by device.
	idx, err := tx.CreateBucketIfNotExists(bucketDeviceTokens)
	if err != nil {
		return fmt.Errorf("create bucket %s: %w", bucketDeviceTokens, err)
	}
	err = tx.Bucket(bucketTokens).ForEach(func(k, v []byte) error {
		var tok registry.Token
		if err := json.Unmarshal(v, &tok); err != nil {
			return fmt.Errorf("index tokens: decode token %x: %w", k, err)
		}
		return idx.Put(deviceTokenKey(tok.DeviceID, k), nil)
	})
	if err != nil {
		return err
	}
	return meta.Put(keySchema, u64(schemaVersion))
}

// deviceTokenKey is a token's key in device_tokens. Device IDs contain no
// zero byte (checkDeviceID), so a device's keys share the prefix
// deviceTokenPrefix(id) and no other device's do.
func deviceTokenKey(deviceID string, hash []byte) []byte {
	return append(deviceTokenPrefix(deviceID), hash...)
}

func deviceTokenPrefix(deviceID string) []byte {
	k := make([]byte, 0, len(deviceID)+1+sha256.Size)
	return append(append(k, deviceID...), 0)
}

// checkLayout refuses files that are not a registry or are newer than this
// build, so later code may rely on every bucket of the file's version
// existing. Open brings a writable file to this version; a read-only store
// of version 1 has no device_tokens, which only writes use.
func checkLayout(tx *bolt.Tx) error {
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		return fmt.Errorf("not a fleetgate registry: bucket %s missing", bucketMeta)
	}
	v, ok := getU64(meta, keySchema)
	if !ok {
		return errors.New("not a fleetgate registry: no schema version")
	}
	if v > schemaVersion {
		return fmt.Errorf("registry schema version %d is newer than this build's %d", v, schemaVersion)
	}
	for _, name := range layoutBuckets(v) {
		if tx.Bucket(name) == nil {
			return fmt.Errorf("not a fleetgate registry: bucket %s missing", name)
		}
	}
	return nil
}

// layoutBuckets are the buckets a file of schema version v has.
func layoutBuckets(v uint64) [][]byte {
	if v < 2 {
		return allBuckets[:len(allBuckets)-1] // no device_tokens yet
	}
	return allBuckets
}

// Path is the file the store lives in.
func (s *Store) Path() string { return s.path }

// Close releases the file. It waits for running transactions; later calls,
// Close included, fail with registry.ErrClosed.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return fmt.Errorf("close registry %s: %w", s.path, registry.ErrClosed)
	}
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close registry %s: %w", s.path, err)
	}
	return nil
}

// Check runs bbolt's consistency check over the whole file and returns the
// first problem it finds. It blocks writers while it runs.
func (s *Store) Check() error {
	if s.closed.Load() {
		return fmt.Errorf("check registry %s: %w", s.path, registry.ErrClosed)
	}
	// tx.Check reads the freelist, which a concurrent writer changes: run
	// it in a write transaction (rolled back) unless no writer can exist.
	tx, err := s.db.Begin(!s.readOnly)
	if err != nil {
		return s.wrap("check registry "+s.path, err)
	}
	defer func() { _ = tx.Rollback() }()
	if err := firstCheckError(tx); err != nil {
		return fmt.Errorf("check registry %s: %w", s.path, err)
	}
	return nil
}

// firstCheckError drains tx.Check (its goroutine blocks until every error
// is read) and keeps the first error.
func firstCheckError(tx *bolt.Tx) error {
	var first error
	for err := range tx.Check() {
		if first == nil {
			first = err
		}
	}
	return first
}

// Backup writes a consistent copy of the file to w (tx.WriteTo) while the
// store keeps serving; Restore turns it back into a registry file.
func (s *Store) Backup(ctx context.Context, w io.Writer) (int64, error) {
	const op = "back up registry"
	if err := s.ready(ctx); err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	var n int64
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		n, err = tx.WriteTo(w)
		return err
	})
	if err != nil {
		return n, s.wrap(op, err)
	}
	return n, nil
}

// Restore writes a backup made by Backup to path, which must not exist,
// then opens it read-only and runs the consistency check. On any failure
// the new file is removed again.
func Restore(backup io.Reader, path string) (err error) {
	if path == "" {
		return errors.New("restore registry: empty path")
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		// os.ErrExist when the file is there: never overwrite a registry.
		return fmt.Errorf("restore registry: %w", err)
	}
	defer func() {
		if err != nil {
			_ = os.Remove(path)
		}
	}()
	n, err := io.Copy(f, backup)
	if err == nil && n == 0 {
		err = errors.New("backup is empty")
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("restore registry %s: %w", path, err)
	}
	if err := verifyFile(path); err != nil {
		return fmt.Errorf("restore registry %s: %w", path, err)
	}
	return nil
}

// verifyFile checks a file from outside before anyone serves it: the size
// its meta page claims, a full read of every record (bbolt trusts page
// pointers, so a bad one faults; SetPanicOnFault turns that into a panic
// recovered here), the consistency check, and the bucket layout.
func verifyFile(path string) (err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	db, err := openDB(path, Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := db.Close(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("corrupt registry file: %v", r)
		}
	}()
	return db.View(func(tx *bolt.Tx) error {
		if tx.Size() > fi.Size() {
			return fmt.Errorf("truncated: %d bytes, the file claims %d", fi.Size(), tx.Size())
		}
		if err := checkLayout(tx); err != nil {
			return err
		}
		v, _ := getU64(tx.Bucket(bucketMeta), keySchema)
		for _, name := range layoutBuckets(v) {
			if err := tx.Bucket(name).ForEach(func(k, v []byte) error { return nil }); err != nil {
				return err
			}
		}
		if err := firstCheckError(tx); err != nil {
			return fmt.Errorf("consistency check: %w", err)
		}
		return nil
	})
}

// ready refuses work on a closed store or a cancelled context.
func (s *Store) ready(ctx context.Context) error {
	if s.closed.Load() {
		return registry.ErrClosed
	}
	return ctx.Err()
}

// wrap adds op to err and turns bbolt's "not open" into registry.ErrClosed
// (Close ran between ready and the transaction).
func (s *Store) wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return fmt.Errorf("%s: %w", op, registry.ErrClosed)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// update runs fn in one write transaction after the closed/context check.
func (s *Store) update(ctx context.Context, op string, fn func(t *txn) error) error {
	if err := s.ready(ctx); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return s.wrap(op, s.db.Update(func(tx *bolt.Tx) error { return fn(newTxn(tx)) }))
}

// view runs fn in one read transaction after the closed/context check.
func (s *Store) view(ctx context.Context, op string, fn func(t *txn) error) error {
	if err := s.ready(ctx); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return s.wrap(op, s.db.View(func(tx *bolt.Tx) error { return fn(newTxn(tx)) }))
}

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

func getU64(b *bolt.Bucket, key []byte) (uint64, bool) {
	v := b.Get(key)
	if len(v) != 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(v), true
}
