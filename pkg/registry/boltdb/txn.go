package boltdb

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/registry"
)

// txn is one transaction with its buckets at hand. Open checked that every
// bucket exists, and the file lock keeps it that way.
type txn struct {
	devices, certs, tokens, revocations, audit, meta *bolt.Bucket
	// deviceTokens is nil only in a read-only store of schema version 1,
	// which never writes.
	deviceTokens *bolt.Bucket
}

func newTxn(tx *bolt.Tx) *txn {
	return &txn{
		devices:      tx.Bucket(bucketDevices),
		certs:        tx.Bucket(bucketCerts),
		tokens:       tx.Bucket(bucketTokens),
		revocations:  tx.Bucket(bucketRevocations),
		audit:        tx.Bucket(bucketAudit),
		meta:         tx.Bucket(bucketMeta),
		deviceTokens: tx.Bucket(bucketDeviceTokens),
	}
}

// get decodes the record at key into v and reports whether there was one.
// Decoding copies everything out of bbolt's memory, so v outlives the
// transaction.
func get(b *bolt.Bucket, what string, key []byte, v any) (bool, error) {
	data := b.Get(key)
	if data == nil {
		return false, nil
	}
	if err := json.Unmarshal(data, v); err != nil {
		return true, fmt.Errorf("decode %s %q: %w", what, key, err)
	}
	return true, nil
}

func put(b *bolt.Bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode record %q: %w", key, err)
	}
	return b.Put(key, data)
}

func (t *txn) device(id string) (registry.Device, bool, error) {
	var d registry.Device
	ok, err := get(t.devices, "device", []byte(id), &d)
	return d, ok, err
}

func (t *txn) certificate(serial string) (registry.Certificate, bool, error) {
	var c registry.Certificate
	ok, err := get(t.certs, "certificate", []byte(serial), &c)
	return c, ok, err
}

func (t *txn) revocation(serial string) (registry.Revocation, bool, error) {
	var r registry.Revocation
	ok, err := get(t.revocations, "revocation", []byte(serial), &r)
	return r, ok, err
}

// appendAudit stores ev under the bucket's next sequence number. A rolled
// back transaction takes its sequence numbers with it, so committed events
// stay strictly increasing.
func (t *txn) appendAudit(ev registry.AuditEvent) (uint64, error) {
	seq, err := t.audit.NextSequence()
	if err != nil {
		return 0, fmt.Errorf("audit sequence: %w", err)
	}
	ev.Seq = seq
	if err := put(t.audit, u64(seq), ev); err != nil {
		return 0, fmt.Errorf("append audit event: %w", err)
	}
	return seq, nil
}

// usableToken checks a token for deviceID at now and returns it with the
// device record, when there is one (found), which it reads anyway for the
// revocation check. The order matters: nothing about a device is revealed
// to a caller whose token is not bound to it.
func (t *txn) usableToken(deviceID string, hash []byte, now time.Time) (tok registry.Token, d registry.Device, found bool, err error) {
	found, err = get(t.tokens, "token", hash, &tok)
	if err != nil {
		return tok, d, false, err
	}
	// The key lookup already matched; the constant-time compare guards
	// against a record whose stored hash disagrees with its key.
	if !found || !registry.HashEqual(tok.Hash, hash) || tok.DeviceID != deviceID {
		return tok, d, false, registry.ErrTokenInvalid
	}
	if !tok.UsedAt.IsZero() {
		return tok, d, false, registry.ErrTokenUsed
	}
	if !now.Before(tok.ExpiresAt) {
		return tok, d, false, registry.ErrTokenExpired
	}
	d, found, err = t.device(deviceID)
	if err != nil {
		return tok, d, false, err
	}
	if found && d.Status == registry.StatusRevoked {
		return tok, d, found, fmt.Errorf("device %q: %w", deviceID, registry.ErrRevoked)
	}
	return tok, d, found, nil
}

// Input checks. Every failure wraps registry.ErrInvalid.

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{registry.ErrInvalid}, args...)...)
}

// checkDeviceID applies the identity name grammar: device IDs end up in
// MQTT topics, file names and SPIFFE IDs.
func checkDeviceID(id string) error {
	if id == "" {
		return invalid("empty device id")
	}
	if !identity.ValidDeviceID(id) {
		return invalid("device id %q", id)
	}
	return nil
}

// maxSerialLen allows 32 octets, more than RFC 5280's 20.
const maxSerialLen = 64

func checkSerial(what, s string) error {
	if s == "" {
		return invalid("empty %s", what)
	}
	if len(s) > maxSerialLen {
		return invalid("%s of %d characters", what, len(s))
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return invalid("%s %q is not lower-case hex", what, s)
		}
	}
	return nil
}

func checkCert(c registry.Certificate) error {
	if err := checkSerial("certificate serial", c.Serial); err != nil {
		return err
	}
	if len(c.DER) == 0 {
		return invalid("certificate %s has no DER", c.Serial)
	}
	if c.NotAfter.IsZero() {
		return invalid("certificate %s has no NotAfter", c.Serial)
	}
	return nil
}

func checkTime(what string, t time.Time) error {
	if t.IsZero() {
		return invalid("zero %s", what)
	}
	return nil
}

func checkActor(actor string) error {
	if actor == "" {
		return invalid("empty actor")
	}
	return nil
}

func checkHash(h []byte) error {
	switch {
	case len(h) == 0:
		return invalid("empty token hash")
	case len(h) != sha256.Size:
		return invalid("token hash of %d bytes, want %d", len(h), sha256.Size)
	}
	return nil
}

// checkReason accepts the RFC 5280 CRLReason codes except certificateHold
// (6) and removeFromCRL (8): revocation in fleetgate is permanent. 7 is
// unassigned.
func checkReason(r int) error {
	if r < 0 || r > 10 || r == 6 || r == 7 || r == 8 {
		return invalid("revocation reason %d", r)
	}
	return nil
}

func checkLimit(n int) error {
	if n < 0 {
		return invalid("negative limit %d", n)
	}
	return nil
}

func hasPrefix(k []byte, prefix string) bool { return bytes.HasPrefix(k, []byte(prefix)) }
