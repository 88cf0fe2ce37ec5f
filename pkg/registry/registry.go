// Package registry defines the store that knows every device, certificate,
// enrollment token, revocation and audit event of a fleet.
//
// Store is a plug-in point: the embedded default is bbolt (package
// registry/boltdb); a store shared by several gateways (etcd) is planned.
// Every implementation must pass registrytest.Run.
//
// Methods that change state do so atomically: either every record of the
// operation and its audit event are committed durably, or nothing is.
package registry

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"io"
	"time"
)

// Sentinel errors. Implementations wrap them with context; callers test with
// errors.Is and map them to transport codes at the edge.
var (
	// ErrNotFound: no such device, certificate or token.
	ErrNotFound = errors.New("not found")
	// ErrTokenInvalid: no token with this value is bound to this device.
	// Unknown tokens and tokens of another device are the same error, so a
	// caller learns nothing about other devices.
	ErrTokenInvalid = errors.New("invalid enrollment token")
	// ErrTokenUsed: the token was already consumed by an enrollment.
	ErrTokenUsed = errors.New("enrollment token already used")
	// ErrTokenExpired: the token's TTL has passed.
	ErrTokenExpired = errors.New("enrollment token expired")
	// ErrRevoked: the device (or certificate) is revoked, for good.
	ErrRevoked = errors.New("revoked")
	// ErrUnknownSerial: a renewal presented a certificate the registry does
	// not hold for this device.
	ErrUnknownSerial = errors.New("certificate not issued to this device")
	// ErrConflict: a record with this key exists already.
	ErrConflict = errors.New("already exists")
	// ErrInvalid: the request itself is malformed (empty ID, missing field).
	ErrInvalid = errors.New("invalid request")
	// ErrClosed: the store is closed.
	ErrClosed = errors.New("registry closed")
)

// DeviceStatus is the life-cycle state of a device.
type DeviceStatus string

// Device states. A revoked device never becomes active again.
const (
	StatusActive  DeviceStatus = "active"
	StatusRevoked DeviceStatus = "revoked"
)

// Device is one enrolled device.
type Device struct {
	ID     string       `json:"id"`
	Status DeviceStatus `json:"status"`
	// CurrentSerial is the serial (lower-case hex) of the newest certificate.
	CurrentSerial string `json:"current_serial"`
	// Serials lists every certificate ever issued to the device, oldest first.
	Serials    []string  `json:"serials"`
	EnrolledAt time.Time `json:"enrolled_at"`
	// RenewedAt is the time of the last renewal; zero before the first.
	RenewedAt time.Time `json:"renewed_at,omitzero"`
	// LastSeen is the last MQTT connect or disconnect the gateway flushed.
	LastSeen  time.Time `json:"last_seen,omitzero"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	// RevocationReason is an RFC 5280 CRLReason code; meaningful when revoked.
	RevocationReason int `json:"revocation_reason,omitempty"`
}

// Certificate is an issued certificate as the registry keeps it.
type Certificate struct {
	// Serial in lower-case hex without separators.
	Serial string `json:"serial"`
	// Subject is the SPIFFE ID the certificate speaks for.
	Subject string `json:"subject"`
	// DeviceID is set for device certificates.
	DeviceID  string    `json:"device_id,omitempty"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// DER is the certificate itself.
	DER []byte `json:"der"`
}

