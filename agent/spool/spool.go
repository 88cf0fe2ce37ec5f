// Package spool is the agent's store-and-forward queue: every telemetry
// message is written to a bbolt file in the state directory before it is
// sent, and removed only once the gateway has acknowledged it.
//
// The spool assigns each message its device sequence number in the same
// transaction that stores it, so a number is never reused, not after a
// restart nor a power cut, and a consumer can tell a gap (a message lost)
// from a duplicate (a message sent twice). Numbers start at 1.
//
// The spool is bounded by bytes and by message count. When a new message
// does not fit, the oldest messages are dropped to make room (drop-oldest:
// fresh data is worth more than stale data after a long outage), and a
// persistent counter says how many were dropped in all. Each message can
// carry that counter, so the consumer tells a gap the spool made from one
// the network made.
//
// File layout (one bbolt file):
//
//	meta/next_seq   the next sequence number (8 bytes, big-endian)
//	meta/dropped    messages dropped by the bound so far
//	meta/count      messages stored
//	meta/bytes      their accounted size (key + value)
//	msgs/<seq>      uvarint(len(topic)) topic payload
package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Defaults for Options.
const (
	DefaultMaxBytes    = 16 << 20
	DefaultMaxMessages = 100_000
	DefaultLockTimeout = 2 * time.Second
	// MinMaxBytes is the smallest byte bound Open accepts.
	MinMaxBytes = 64 << 10
)

// Errors.
var (
	// ErrTooLarge: a message alone exceeds the spool's byte bound. It is
	// refused without using a sequence number.
	ErrTooLarge = errors.New("message larger than the spool")
	// ErrClosed: the spool was closed.
	ErrClosed = errors.New("spool closed")
	// ErrLocked: another process holds the spool file (another agent on
	// the same state directory).
	ErrLocked = errors.New("spool in use by another process")
)

var (
	bucketMeta = []byte("meta")
	bucketMsgs = []byte("msgs")

	keyNextSeq = []byte("next_seq")
	keyDropped = []byte("dropped")
	keyCount   = []byte("count")
	keyBytes   = []byte("bytes")
)

// Options bound a spool. The zero value means the defaults.
type Options struct {
	// MaxBytes bounds the accounted size of the stored messages (payload,
	// topic and an 8-byte key each). The file itself is larger by bbolt's
	// page overhead, about twice MaxBytes at worst.
	MaxBytes int64
	// MaxMessages bounds the number of stored messages.
	MaxMessages int
	// LockTimeout bounds the wait for the file lock.
	LockTimeout time.Duration
}

func (o *Options) withDefaults() Options {
	var out Options
	if o != nil {
		out = *o
	}
	if out.MaxBytes <= 0 {
		out.MaxBytes = DefaultMaxBytes
	}
	if out.MaxMessages <= 0 {
		out.MaxMessages = DefaultMaxMessages
	}
	if out.LockTimeout <= 0 {
		out.LockTimeout = DefaultLockTimeout
	}
	return out
}

// Message is a stored message.
type Message struct {
	Seq     uint64
	Topic   string
	Payload []byte
}

// Appended reports what Append did.
type Appended struct {
	// Seq is the new message's sequence number.
	Seq uint64
	// Dropped is how many old messages were dropped to make room.
	Dropped int
	// TotalDropped counts every message dropped so far, these included.
	TotalDropped uint64
}

// Stats describes the spool's contents.
type Stats struct {
	// Pending messages and their accounted bytes.
	Pending int
	Bytes   int64
	// Dropped counts every message the bound has dropped.
	Dropped uint64
	// NextSeq is the number the next message gets.
	NextSeq uint64
}

// Spool is an on-disk message queue. It is safe for concurrent use.
type Spool struct {
	db     *bolt.DB
	path   string
	opts   Options
	notify chan struct{}
	closed atomic.Bool
	// closeMu lets Close wait for running calls.
	closeMu sync.RWMutex
}

