package boltdb

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/fleetgate/fleetgate/pkg/registry"
)

// CheckToken runs Enroll's token checks in a read transaction.
func (s *Store) CheckToken(ctx context.Context, deviceID string, hash []byte, now time.Time) error {
	op := fmt.Sprintf("check token of device %q", deviceID)
	if err := checkDeviceID(deviceID); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if len(hash) == 0 {
		return fmt.Errorf("%s: %w", op, invalid("empty token hash"))
	}
	if err := checkTime("time", now); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return s.view(ctx, op, func(t *txn) error {
		_, _, _, err := t.usableToken(deviceID, hash, now)
		return err
	})
}

// Device returns one device.
func (s *Store) Device(ctx context.Context, id string) (registry.Device, error) {
	op := fmt.Sprintf("device %q", id)
	if id == "" {
		return registry.Device{}, fmt.Errorf("%s: %w", op, invalid("empty device id"))
	}
	var d registry.Device
	err := s.view(ctx, op, func(t *txn) error {
		var found bool
		var err error
		d, found, err = t.device(id)
		if err == nil && !found {
			err = registry.ErrNotFound
		}
		return err
	})
	if err != nil {
		return registry.Device{}, err
	}
	return d, nil
}

// Devices lists devices in ID order, seeking straight to the prefix or the
// pagination cursor.
func (s *Store) Devices(ctx context.Context, f registry.DeviceFilter) ([]registry.Device, error) {
	const op = "list devices"
	if err := checkLimit(f.Limit); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	out := []registry.Device{}
	err := s.view(ctx, op, func(t *txn) error {
		start := f.Prefix
		if f.After > start {
			start = f.After
		}
		c := t.devices.Cursor()
		k, v := c.Seek([]byte(start))
		if f.After != "" && k != nil && string(k) == f.After {
			k, v = c.Next()
		}
		for ; k != nil && hasPrefix(k, f.Prefix); k, v = c.Next() {
			var d registry.Device
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode device %q: %w", k, err)
			}
			if f.Status != "" && d.Status != f.Status {
				continue
			}
			out = append(out, d)
			if f.Limit > 0 && len(out) == f.Limit {
				break
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Certificate returns one certificate by serial.
func (s *Store) Certificate(ctx context.Context, serial string) (registry.Certificate, error) {
	op := fmt.Sprintf("certificate %q", serial)
	if serial == "" {
		return registry.Certificate{}, fmt.Errorf("%s: %w", op, invalid("empty serial"))
	}
	var c registry.Certificate
	err := s.view(ctx, op, func(t *txn) error {
		var found bool
		var err error
		c, found, err = t.certificate(serial)
		if err == nil && !found {
			err = registry.ErrNotFound
		}
		return err
	})
	if err != nil {
		return registry.Certificate{}, err
	}
	return c, nil
}

// Revocations returns every revocation in serial order, expired ones
// included: dropping them from a CRL is the CRL writer's choice.
func (s *Store) Revocations(ctx context.Context) ([]registry.Revocation, error) {
	out := []registry.Revocation{}
	err := s.view(ctx, "list revocations", func(t *txn) error {
		return t.revocations.ForEach(func(k, v []byte) error {
			var r registry.Revocation
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode revocation %q: %w", k, err)
			}
			out = append(out, r)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Audit lists audit events oldest first. Keys are big-endian sequence
// numbers, so AfterSeq is a seek.
func (s *Store) Audit(ctx context.Context, f registry.AuditFilter) ([]registry.AuditEvent, error) {
	const op = "list audit events"
	if err := checkLimit(f.Limit); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	out := []registry.AuditEvent{}
	if f.AfterSeq == ^uint64(0) {
		return out, s.ready(ctx)
	}
	// Events about a device carry "device_id":"<id>"; the byte test skips
	// decoding the others. IDs that need escaping match no event anyway.
	var needle []byte
	if f.DeviceID != "" {
		needle, _ = json.Marshal(f.DeviceID)
		needle = append([]byte(`"device_id":`), needle...)
	}
	err := s.view(ctx, op, func(t *txn) error {
		c := t.audit.Cursor()
		for k, v := c.Seek(u64(f.AfterSeq + 1)); k != nil; k, v = c.Next() {
			if needle != nil && !bytes.Contains(v, needle) {
				continue
			}
			var ev registry.AuditEvent
			if err := json.Unmarshal(v, &ev); err != nil {
				return fmt.Errorf("decode audit event %x: %w", k, err)
			}
			if f.DeviceID != "" && ev.DeviceID != f.DeviceID {
				continue
			}
			out = append(out, ev)
			if f.Limit > 0 && len(out) == f.Limit {
				break
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
