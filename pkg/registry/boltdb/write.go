package boltdb

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/fleetgate/fleetgate/pkg/registry"
)

// errUnchanged rolls back a write transaction that found nothing to do, so
// no empty commit (and fsync) happens. It never leaves the package.
var errUnchanged = errors.New("unchanged")

// CreateTokens stores a batch of tokens and one audit event per token in
// one transaction.
func (s *Store) CreateTokens(ctx context.Context, tokens []registry.Token, actor string) error {
	const op = "create tokens"
	if err := checkActor(actor); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	seen := make(map[string]bool, len(tokens))
	for i, tok := range tokens {
		if err := checkToken(tok); err != nil {
			return fmt.Errorf("%s: token %d: %w", op, i, err)
		}
		if seen[string(tok.Hash)] {
			return fmt.Errorf("%s: token %d: hash repeated in the batch: %w", op, i, registry.ErrConflict)
		}
		seen[string(tok.Hash)] = true
	}
	if len(tokens) == 0 {
		return s.ready(ctx)
	}
	return s.update(ctx, op, func(t *txn) error {
		revoked := make(map[string]bool)
		for i, tok := range tokens {
			if t.tokens.Get(tok.Hash) != nil {
				return fmt.Errorf("token %d for device %q: %w", i, tok.DeviceID, registry.ErrConflict)
			}
			isRevoked, checked := revoked[tok.DeviceID]
			if !checked {
				d, found, err := t.device(tok.DeviceID)
				if err != nil {
					return err
				}
				isRevoked = found && d.Status == registry.StatusRevoked
				revoked[tok.DeviceID] = isRevoked
			}
			if isRevoked {
				return fmt.Errorf("token %d: device %q: %w", i, tok.DeviceID, registry.ErrRevoked)
			}
			// bbolt keeps the key until commit: hand it a private copy.
			if err := put(t.tokens, bytes.Clone(tok.Hash), tok); err != nil {
				return err
			}
			if err := t.deviceTokens.Put(deviceTokenKey(tok.DeviceID, tok.Hash), nil); err != nil {
				return err
			}
			detail := "expires " + tok.ExpiresAt.UTC().Format(time.RFC3339)
			if tok.Batch != "" {
				detail = "batch " + tok.Batch + ", " + detail
			}
			ev := registry.AuditEvent{Time: tok.CreatedAt, Actor: actor, Action: registry.ActionTokenCreate, DeviceID: tok.DeviceID, Detail: detail}
			if _, err := t.appendAudit(ev); err != nil {
				return err
			}
		}
		return nil
	})
}

func checkToken(tok registry.Token) error {
	if err := checkHash(tok.Hash); err != nil {
		return err
	}
	if err := checkDeviceID(tok.DeviceID); err != nil {
		return err
	}
	if err := checkTime("creation time", tok.CreatedAt); err != nil {
		return err
	}
	if !tok.ExpiresAt.After(tok.CreatedAt) {
		return invalid("token expires (%s) before it is created (%s)", tok.ExpiresAt, tok.CreatedAt)
	}
	if !tok.UsedAt.IsZero() {
		return invalid("new token marked used")
	}
	return nil
}

// Enroll consumes the token and records the device, its certificate and
// the audit event in one transaction. bbolt runs one writer at a time, so
// of concurrent enrollments with one token exactly one sees it unused.
// A repeated enrollment of an active device moves EnrolledAt to e.Time.
func (s *Store) Enroll(ctx context.Context, e registry.Enrollment) (registry.Device, error) {
	op := fmt.Sprintf("enroll device %q", e.DeviceID)
	if err := checkEnrollment(e); err != nil {
		return registry.Device{}, fmt.Errorf("%s: %w", op, err)
	}
	var dev registry.Device
	err := s.grouped(ctx, op, func(t *txn) error {
		tok, d, found, err := t.usableToken(e.DeviceID, e.TokenHash, e.Time)
		if err != nil {
			return err
		}
		if t.certs.Get([]byte(e.Cert.Serial)) != nil {
			return fmt.Errorf("certificate %s: %w", e.Cert.Serial, registry.ErrConflict)
		}
		tok.UsedAt = e.Time
		if err := put(t.tokens, bytes.Clone(e.TokenHash), tok); err != nil {
			return err
		}
		cert := e.Cert
		cert.DeviceID = e.DeviceID
		if err := put(t.certs, []byte(cert.Serial), cert); err != nil {
			return err
		}
		if !found {
			d = registry.Device{ID: e.DeviceID, Status: registry.StatusActive}
		}
		d.CurrentSerial = cert.Serial
		d.Serials = append(d.Serials, cert.Serial)
		d.EnrolledAt = e.Time
		if err := put(t.devices, []byte(d.ID), d); err != nil {
			return err
		}
		detail := "token created " + tok.CreatedAt.UTC().Format(time.RFC3339)
		if tok.Batch != "" {
			detail = "batch " + tok.Batch + ", " + detail
		}
		ev := registry.AuditEvent{Time: e.Time, Actor: "device:" + e.DeviceID, Action: registry.ActionEnroll, DeviceID: e.DeviceID, Serial: cert.Serial, Detail: detail}
		if _, err := t.appendAudit(ev); err != nil {
			return err
		}
		dev = d
		return nil
	})
	if err != nil {
		return registry.Device{}, err
	}
	return dev, nil
}