// Open opens the spool at path, creating the file (mode 0600) when it does
// not exist. The directory must exist.
func Open(path string, opts *Options) (*Spool, error) {
	o := opts.withDefaults()
	if o.MaxBytes < MinMaxBytes {
		return nil, fmt.Errorf("open spool %s: bound of %d bytes is below the minimum %d", path, o.MaxBytes, MinMaxBytes)
	}
	if _, err := os.Stat(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("open spool %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout: o.LockTimeout,
		// The freelist is rebuilt by a scan on open (quick at this size)
		// instead of written with every commit: fewer writes to an SD card.
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
	})
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("open spool %s: waited %s: %w", path, o.LockTimeout, ErrLocked)
	case err != nil:
		return nil, fmt.Errorf("open spool %s: %w", path, err)
	}
	s := &Spool{db: db, path: path, opts: o, notify: make(chan struct{}, 1)}
	if err := db.Update(initLayout); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open spool %s: %w", path, err)
	}
	return s, nil
}

func initLayout(tx *bolt.Tx) error {
	meta, err := tx.CreateBucketIfNotExists(bucketMeta)
	if err != nil {
		return err
	}
	if _, err := tx.CreateBucketIfNotExists(bucketMsgs); err != nil {
		return err
	}
	if meta.Get(keyNextSeq) == nil {
		return meta.Put(keyNextSeq, u64(1))
	}
	return nil
}

// Path is the spool's file.
func (s *Spool) Path() string { return s.path }

// Options are the bounds in effect.
func (s *Spool) Options() Options { return s.opts }

// Notify returns a channel that receives a value after messages were
// appended. It is meant for one reader (the sender).
func (s *Spool) Notify() <-chan struct{} { return s.notify }

// enter guards a call against a concurrent Close.
func (s *Spool) enter() error {
	s.closeMu.RLock()
	if s.closed.Load() {
		s.closeMu.RUnlock()
		return ErrClosed
	}
	return nil
}

func (s *Spool) leave() { s.closeMu.RUnlock() }

// Append stores a new message for topic. build makes its payload from the
// sequence number it gets and the count of messages dropped before it;
// build runs inside the write transaction, so it must be quick and have no
// side effects. When the message does not fit the bounds, the oldest
// messages are dropped. The message is on disk (fsync) when Append returns.
func (s *Spool) Append(topic string, build func(seq, dropped uint64) ([]byte, error)) (Appended, error) {
	res, err := s.AppendBatch([]Entry{{Topic: topic, Build: build}})
	if err != nil {
		return Appended{}, err
	}
	if res[0].Err != nil {
		return Appended{}, fmt.Errorf("spool append: %w", res[0].Err)
	}
	return res[0].Appended, nil
}

// Entry is a message to append: its topic and the function that makes its
// payload (see Append).
type Entry struct {
	Topic string
	Build func(seq, dropped uint64) ([]byte, error)
}

// Result is what became of one Entry.
type Result struct {
	Appended
	// Err: the entry was not stored (its Build failed, or ErrTooLarge).
	Err error
}

