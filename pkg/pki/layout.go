package pki

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/fleetgate/fleetgate/pkg/identity"
)

// Layout names the files of a gateway data directory. provisioning init
// writes them; the gateway reads them.
type Layout struct{ Dir string }

// File names inside a data directory.
func (l Layout) path(name string) string { return filepath.Join(l.Dir, name) }

// CABundle is the PEM bundle devices and services trust: issuing CA and root.
func (l Layout) CABundle() string { return l.path("ca.pem") }

// RootCert is the root CA certificate.
func (l Layout) RootCert() string { return l.path("root.crt") }

// RootKey is the default place of the root CA key (see InitOptions.RootKeyPath).
func (l Layout) RootKey() string { return l.path("root.key") }

// IssuingCert is the issuing (intermediate) CA certificate.
func (l Layout) IssuingCert() string { return l.path("issuing.crt") }

// IssuingKey is the issuing CA key, the one key the gateway needs.
func (l Layout) IssuingKey() string { return l.path("issuing.key") }

// ServerCert is the gateway's TLS certificate chain.
func (l Layout) ServerCert() string { return l.path("server.crt") }

// ServerKey is the gateway's TLS key.
func (l Layout) ServerKey() string { return l.path("server.key") }

// OperatorCert is the first operator's client certificate chain.
func (l Layout) OperatorCert() string { return l.path("operator.crt") }

// OperatorKey is the first operator's key.
func (l Layout) OperatorKey() string { return l.path("operator.key") }

// Registry is the bbolt registry file.
func (l Layout) Registry() string { return l.path("registry.db") }

// CRL is the last CRL the gateway signed, PEM.
func (l Layout) CRL() string { return l.path("crl.pem") }

// DefaultTrustDomain names the fleet when init is given none.
const DefaultTrustDomain = "fleetgate.local"

// DefaultOperator is the name of the first operator certificate.
const DefaultOperator = "admin"

// DefaultESTPort is where the gateway serves EST and the CRL by default.
const DefaultESTPort = 8443

// InitOptions configures Init.
type InitOptions struct {
	// Hosts are the DNS names and IP addresses of the gateway.
	Hosts []string
	// TrustDomain of the fleet (DefaultTrustDomain when empty).
	TrustDomain string
	// KeyAlgorithm of the CA keys (p256 or p384; default p256).
	KeyAlgorithm KeyAlgorithm
	// RootKeyPath is where the root key is written; outside the data dir
	// to keep it offline. Default: Layout.RootKey().
	RootKeyPath string
	// Operator names the first operator certificate (DefaultOperator).
	Operator string
	// CRLURL is the distribution point written into issued certificates.
	// Default: https://<first host>:8443/crl.
	CRLURL string
}

// ErrAlreadyInitialized is returned by Init when the directory holds a CA.
var ErrAlreadyInitialized = errors.New("data directory already holds a CA")

// DefaultCRLURL is the CRL distribution point for a gateway reached at host
// on the default EST port.
func DefaultCRLURL(host string) string {
	return "https://" + net.JoinHostPort(host, strconv.Itoa(DefaultESTPort)) + "/crl"
}

