// Package identity defines who a certificate speaks for: a device, a backend
// service or an operator, named inside one SPIFFE trust domain.
//
// Every certificate the gateway issues carries exactly one URI SAN of the form
// spiffe://<trust-domain>/<role>/<name>. The gateway never trusts the subject
// common name for authorization; it reads the role and name from that URI.
package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Role is what a certificate holder may do.
type Role string

// The roles the gateway knows.
const (
	RoleDevice   Role = "device"
	RoleService  Role = "service"
	RoleOperator Role = "operator"
)

// Errors returned by this package.
var (
	ErrInvalidName        = errors.New("invalid name")
	ErrInvalidTrustDomain = errors.New("invalid trust domain")
	ErrNoIdentity         = errors.New("certificate carries no fleetgate identity")
	ErrForeignDomain      = errors.New("identity belongs to another trust domain")
)

// MaxNameLen is the longest device, service or operator name.
const MaxNameLen = 63

// ValidateName reports whether s follows the name grammar
// ^[a-z0-9][a-z0-9._-]{0,62}$ shared by devices, services and operators.
// Names that pass are safe as MQTT topic levels and as file names.
func ValidateName(s string) error {
	if len(s) == 0 {
		return fmt.Errorf("%w: empty", ErrInvalidName)
	}
	if len(s) > MaxNameLen {
		return fmt.Errorf("%w: %d characters, at most %d", ErrInvalidName, len(s), MaxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return fmt.Errorf("%w %q: only a-z, 0-9 and . _ - (not first) are allowed", ErrInvalidName, s)
		}
	}
	if s == "." || s == ".." {
		return fmt.Errorf("%w %q", ErrInvalidName, s)
	}
	return nil
}

// ValidDeviceID is ValidateName as a predicate, for hot paths that need no message.
func ValidDeviceID(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || i > 0 && (c == '.' || c == '_' || c == '-')) {
			return false
		}
	}
	return true
}

// ValidateTrustDomain checks a SPIFFE trust domain name (lower-case letters,
// digits, dots, dashes and underscores).
func ValidateTrustDomain(td string) error {
	if td == "" || len(td) > 255 {
		return fmt.Errorf("%w: %q", ErrInvalidTrustDomain, td)
	}
	for i := 0; i < len(td); i++ {
		c := td[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return fmt.Errorf("%w %q: only a-z, 0-9, '.', '-' and '_' are allowed", ErrInvalidTrustDomain, td)
		}
	}
	return nil
}

// Identity is the role and name a certificate speaks for.
type Identity struct {
	TrustDomain string
	Role        Role
	Name        string
}

// Device returns the identity of device id in trust domain td.
func Device(td, id string) Identity { return Identity{TrustDomain: td, Role: RoleDevice, Name: id} }

// Service returns the identity of backend service name in trust domain td.
func Service(td, name string) Identity {
	return Identity{TrustDomain: td, Role: RoleService, Name: name}
}

// Operator returns the identity of operator name in trust domain td.
func Operator(td, name string) Identity {
	return Identity{TrustDomain: td, Role: RoleOperator, Name: name}
}

// URI is the SPIFFE ID of the identity.
func (id Identity) URI() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: "/" + string(id.Role) + "/" + id.Name}
}

// String returns the SPIFFE ID as text.
func (id Identity) String() string { return id.URI().String() }

// Validate checks the trust domain, role and name.
func (id Identity) Validate() error {
	if err := ValidateTrustDomain(id.TrustDomain); err != nil {
		return err
	}
	switch id.Role {
	case RoleDevice, RoleService, RoleOperator:
	default:
		return fmt.Errorf("%w: unknown role %q", ErrNoIdentity, id.Role)
	}
	return ValidateName(id.Name)
}

// Parse reads a SPIFFE ID of the form spiffe://td/role/name.
func Parse(u *url.URL) (Identity, error) {
	if u == nil || u.Scheme != "spiffe" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Port() != "" {
		return Identity{}, fmt.Errorf("%w: not a SPIFFE ID", ErrNoIdentity)
	}
	// SPIFFE IDs are never percent-encoded: refuse an encoded path rather
	// than read "device%2Fx" as device "x".
	if u.RawPath != "" || strings.Contains(u.EscapedPath(), "%") {
		return Identity{}, fmt.Errorf("%w: percent-encoded path", ErrNoIdentity)
	}
	role, name, ok := strings.Cut(strings.TrimPrefix(u.Path, "/"), "/")
	if !ok || !strings.HasPrefix(u.Path, "/") {
		return Identity{}, fmt.Errorf("%w: path %q is not /role/name", ErrNoIdentity, u.Path)
	}
	id := Identity{TrustDomain: u.Host, Role: Role(role), Name: name}
	if err := id.Validate(); err != nil {
		return Identity{}, err
	}
	return id, nil
}

// FromCertificate maps a verified end-entity certificate to its identity in
// trust domain td. It refuses CA certificates, certificates with no or several
// URI SANs, and identities of another trust domain, so a certificate can only
// ever speak for one name.
func FromCertificate(cert *x509.Certificate, td string) (Identity, error) {
	if cert == nil {
		return Identity{}, fmt.Errorf("%w: no certificate", ErrNoIdentity)
	}
	if cert.IsCA {
		return Identity{}, fmt.Errorf("%w: a CA certificate is not a client identity", ErrNoIdentity)
	}
	if len(cert.URIs) != 1 {
		return Identity{}, fmt.Errorf("%w: %d URI SANs, want exactly one", ErrNoIdentity, len(cert.URIs))
	}
	id, err := Parse(cert.URIs[0])
	if err != nil {
		return Identity{}, err
	}
	if id.TrustDomain != td {
		return Identity{}, fmt.Errorf("%w: %q, want %q", ErrForeignDomain, id.TrustDomain, td)
	}
	if id.Role == RoleDevice && cert.Subject.CommonName != id.Name {
		return Identity{}, fmt.Errorf("%w: common name %q does not match device %q", ErrNoIdentity, cert.Subject.CommonName, id.Name)
	}
	return id, nil
}

// TrustDomainOf reads the trust domain from a CA certificate, which carries
// it as a URI SAN spiffe://<td>.
func TrustDomainOf(ca *x509.Certificate) (string, error) {
	for _, u := range ca.URIs {
		if u.Scheme == "spiffe" && (u.Path == "" || u.Path == "/") {
			if err := ValidateTrustDomain(u.Host); err != nil {
				return "", err
			}
			return u.Host, nil
		}
	}
	return "", fmt.Errorf("%w: CA certificate %q names no trust domain", ErrInvalidTrustDomain, ca.Subject.CommonName)
}