// AppendBatch stores several messages in one transaction, one fsync: how
// the spool keeps up with a fast producer (and spares an SD card). Entries
// are numbered in order. An entry whose Build fails or that is too large is
// skipped without using a number, its error in its Result; the others are
// stored. The error return is for the batch as a whole: nothing stored.
func (s *Spool) AppendBatch(entries []Entry) ([]Result, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	var (
		results []Result
		stored  int
	)
	err := s.db.Update(func(tx *bolt.Tx) error {
		results, stored = make([]Result, len(entries)), 0
		meta, msgs := tx.Bucket(bucketMeta), tx.Bucket(bucketMsgs)
		// Keys only ever grow: fill pages up instead of splitting them in
		// half, which would double the file.
		msgs.FillPercent = 0.95
		seq := getU64(meta, keyNextSeq)
		dropped := getU64(meta, keyDropped)
		count, bytes := int64(getU64(meta, keyCount)), int64(getU64(meta, keyBytes))
		c := msgs.Cursor()
		for i, e := range entries {
			r := &results[i]
			payload, err := e.Build(seq, dropped)
			if err != nil {
				r.Err = err
				continue
			}
			value := encodeRecord(e.Topic, payload)
			size := recordSize(value)
			if size > s.opts.MaxBytes {
				r.Err = fmt.Errorf("%w: %d bytes, bound %d", ErrTooLarge, size, s.opts.MaxBytes)
				continue
			}
			for count > 0 && (count+1 > int64(s.opts.MaxMessages) || bytes+size > s.opts.MaxBytes) {
				k, v := c.First()
				if k == nil {
					break
				}
				bytes -= recordSize(v)
				count--
				if err := c.Delete(); err != nil {
					return err
				}
				r.Dropped++
				dropped++
			}
			if err := msgs.Put(u64(seq), value); err != nil {
				return err
			}
			r.Seq, r.TotalDropped = seq, dropped
			seq, count, bytes = seq+1, count+1, bytes+size
			stored++
		}
		return putU64s(meta,
			kv{keyNextSeq, seq},
			kv{keyDropped, dropped},
			kv{keyCount, uint64(count)},
			kv{keyBytes, uint64(bytes)})
	})
	if err != nil {
		return nil, fmt.Errorf("spool append: %w", err)
	}
	if stored > 0 {
		select {
		case s.notify <- struct{}{}:
		default:
		}
	}
	return results, nil
}

// Next returns up to n stored messages with a sequence number above after,
// oldest first.
func (s *Spool) Next(after uint64, n int) ([]Message, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	var out []Message
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketMsgs).Cursor()
		for k, v := c.Seek(u64(after + 1)); k != nil && len(out) < n; k, v = c.Next() {
			topic, payload, err := decodeRecord(v)
			if err != nil {
				return fmt.Errorf("message %d: %w", binary.BigEndian.Uint64(k), err)
			}
			// Copy out: bbolt's slices die with the transaction.
			out = append(out, Message{Seq: binary.BigEndian.Uint64(k), Topic: topic, Payload: append([]byte(nil), payload...)})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("spool read: %w", err)
	}
	return out, nil
}

// Ack removes delivered messages. Numbers no longer stored (dropped, or
// acknowledged before) are ignored.
func (s *Spool) Ack(seqs ...uint64) error {
	if len(seqs) == 0 {
		return nil
	}
	if err := s.enter(); err != nil {
		return err
	}
	defer s.leave()
	err := s.db.Update(func(tx *bolt.Tx) error {
		meta, msgs := tx.Bucket(bucketMeta), tx.Bucket(bucketMsgs)
		count, bytes := getU64(meta, keyCount), getU64(meta, keyBytes)
		for _, seq := range seqs {
			k := u64(seq)
			v := msgs.Get(k)
			if v == nil {
				continue
			}
			size := uint64(recordSize(v))
			if err := msgs.Delete(k); err != nil {
				return err
			}
			count--
			bytes -= size
		}
		return putU64s(meta, kv{keyCount, count}, kv{keyBytes, bytes})
	})
	if err != nil {
		return fmt.Errorf("spool ack: %w", err)
	}
	return nil
}

// Stats reads the counters.
func (s *Spool) Stats() (Stats, error) {
	if err := s.enter(); err != nil {
		return Stats{}, err
	}
	defer s.leave()
	var st Stats
	err := s.db.View(func(tx *bolt.Tx) error {
		st = readStats(tx)
		return nil
	})
	return st, err
}

func readStats(tx *bolt.Tx) Stats {
	meta := tx.Bucket(bucketMeta)
	return Stats{
		Pending: int(getU64(meta, keyCount)),
		Bytes:   int64(getU64(meta, keyBytes)),
		Dropped: getU64(meta, keyDropped),
		NextSeq: getU64(meta, keyNextSeq),
	}
}