// Init creates a root CA, an issuing CA, the gateway server certificate and
// the first operator certificate under l.Dir. It refuses to overwrite an
// existing CA.
func Init(l Layout, o InitOptions) error {
	if len(o.Hosts) == 0 {
		return errors.New("init: at least one gateway host is required (--hosts)")
	}
	if o.TrustDomain == "" {
		o.TrustDomain = DefaultTrustDomain
	}
	if err := identity.ValidateTrustDomain(o.TrustDomain); err != nil {
		return fmt.Errorf("init: %w", err)
	}
	if o.Operator == "" {
		o.Operator = DefaultOperator
	}
	if err := identity.ValidateName(o.Operator); err != nil {
		return fmt.Errorf("init: operator name: %w", err)
	}
	if o.RootKeyPath == "" {
		o.RootKeyPath = l.RootKey()
	}
	if o.CRLURL == "" {
		o.CRLURL = DefaultCRLURL(strings.TrimSpace(o.Hosts[0]))
	}
	if err := os.MkdirAll(l.Dir, 0o700); err != nil {
		return fmt.Errorf("init: %w", err)
	}
	for _, p := range []string{l.IssuingKey(), l.IssuingCert(), l.RootCert(), o.RootKeyPath} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("init: %w: %s exists", ErrAlreadyInitialized, p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("init: %w", err)
		}
	}

	rootKey, err := GenerateKey(o.KeyAlgorithm)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	root, err := NewRootCA(CAOptions{CommonName: "fleetgate root CA", Organization: o.TrustDomain, TrustDomain: o.TrustDomain, Key: rootKey})
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	issKey, err := GenerateKey(o.KeyAlgorithm)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	iss, err := NewIntermediateCA(root, CAOptions{CommonName: "fleetgate issuing CA", Organization: o.TrustDomain, TrustDomain: o.TrustDomain, Key: issKey})
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	issuer := &Issuer{CA: iss, TrustDomain: o.TrustDomain, CRLURLs: []string{o.CRLURL}}

	srvKey, err := GenerateKey(P256)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	srv, err := issuer.IssueServer(srvKey.Public(), o.Hosts, 0)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	opKey, err := GenerateKey(P256)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	op, err := issuer.IssueIdentity(opKey.Public(), identity.Operator(o.TrustDomain, o.Operator), 0)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}

	if err := os.MkdirAll(filepath.Dir(o.RootKeyPath), 0o700); err != nil {
		return fmt.Errorf("init: %w", err)
	}
	writes := []struct {
		path string
		key  crypto.Signer
		pem  []byte
	}{
		{path: o.RootKeyPath, key: rootKey},
		{path: l.RootCert(), pem: EncodeCertsPEM(root.Cert)},
		{path: l.IssuingKey(), key: issKey},
		{path: l.IssuingCert(), pem: EncodeCertsPEM(iss.Cert)},
		{path: l.CABundle(), pem: EncodeCertsPEM(iss.Cert, root.Cert)},
		{path: l.ServerKey(), key: srvKey},
		{path: l.ServerCert(), pem: EncodeCertsPEM(srv, iss.Cert)},
		{path: l.OperatorKey(), key: opKey},
		{path: l.OperatorCert(), pem: EncodeCertsPEM(op, iss.Cert)},
	}
	for _, w := range writes {
		if w.key != nil {
			err = WriteKeyFile(w.path, w.key)
		} else {
			err = WriteFileAtomic(w.path, w.pem, 0o644)
		}
		if err != nil {
			return fmt.Errorf("init: %w", err)
		}
	}
	return nil
}

// LoadIssuingCA reads the issuing CA certificate and key and the root
// certificate from a data directory. It refuses a key file that others can
// read and a key that does not match its certificate.
func LoadIssuingCA(l Layout) (*CA, error) {
	if err := CheckKeyFileMode(l.IssuingKey()); err != nil {
		return nil, err
	}
	certs, err := ReadCertsFile(l.IssuingCert())
	if err != nil {
		return nil, err
	}
	key, err := ReadKeyFile(l.IssuingKey())
	if err != nil {
		return nil, err
	}
	if err := KeyMatches(certs[0], key); err != nil {
		return nil, fmt.Errorf("%s: %w", l.IssuingKey(), err)
	}
	roots, err := ReadCertsFile(l.RootCert())
	if err != nil {
		return nil, err
	}
	if err := certs[0].CheckSignatureFrom(roots[0]); err != nil {
		return nil, fmt.Errorf("issuing CA is not signed by the root in %s: %w", l.RootCert(), err)
	}
	return &CA{Cert: certs[0], Signer: key, Chain: []*x509.Certificate{roots[0]}}, nil
}

// KeyMatches reports whether key is the private half of cert's public key.
func KeyMatches(cert *x509.Certificate, key crypto.Signer) error {
	a, err := x509.MarshalPKIXPublicKey(cert.PublicKey)
	if err != nil {
		return err
	}
	b, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return err
	}
	if !bytes.Equal(a, b) {
		return errors.New("private key does not match the certificate")
	}
	return nil
}

// CheckKeyFileMode refuses a private key file that group or others may read.
func CheckKeyFileMode(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("key file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("key file %s has mode %04o: others may read it; run chmod 600 %s", path, st.Mode().Perm(), path)
	}
	return nil
}