func checkEnrollment(e registry.Enrollment) error {
	if err := checkDeviceID(e.DeviceID); err != nil {
		return err
	}
	if len(e.TokenHash) == 0 {
		// A hash of another length is just an unknown token.
		return invalid("empty token hash")
	}
	if err := checkCert(e.Cert); err != nil {
		return err
	}
	if e.Cert.DeviceID != "" && e.Cert.DeviceID != e.DeviceID {
		return invalid("certificate belongs to device %q", e.Cert.DeviceID)
	}
	return checkTime("enrollment time", e.Time)
}

// Renew records the device's new certificate. The old one stays valid
// until it expires or the device is revoked.
func (s *Store) Renew(ctx context.Context, r registry.Renewal) (registry.Device, error) {
	op := fmt.Sprintf("renew device %q", r.DeviceID)
	if err := checkRenewal(r); err != nil {
		return registry.Device{}, fmt.Errorf("%s: %w", op, err)
	}
	var dev registry.Device
	err := s.grouped(ctx, op, func(t *txn) error {
		d, found, err := t.device(r.DeviceID)
		switch {
		case err != nil:
			return err
		case !found:
			return registry.ErrNotFound
		case d.Status == registry.StatusRevoked:
			return registry.ErrRevoked
		case !slices.Contains(d.Serials, r.OldSerial):
			return fmt.Errorf("serial %s: %w", r.OldSerial, registry.ErrUnknownSerial)
		case t.revocations.Get([]byte(r.OldSerial)) != nil:
			return fmt.Errorf("certificate %s: %w", r.OldSerial, registry.ErrRevoked)
		case t.certs.Get([]byte(r.Cert.Serial)) != nil:
			return fmt.Errorf("certificate %s: %w", r.Cert.Serial, registry.ErrConflict)
		}
		cert := r.Cert
		cert.DeviceID = r.DeviceID
		if err := put(t.certs, []byte(cert.Serial), cert); err != nil {
			return err
		}
		d.CurrentSerial = cert.Serial
		d.Serials = append(d.Serials, cert.Serial)
		d.RenewedAt = r.Time
		if err := put(t.devices, []byte(d.ID), d); err != nil {
			return err
		}
		ev := registry.AuditEvent{Time: r.Time, Actor: "device:" + r.DeviceID, Action: registry.ActionRenew, DeviceID: r.DeviceID, Serial: cert.Serial, Detail: "replaces " + r.OldSerial}
		if _, err := t.appendAudit(ev); err != nil {
			return err
		}
		dev = d
		return nil
	})
	if err != nil {
		return registry.Device{}, err
	}
	return dev, nil
}

func checkRenewal(r registry.Renewal) error {
	if err := checkDeviceID(r.DeviceID); err != nil {
		return err
	}
	if err := checkSerial("old serial", r.OldSerial); err != nil {
		return err
	}
	if err := checkCert(r.Cert); err != nil {
		return err
	}
	if r.Cert.DeviceID != "" && r.Cert.DeviceID != r.DeviceID {
		return invalid("certificate belongs to device %q", r.Cert.DeviceID)
	}
	return checkTime("renewal time", r.Time)
}

// RecordCertificate stores a service or operator certificate with ev.
// Device certificates are refused (ErrInvalid): they enter through Enroll
// and Renew, which tie them to their device. ev.Action defaults to
// registry.ActionCertIssue, ev.Serial to c.Serial, ev.Time to now.
func (s *Store) RecordCertificate(ctx context.Context, c registry.Certificate, ev registry.AuditEvent) error {
	op := fmt.Sprintf("record certificate %q", c.Serial)
	if err := checkCert(c); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if c.DeviceID != "" {
		return fmt.Errorf("%s: %w", op, invalid("device certificates are recorded by enroll and renew"))
	}
	if err := checkActor(ev.Actor); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if ev.Action == "" {
		ev.Action = registry.ActionCertIssue
	}
	if ev.Serial == "" {
		ev.Serial = c.Serial
	}
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	return s.update(ctx, op, func(t *txn) error {
		if t.certs.Get([]byte(c.Serial)) != nil {
			return registry.ErrConflict
		}
		if err := put(t.certs, []byte(c.Serial), c); err != nil {
			return err
		}
		_, err := t.appendAudit(ev)
		return err
	})
}