// Token is a one-time enrollment token. The registry never sees the token
// itself, only its SHA-256 hash.
type Token struct {
	Hash      []byte    `json:"hash"`
	DeviceID  string    `json:"device_id"`
	Batch     string    `json:"batch,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
	// UsedAt is set when an enrollment consumed the token.
	UsedAt time.Time `json:"used_at,omitzero"`
}

// Revocation is one revoked certificate serial.
type Revocation struct {
	Serial    string    `json:"serial"`
	Subject   string    `json:"subject"`
	DeviceID  string    `json:"device_id,omitempty"`
	Reason    int       `json:"reason"`
	RevokedAt time.Time `json:"revoked_at"`
	// NotAfter of the certificate: once passed, the serial may leave the CRL.
	NotAfter time.Time `json:"not_after"`
}

// AuditEvent is one entry of the append-only audit log.
type AuditEvent struct {
	// Seq is assigned by the store, strictly increasing.
	Seq  uint64    `json:"seq"`
	Time time.Time `json:"time"`
	// Actor is who caused the event: "operator:NAME", "device:ID",
	// "service:NAME" or "gateway".
	Actor string `json:"actor"`
	// Action names what happened, e.g. "device.enroll".
	Action   string `json:"action"`
	DeviceID string `json:"device_id,omitempty"`
	Serial   string `json:"serial,omitempty"`
	Detail   string `json:"detail,omitempty"`
}

// Audit actions written by the store itself.
const (
	ActionTokenCreate  = "token.create"
	ActionEnroll       = "device.enroll"
	ActionRenew        = "device.renew"
	ActionRevoke       = "device.revoke"
	ActionCertIssue    = "cert.issue"
	ActionCertRevoke   = "cert.revoke"
	ActionTokensPruned = "token.prune"
)

// Enrollment is a device trading a token for its first (or a fresh)
// certificate.
type Enrollment struct {
	DeviceID  string
	TokenHash []byte
	Cert      Certificate
	Time      time.Time
}

// Renewal is a device trading a valid certificate for a new one.
type Renewal struct {
	DeviceID string
	// OldSerial is the serial of the certificate the device authenticated with.
	OldSerial string
	Cert      Certificate
	Time      time.Time
}

// RevokeResult is what a device revocation did.
type RevokeResult struct {
	Device Device
	// Revocations lists the serials revoked by this call (all unexpired
	// certificates of the device); empty when it was revoked before.
	Revocations []Revocation
	// AlreadyRevoked is true when the device was revoked before this call.
	AlreadyRevoked bool
}

// DeviceFilter selects devices to list, in ID order.
type DeviceFilter struct {
	// Status keeps only devices in this state; empty keeps all.
	Status DeviceStatus
	// Prefix keeps only IDs with this prefix.
	Prefix string
	// After starts the listing after this ID (pagination).
	After string
	// Limit caps the number returned; 0 means no limit.
	Limit int
}

// AuditFilter selects audit events, oldest first.
type AuditFilter struct {
	// AfterSeq starts after this sequence number.
	AfterSeq uint64
	// DeviceID keeps only events about this device.
	DeviceID string
	// Limit caps the number returned; 0 means no limit.
	Limit int
}

// Store is the registry. Implementations are safe for concurrent use.
type Store interface {
	// CreateTokens stores tokens (hashes only) and one audit event per
	// token, all or nothing. It fails with ErrRevoked if a token is bound
	// to a revoked device and ErrConflict if a hash exists already.
	CreateTokens(ctx context.Context, tokens []Token, actor string) error
	// CheckToken is a read-only pre-check of a token for deviceID at now,
	// so expensive work is skipped for a bad token. Enroll checks again.
	CheckToken(ctx context.Context, deviceID string, hash []byte, now time.Time) error
	// Enroll consumes the token, records the device (new, or active and
	// enrolling afresh) and its certificate and appends an audit event, in
	// one transaction. Of concurrent calls with one token exactly one
	// succeeds. Errors: ErrTokenInvalid, ErrTokenUsed, ErrTokenExpired,
	// ErrRevoked, ErrConflict (serial exists), ErrInvalid.
	Enroll(ctx context.Context, e Enrollment) (Device, error)
	// Renew records a new certificate for an active device that
	// authenticated with OldSerial, one of its unrevoked certificates.
	// Errors: ErrNotFound, ErrRevoked, ErrUnknownSerial, ErrConflict.
	Renew(ctx context.Context, r Renewal) (Device, error)
	// RecordCertificate stores a non-device certificate (service,
	// operator) with its audit event.
	RecordCertificate(ctx context.Context, c Certificate, ev AuditEvent) error
	// RevokeDevice marks a device revoked, revokes every unexpired
	// certificate it holds, deletes its unused tokens and appends an audit
	// event. Revoking a revoked device changes nothing and reports
	// AlreadyRevoked. ErrNotFound for an unknown device.
	RevokeDevice(ctx context.Context, deviceID string, reason int, now time.Time, actor string) (RevokeResult, error)
	// RevokeCertificate revokes one certificate by serial (for service and
	// operator certificates). Revoking it twice is not an error.
	RevokeCertificate(ctx context.Context, serial string, reason int, now time.Time, actor string) (Revocation, error)

	// Device returns one device or ErrNotFound.
	Device(ctx context.Context, id string) (Device, error)
	// Devices lists devices in ID order.
	Devices(ctx context.Context, f DeviceFilter) ([]Device, error)
	// Certificate returns one certificate by serial or ErrNotFound.
	Certificate(ctx context.Context, serial string) (Certificate, error)
	// Revocations returns every revocation, in serial order.
	Revocations(ctx context.Context) ([]Revocation, error)
	// Audit lists audit events.
	Audit(ctx context.Context, f AuditFilter) ([]AuditEvent, error)
	// AppendAudit appends one event (Seq is assigned).
	AppendAudit(ctx context.Context, ev AuditEvent) error

	// NextCRLNumber returns a CRL number greater than every number it
	// returned before, also across restarts.
	NextCRLNumber(ctx context.Context) (uint64, error)
	// TouchLastSeen records last-seen times of devices in one
	// transaction; unknown devices are skipped. Times never move backwards.
	TouchLastSeen(ctx context.Context, seen map[string]time.Time) error
	// PruneTokens deletes tokens that expired or were used before t and
	// returns how many it deleted.
	PruneTokens(ctx context.Context, before time.Time) (int, error)

	// Backup writes a consistent copy of the whole store to w.
	Backup(ctx context.Context, w io.Writer) (int64, error)
	// Close releases the store. Calls after Close fail with ErrClosed.
	Close() error
}

// TokenBytes is the entropy of a token: 192 bits.
const TokenBytes = 24

// NewToken returns a fresh random enrollment token and its hash.
func NewToken() (token string, hash []byte, err error) {
	b := make([]byte, TokenBytes)
	if _, err := rand.Read(b); err != nil {
		return "", nil, err
	}
	token = base64.RawURLEncoding.EncodeToString(b)
	return token, HashToken(token), nil
}

// HashToken is the stored form of a token. A plain SHA-256 suffices: the
// token carries 192 random bits, so there is nothing to brute-force.
func HashToken(token string) []byte {
	sum := sha256.Sum256([]byte(token))
	return sum[:]
}

// HashEqual compares two token hashes in constant time.
func HashEqual(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }
