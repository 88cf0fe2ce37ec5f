// Package pki is fleetgate's certificate authority: it makes the root and
// issuing CAs, issues device certificates from CSRs under the fleet policy,
// issues server, service and operator certificates, and signs CRLs.
package pki

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
)

// Default lifetimes.
const (
	DefaultRootValidity     = 10 * 365 * 24 * time.Hour
	DefaultIssuingValidity  = 5 * 365 * 24 * time.Hour
	DefaultDeviceValidity   = 30 * 24 * time.Hour
	DefaultIdentityValidity = 365 * 24 * time.Hour
	DefaultServerValidity   = 365 * 24 * time.Hour

	// backdate absorbs clock skew between the gateway and devices whose
	// clocks are set by NTP only after boot.
	backdate = 5 * time.Minute
)

// CA is a certificate authority: its certificate, its signing key and the
// certificates above it up to the root.
type CA struct {
	Cert   *x509.Certificate
	Signer crypto.Signer
	// Chain holds Cert's issuers, nearest first, ending with the root.
	// It is empty for a root CA.
	Chain []*x509.Certificate
}

// Root returns the self-signed certificate at the top of the chain.
func (ca *CA) Root() *x509.Certificate {
	if len(ca.Chain) == 0 {
		return ca.Cert
	}
	return ca.Chain[len(ca.Chain)-1]
}

// CAOptions describes a CA certificate to create.
type CAOptions struct {
	// CommonName of the CA subject.
	CommonName string
	// Organization of the CA subject; optional.
	Organization string
	// TrustDomain is written as a URI SAN spiffe://<td> so every program
	// holding the CA certificate learns the trust domain from it.
	TrustDomain string
	// Key is the CA's key; required.
	Key crypto.Signer
	// Validity of the certificate; defaults depend on the kind of CA.
	Validity time.Duration
	// Now overrides the clock (tests).
	Now time.Time
}

func (o CAOptions) template(validity time.Duration) (*x509.Certificate, error) {
	if o.Key == nil {
		return nil, errors.New("CA key is required")
	}
	if err := identity.ValidateTrustDomain(o.TrustDomain); err != nil {
		return nil, err
	}
	if o.CommonName == "" {
		return nil, errors.New("CA common name is required")
	}
	if o.Validity > 0 {
		validity = o.Validity
	}
	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	ski, err := keyID(o.Key.Public())
	if err != nil {
		return nil, err
	}
	subject := pkix.Name{CommonName: o.CommonName}
	if o.Organization != "" {
		subject.Organization = []string{o.Organization}
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             now.Add(-backdate).UTC(),
		NotAfter:              now.Add(validity).UTC(),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          ski,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: o.TrustDomain}},
	}, nil
}

// NewRootCA creates a self-signed root CA.
func NewRootCA(o CAOptions) (*CA, error) {
	tmpl, err := o.template(DefaultRootValidity)
	if err != nil {
		return nil, fmt.Errorf("root CA: %w", err)
	}
	tmpl.AuthorityKeyId = tmpl.SubjectKeyId
	cert, err := create(tmpl, tmpl, o.Key.Public(), o.Key)
	if err != nil {
		return nil, fmt.Errorf("root CA: %w", err)
	}
	return &CA{Cert: cert, Signer: o.Key}, nil
}

// NewIntermediateCA creates an issuing CA signed by parent. It may sign only
// end-entity certificates (path length 0).
func NewIntermediateCA(parent *CA, o CAOptions) (*CA, error) {
	tmpl, err := o.template(DefaultIssuingValidity)
	if err != nil {
		return nil, fmt.Errorf("issuing CA: %w", err)
	}
	tmpl.MaxPathLen = 0
	tmpl.MaxPathLenZero = true
	if tmpl.NotAfter.After(parent.Cert.NotAfter) {
		tmpl.NotAfter = parent.Cert.NotAfter
	}
	cert, err := create(tmpl, parent.Cert, o.Key.Public(), parent.Signer)
	if err != nil {
		return nil, fmt.Errorf("issuing CA: %w", err)
	}
	chain := append([]*x509.Certificate{parent.Cert}, parent.Chain...)
	return &CA{Cert: cert, Signer: o.Key, Chain: chain}, nil
}

// create signs a certificate and parses it back.
func create(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse new certificate: %w", err)
	}
	return cert, nil
}