// RevokeDevice revokes the device, every certificate of it that has not
// expired at now, and deletes its unused tokens, in one transaction.
// Certificates revoked before (RevokeCertificate) keep their revocation.
func (s *Store) RevokeDevice(ctx context.Context, deviceID string, reason int, now time.Time, actor string) (registry.RevokeResult, error) {
	op := fmt.Sprintf("revoke device %q", deviceID)
	if err := checkRevoke(reason, now, actor); err != nil {
		return registry.RevokeResult{}, fmt.Errorf("%s: %w", op, err)
	}
	if err := checkDeviceID(deviceID); err != nil {
		return registry.RevokeResult{}, fmt.Errorf("%s: %w", op, err)
	}
	var res registry.RevokeResult
	err := s.update(ctx, op, func(t *txn) error {
		d, found, err := t.device(deviceID)
		switch {
		case err != nil:
			return err
		case !found:
			return registry.ErrNotFound
		case d.Status == registry.StatusRevoked:
			res = registry.RevokeResult{Device: d, AlreadyRevoked: true}
			return errUnchanged
		}
		revs := []registry.Revocation{}
		done := make(map[string]bool, len(d.Serials))
		for _, serial := range d.Serials {
			if done[serial] || t.revocations.Get([]byte(serial)) != nil {
				continue
			}
			done[serial] = true
			c, found, err := t.certificate(serial)
			if err != nil {
				return err
			}
			if !found {
				return fmt.Errorf("device lists certificate %s the registry does not hold", serial)
			}
			if !now.Before(c.NotAfter) {
				continue // expired: no longer needs a CRL entry
			}
			rev := registry.Revocation{Serial: serial, Subject: c.Subject, DeviceID: deviceID, Reason: reason, RevokedAt: now, NotAfter: c.NotAfter}
			if err := put(t.revocations, []byte(serial), rev); err != nil {
				return err
			}
			revs = append(revs, rev)
		}
		deleted, err := t.deleteTokens(func(tok registry.Token) bool { return tok.UsedAt.IsZero() }, deviceID)
		if err != nil {
			return err
		}
		d.Status = registry.StatusRevoked
		d.RevokedAt = now
		d.RevocationReason = reason
		if err := put(t.devices, []byte(d.ID), d); err != nil {
			return err
		}
		ev := registry.AuditEvent{
			Time: now, Actor: actor, Action: registry.ActionRevoke, DeviceID: deviceID,
			Detail: fmt.Sprintf("reason %d; %d certificates revoked; %d unused tokens deleted", reason, len(revs), deleted),
		}
		if _, err := t.appendAudit(ev); err != nil {
			return err
		}
		res = registry.RevokeResult{Device: d, Revocations: revs}
		return nil
	})
	if err != nil && !errors.Is(err, errUnchanged) {
		return registry.RevokeResult{}, err
	}
	return res, nil
}

func checkRevoke(reason int, now time.Time, actor string) error {
	if err := checkReason(reason); err != nil {
		return err
	}
	if err := checkTime("revocation time", now); err != nil {
		return err
	}
	return checkActor(actor)
}

// deleteTokens deletes the tokens for which match is true, only those of
// deviceID unless it is empty. A device's tokens are found through the
// device_tokens index, so revoking one device reads its own tokens, not
// every token in the registry.
func (t *txn) deleteTokens(match func(registry.Token) bool, deviceID string) (int, error) {
	// Deleting under a running cursor skips keys: collect first.
	var keys [][]byte
	collect := func(hash []byte) error {
		var tok registry.Token
		found, err := get(t.tokens, "token", hash, &tok)
		if err != nil {
			return err
		}
		if found && (deviceID == "" || tok.DeviceID == deviceID) && match(tok) {
			keys = append(keys, deviceTokenKey(tok.DeviceID, hash))
		}
		return nil
	}
	if deviceID != "" {
		prefix := deviceTokenPrefix(deviceID)
		c := t.deviceTokens.Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			if err := collect(k[len(prefix):]); err != nil {
				return 0, err
			}
		}
	} else {
		c := t.tokens.Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			if err := collect(k); err != nil {
				return 0, err
			}
		}
	}
	// keys are index keys: the device ID, a zero byte, the hash.
	for _, k := range keys {
		hash := k[bytes.IndexByte(k, 0)+1:]
		if err := t.tokens.Delete(hash); err != nil {
			return 0, err
		}
		if err := t.deviceTokens.Delete(k); err != nil {
			return 0, err
		}
	}
	return len(keys), nil
}