// Check runs bbolt's consistency check and verifies the counters against
// the stored messages. It blocks writers while it runs.
func (s *Spool) Check() error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.leave()
	// tx.Check reads the freelist a writer changes: use a write
	// transaction, rolled back.
	tx, err := s.db.Begin(true)
	if err != nil {
		return fmt.Errorf("check spool %s: %w", s.path, err)
	}
	defer func() { _ = tx.Rollback() }()
	if err := checkTx(tx); err != nil {
		return fmt.Errorf("check spool %s: %w", s.path, err)
	}
	return nil
}

func checkTx(tx *bolt.Tx) error {
	var first error
	for err := range tx.Check() {
		if first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	st := readStats(tx)
	var (
		count int
		bytes int64
	)
	err := tx.Bucket(bucketMsgs).ForEach(func(k, v []byte) error {
		if len(k) != 8 {
			return fmt.Errorf("key %x: want 8 bytes", k)
		}
		seq := binary.BigEndian.Uint64(k)
		if seq == 0 || seq >= st.NextSeq {
			return fmt.Errorf("message %d outside 1..%d", seq, st.NextSeq-1)
		}
		if _, _, err := decodeRecord(v); err != nil {
			return fmt.Errorf("message %d: %w", seq, err)
		}
		count++
		bytes += recordSize(v)
		return nil
	})
	if err != nil {
		return err
	}
	if count != st.Pending || bytes != st.Bytes {
		return fmt.Errorf("counters say %d messages, %d bytes; the file holds %d, %d bytes", st.Pending, st.Bytes, count, bytes)
	}
	return nil
}

// Close closes the file, waiting for running calls. Later calls fail with
// ErrClosed.
func (s *Spool) Close() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed.Swap(true) {
		return ErrClosed
	}
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close spool %s: %w", s.path, err)
	}
	return nil
}

// ReadStats opens the spool file at path read-only (it must not be in use)
// and returns its counters and the sequence numbers still stored. It is
// for tools and tests that inspect a stopped agent's spool.
func ReadStats(path string) (Stats, []uint64, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: DefaultLockTimeout})
	if err != nil {
		return Stats{}, nil, fmt.Errorf("open spool %s: %w", path, err)
	}
	defer db.Close()
	var (
		st   Stats
		seqs []uint64
	)
	err = db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMeta) == nil || tx.Bucket(bucketMsgs) == nil {
			return errors.New("not a spool file")
		}
		st = readStats(tx)
		return tx.Bucket(bucketMsgs).ForEach(func(k, _ []byte) error {
			seqs = append(seqs, binary.BigEndian.Uint64(k))
			return nil
		})
	})
	if err != nil {
		return Stats{}, nil, fmt.Errorf("read spool %s: %w", path, err)
	}
	return st, seqs, nil
}

// recordSize is what a message counts against MaxBytes.
func recordSize(value []byte) int64 { return int64(8 + len(value)) }

func encodeRecord(topic string, payload []byte) []byte {
	b := make([]byte, 0, binary.MaxVarintLen64+len(topic)+len(payload))
	b = binary.AppendUvarint(b, uint64(len(topic)))
	b = append(b, topic...)
	return append(b, payload...)
}

func decodeRecord(v []byte) (string, []byte, error) {
	n, w := binary.Uvarint(v)
	if w <= 0 || n > uint64(len(v)-w) {
		return "", nil, errors.New("corrupt record")
	}
	return string(v[w : w+int(n)]), v[w+int(n):], nil
}

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

func getU64(b *bolt.Bucket, k []byte) uint64 {
	v := b.Get(k)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

// kv is one counter of the meta bucket.
type kv struct {
	k []byte
	v uint64
}

func putU64s(b *bolt.Bucket, pairs ...kv) error {
	for _, p := range pairs {
		if err := b.Put(p.k, u64(p.v)); err != nil {
			return err
		}
	}
	return nil
}
