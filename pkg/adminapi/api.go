// Package adminapi is the gateway's operator API over mutual TLS: its
// request and answer types and a client. Only operator certificates are
// admitted. Answers are JSON; errors are a status code and a plain-text
// reason.
package adminapi

import "time"

// Paths of the API.
const (
	PathTokens       = "/v1/tokens"
	PathDevices      = "/v1/devices"
	PathCertificates = "/v1/certificates"
	PathAudit        = "/v1/audit"
	PathCRL          = "/v1/crl"
	PathBackup       = "/v1/backup"
)

// MaxBodySize bounds every request body.
const MaxBodySize = 1 << 20

// MaxTokensPerRequest bounds one token batch.
const MaxTokensPerRequest = 10000

// TokenRequest mints one-time enrollment tokens.
type TokenRequest struct {
	// DeviceIDs to mint a token for, one each.
	DeviceIDs []string `json:"device_ids"`
	// TTL of the tokens, e.g. "24h"; the gateway's default when empty.
	TTL string `json:"ttl,omitempty"`
	// Batch labels the tokens (a factory line, an order) in the audit log.
	Batch string `json:"batch,omitempty"`
}

// Token is a minted token. Its value is shown once and never stored.
type Token struct {
	DeviceID  string    `json:"device_id"`
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expires_at"`
}

// TokenResponse answers a TokenRequest.
type TokenResponse struct {
	Tokens []Token `json:"tokens"`
}

// Device is a device as the API shows it.
type Device struct {
	ID               string    `json:"id"`
	Status           string    `json:"status"`
	CurrentSerial    string    `json:"current_serial"`
	CertNotAfter     time.Time `json:"cert_not_after,omitzero"`
	EnrolledAt       time.Time `json:"enrolled_at"`
	RenewedAt        time.Time `json:"renewed_at,omitzero"`
	LastSeen         time.Time `json:"last_seen,omitzero"`
	Connected        bool      `json:"connected"`
	RevokedAt        time.Time `json:"revoked_at,omitzero"`
	RevocationReason string    `json:"revocation_reason,omitempty"`
}

// Certificate is one issued certificate.
type Certificate struct {
	Serial    string    `json:"serial"`
	Subject   string    `json:"subject"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	Revoked   bool      `json:"revoked"`
}

// DeviceDetail is one device with its certificates.
type DeviceDetail struct {
	Device
	Certificates []Certificate `json:"certificates"`
}

// DeviceList answers a device listing.
type DeviceList struct {
	Devices []Device `json:"devices"`
	// Next is the cursor for the next page; empty on the last page.
	Next string `json:"next,omitempty"`
}

// RevokeRequest revokes a device or a certificate.
type RevokeRequest struct {
	// Reason is an RFC 5280 reason name, e.g. "keyCompromise".
	Reason string `json:"reason,omitempty"`
}

// RevokeResponse says what a device revocation did.
type RevokeResponse struct {
	Device         Device   `json:"device"`
	RevokedSerials []string `json:"revoked_serials"`
	AlreadyRevoked bool     `json:"already_revoked"`
	// Disconnected is true when a live MQTT session was cut.
	Disconnected bool `json:"disconnected"`
	// CRLNumber of the CRL that lists the revocation.
	CRLNumber uint64 `json:"crl_number"`
}

// CertificateRequest asks for a service or operator certificate.
type CertificateRequest struct {
	// Role is "service" or "operator".
	Role string `json:"role"`
	Name string `json:"name"`
	// CSR in PEM; its key stays with the requester.
	CSR string `json:"csr"`
	// TTL e.g. "8760h"; the gateway's default when empty.
	TTL string `json:"ttl,omitempty"`
}

// CertificateResponse carries the issued certificate.
type CertificateResponse struct {
	Serial string `json:"serial"`
	// Chain in PEM: the certificate, then the issuing CA.
	Chain    string    `json:"chain"`
	NotAfter time.Time `json:"not_after"`
}

// AuditEvent is one audit log entry.
type AuditEvent struct {
	Seq      uint64    `json:"seq"`
	Time     time.Time `json:"time"`
	Actor    string    `json:"actor"`
	Action   string    `json:"action"`
	DeviceID string    `json:"device_id,omitempty"`
	Serial   string    `json:"serial,omitempty"`
	Detail   string    `json:"detail,omitempty"`
}

// AuditList answers an audit query.
type AuditList struct {
	Events []AuditEvent `json:"events"`
}