// RevokeCertificate revokes one certificate, expired or not. Revoking it
// again returns the first revocation unchanged.
func (s *Store) RevokeCertificate(ctx context.Context, serial string, reason int, now time.Time, actor string) (registry.Revocation, error) {
	op := fmt.Sprintf("revoke certificate %q", serial)
	if err := checkSerial("serial", serial); err != nil {
		return registry.Revocation{}, fmt.Errorf("%s: %w", op, err)
	}
	if err := checkRevoke(reason, now, actor); err != nil {
		return registry.Revocation{}, fmt.Errorf("%s: %w", op, err)
	}
	var rev registry.Revocation
	err := s.update(ctx, op, func(t *txn) error {
		old, found, err := t.revocation(serial)
		if err != nil {
			return err
		}
		if found {
			rev = old
			return errUnchanged
		}
		c, found, err := t.certificate(serial)
		if err != nil {
			return err
		}
		if !found {
			return registry.ErrNotFound
		}
		r := registry.Revocation{Serial: serial, Subject: c.Subject, DeviceID: c.DeviceID, Reason: reason, RevokedAt: now, NotAfter: c.NotAfter}
		if err := put(t.revocations, []byte(serial), r); err != nil {
			return err
		}
		ev := registry.AuditEvent{Time: now, Actor: actor, Action: registry.ActionCertRevoke, DeviceID: c.DeviceID, Serial: serial, Detail: fmt.Sprintf("reason %d", reason)}
		if _, err := t.appendAudit(ev); err != nil {
			return err
		}
		rev = r
		return nil
	})
	if err != nil && !errors.Is(err, errUnchanged) {
		return registry.Revocation{}, err
	}
	return rev, nil
}

// AppendAudit appends ev with the next sequence number; a zero ev.Time
// becomes now.
func (s *Store) AppendAudit(ctx context.Context, ev registry.AuditEvent) error {
	const op = "append audit event"
	if err := checkActor(ev.Actor); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if ev.Action == "" {
		return fmt.Errorf("%s: %w", op, invalid("empty action"))
	}
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	return s.update(ctx, op, func(t *txn) error {
		_, err := t.appendAudit(ev)
		return err
	})
}

// NextCRLNumber increments the number kept in the meta bucket; the first
// number is 1.
func (s *Store) NextCRLNumber(ctx context.Context) (uint64, error) {
	var n uint64
	err := s.update(ctx, "next crl number", func(t *txn) error {
		cur, _ := getU64(t.meta, keyCRLNumber)
		if cur == ^uint64(0) {
			return errors.New("crl number exhausted")
		}
		n = cur + 1
		return t.meta.Put(keyCRLNumber, u64(n))
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// TouchLastSeen moves LastSeen forward for the devices it knows; unknown
// devices and zero or older times are skipped. When nothing moves, nothing
// is written.
func (s *Store) TouchLastSeen(ctx context.Context, seen map[string]time.Time) error {
	if len(seen) == 0 {
		return s.ready(ctx)
	}
	err := s.update(ctx, "touch last seen", func(t *txn) error {
		changed := false
		for id, at := range seen {
			if at.IsZero() || id == "" {
				continue
			}
			d, found, err := t.device(id)
			if err != nil {
				return err
			}
			if !found || !at.After(d.LastSeen) {
				continue
			}
			d.LastSeen = at
			if err := put(t.devices, []byte(id), d); err != nil {
				return err
			}
			changed = true
		}
		if !changed {
			return errUnchanged
		}
		return nil
	})
	if err != nil && !errors.Is(err, errUnchanged) {
		return err
	}
	return nil
}

// PruneTokens deletes tokens that expired, or were used, before the given
// time and records one audit event (actor "gateway") when it deleted any.
func (s *Store) PruneTokens(ctx context.Context, before time.Time) (int, error) {
	const op = "prune tokens"
	if err := checkTime("prune time", before); err != nil {
		return 0, fmt.Errorf("%s: %w", op, err)
	}
	var n int
	err := s.update(ctx, op, func(t *txn) error {
		var err error
		n, err = t.deleteTokens(func(tok registry.Token) bool {
			return tok.ExpiresAt.Before(before) || !tok.UsedAt.IsZero() && tok.UsedAt.Before(before)
		}, "")
		if err != nil {
			return err
		}
		if n == 0 {
			return errUnchanged
		}
		ev := registry.AuditEvent{Time: time.Now(), Actor: "gateway", Action: registry.ActionTokensPruned, Detail: fmt.Sprintf("%d tokens expired or used before %s", n, before.UTC().Format(time.RFC3339))}
		_, err = t.appendAudit(ev)
		return err
	})
	if err != nil && !errors.Is(err, errUnchanged) {
		return 0, err
	}
	if err != nil {
		return 0, nil
	}
	return n, nil
}
