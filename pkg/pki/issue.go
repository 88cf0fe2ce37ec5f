package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
)

// Errors returned when a CSR or a request breaks the issuance policy. Each is
// the client's fault; callers map them to a 400-class answer.
var (
	ErrBadCSR          = errors.New("bad certificate request")
	ErrKeyPolicy       = errors.New("key not allowed")
	ErrSubjectMismatch = errors.New("certificate request does not match the identity")
)

// Limits on RSA keys: below 2048 bits is weak; above 8192 costs the gateway
// too much per verification to accept from anyone.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// Issuer signs end-entity certificates with an issuing CA.
type Issuer struct {
	CA *CA
	// TrustDomain of every identity issued.
	TrustDomain string
	// CRLURLs are written as the CRL distribution point of device,
	// service and operator certificates.
	CRLURLs []string
	// Now overrides the clock (tests).
	Now func() time.Time
}

func (is *Issuer) now() time.Time {
	if is.Now != nil {
		return is.Now()
	}
	return time.Now()
}

// CheckPublicKey enforces the fleet key policy: ECDSA P-256 or P-384, or
// RSA of 2048 to 8192 bits.
func CheckPublicKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("%w: ECDSA curve %s (want P-256 or P-384)", ErrKeyPolicy, k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n < minRSABits || n > maxRSABits {
			return fmt.Errorf("%w: RSA %d bits (want %d to %d)", ErrKeyPolicy, n, minRSABits, maxRSABits)
		}
	default:
		return fmt.Errorf("%w: %T (want ECDSA P-256/P-384 or RSA >= 2048)", ErrKeyPolicy, pub)
	}
	return nil
}

// CheckCSR verifies a CSR's self-signature and key and that it asks for the
// identity id: the common name equals id.Name, and any URI SAN it requests is
// id's SPIFFE ID. Other requested extensions are ignored: the certificate
// carries what the policy decides.
func CheckCSR(csr *x509.CertificateRequest, id identity.Identity) error {
	if err := CheckPublicKey(csr.PublicKey); err != nil {
		return err
	}
	if err := csr.CheckSignature(); err != nil {
		return fmt.Errorf("%w: signature does not verify: %v", ErrBadCSR, err)
	}
	if csr.Subject.CommonName != id.Name {
		return fmt.Errorf("%w: common name %q, want %q", ErrSubjectMismatch, csr.Subject.CommonName, id.Name)
	}
	want := id.String()
	for _, u := range csr.URIs {
		if u.String() != want {
			return fmt.Errorf("%w: URI SAN %q, want %q", ErrSubjectMismatch, u.String(), want)
		}
	}
	return nil
}

// IssueDevice checks csr against the policy for device id and issues a
// device certificate valid for ttl (DefaultDeviceValidity when zero).
func (is *Issuer) IssueDevice(csr *x509.CertificateRequest, deviceID string, ttl time.Duration) (*x509.Certificate, error) {
	id := identity.Device(is.TrustDomain, deviceID)
	if err := id.Validate(); err != nil {
		return nil, err
	}
	if err := CheckCSR(csr, id); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		ttl = DefaultDeviceValidity
	}
	return is.IssueIdentity(csr.PublicKey, id, ttl)
}

// IssueIdentity issues a client certificate for id (device, service or
// operator) over pub: CN = name, one URI SAN, EKU clientAuth, not a CA.
func (is *Issuer) IssueIdentity(pub crypto.PublicKey, id identity.Identity, ttl time.Duration) (*x509.Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	if id.TrustDomain != is.TrustDomain {
		return nil, fmt.Errorf("%w: trust domain %q, issuer serves %q", identity.ErrForeignDomain, id.TrustDomain, is.TrustDomain)
	}
	if err := CheckPublicKey(pub); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		ttl = DefaultIdentityValidity
	}
	tmpl, err := is.leafTemplate(pub, ttl)
	if err != nil {
		return nil, err
	}
	tmpl.Subject = pkix.Name{CommonName: id.Name}
	tmpl.URIs = []*url.URL{id.URI()}
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	tmpl.CRLDistributionPoints = is.CRLURLs
	return create(tmpl, is.CA.Cert, pub, is.CA.Signer)
}

// IssueServer issues the gateway's TLS server certificate for hosts (DNS
// names and IP addresses; the first is the common name).
func (is *Issuer) IssueServer(pub crypto.PublicKey, hosts []string, ttl time.Duration) (*x509.Certificate, error) {
	if len(hosts) == 0 {
		return nil, errors.New("server certificate: at least one host is required")
	}
	if err := CheckPublicKey(pub); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		ttl = DefaultServerValidity
	}
	tmpl, err := is.leafTemplate(pub, ttl)
	if err != nil {
		return nil, err
	}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		if h == "" {
			continue
		}
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, strings.ToLower(h))
		}
	}
	tmpl.Subject = pkix.Name{CommonName: strings.TrimSpace(hosts[0])}
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	if _, ok := pub.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment // TLS 1.2 RSA key exchange
	}
	return create(tmpl, is.CA.Cert, pub, is.CA.Signer)
}

func (is *Issuer) leafTemplate(pub crypto.PublicKey, ttl time.Duration) (*x509.Certificate, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	ski, err := keyID(pub)
	if err != nil {
		return nil, err
	}
	now := is.now()
	// Short-lived certificates get a proportionally short backdate, so the
	// lifetime a device sees is close to the one asked for.
	notBefore := now.Add(-min(backdate, ttl/10))
	if notBefore.Before(is.CA.Cert.NotBefore) {
		notBefore = is.CA.Cert.NotBefore
	}
	notAfter := now.Add(ttl)
	if notAfter.After(is.CA.Cert.NotAfter) {
		notAfter = is.CA.Cert.NotAfter
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore.UTC(),
		NotAfter:              notAfter.UTC(),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		SubjectKeyId:          ski,
	}, nil
}

// SerialHex formats a certificate serial the way the registry keys it:
// lower-case hex without separators.
func SerialHex(c *x509.Certificate) string { return c.SerialNumber.Text(16) }
