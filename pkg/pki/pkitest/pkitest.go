// Package pkitest builds throwaway CA hierarchies and certificates in code
// for tests in every package.
package pkitest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// TrustDomain used by fixtures.
const TrustDomain = "test.fleetgate"

// Fixture is a root CA, an issuing CA and an issuer over it.
type Fixture struct {
	Root    *pki.CA
	Issuing *pki.CA
	Issuer  *pki.Issuer
}

// New makes a fresh CA hierarchy in trust domain TrustDomain.
func New(t testing.TB) *Fixture { return NewDomain(t, TrustDomain) }

// NewDomain makes a fresh CA hierarchy in trust domain td.
func NewDomain(t testing.TB, td string) *Fixture {
	t.Helper()
	root, err := pki.NewRootCA(pki.CAOptions{CommonName: "test root", TrustDomain: td, Key: Key(t)})
	if err != nil {
		t.Fatal(err)
	}
	iss, err := pki.NewIntermediateCA(root, pki.CAOptions{CommonName: "test issuing", TrustDomain: td, Key: Key(t)})
	if err != nil {
		t.Fatal(err)
	}
	return &Fixture{Root: root, Issuing: iss, Issuer: &pki.Issuer{CA: iss, TrustDomain: td, CRLURLs: []string{"https://gateway.test:8443/crl"}}}
}

// Key makes a P-256 key.
func Key(t testing.TB) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// CSR builds a DER certificate request for cn, with optional URI SANs.
func CSR(t testing.TB, key crypto.Signer, cn string, uris ...*url.URL) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}, URIs: uris}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// Device issues a device certificate for id with a fresh key.
func (f *Fixture) Device(t testing.TB, id string) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	return f.Identity(t, identity.Device(f.Issuer.TrustDomain, id), 0)
}

// Identity issues a certificate for id with a fresh key, valid for ttl
// (the policy default when zero).
func (f *Fixture) Identity(t testing.TB, id identity.Identity, ttl time.Duration) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key := Key(t)
	cert, err := f.Issuer.IssueIdentity(key.Public(), id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// Server issues a TLS server certificate for hosts.
func (f *Fixture) Server(t testing.TB, hosts ...string) tls.Certificate {
	t.Helper()
	key := Key(t)
	cert, err := f.Issuer.IssueServer(key.Public(), hosts, 0)
	if err != nil {
		t.Fatal(err)
	}
	return TLSCert(cert, key, f.Issuing.Cert)
}

// Pool returns a pool holding the issuing and root CA.
func (f *Fixture) Pool() *x509.CertPool {
	return pki.NewPool(f.Issuing.Cert, f.Root.Cert)
}

// TLSCert assembles a tls.Certificate from a leaf, its key and a chain.
func TLSCert(leaf *x509.Certificate, key crypto.Signer, chain ...*x509.Certificate) tls.Certificate {
	c := tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
	for _, ca := range chain {
		c.Certificate = append(c.Certificate, ca.Raw)
	}
	return c
}

// WriteCA writes a CA hierarchy to dir in the pki.Layout a gateway reads,
// with a server certificate for localhost and an operator certificate.
func (f *Fixture) WriteCA(t testing.TB, dir string) pki.Layout {
	t.Helper()
	l := pki.Layout{Dir: dir}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(dir, 0o700))
	must(pki.WriteKeyFile(l.IssuingKey(), f.Issuing.Signer))
	must(os.WriteFile(l.IssuingCert(), pki.EncodeCertsPEM(f.Issuing.Cert), 0o644))
	must(os.WriteFile(l.RootCert(), pki.EncodeCertsPEM(f.Root.Cert), 0o644))
	must(os.WriteFile(l.CABundle(), pki.EncodeCertsPEM(f.Issuing.Cert, f.Root.Cert), 0o644))
	srv := f.Server(t, "localhost", "127.0.0.1")
	must(pki.WriteKeyFile(l.ServerKey(), srv.PrivateKey.(crypto.Signer)))
	must(os.WriteFile(l.ServerCert(), pki.EncodeCertsPEM(srv.Leaf, f.Issuing.Cert), 0o644))
	op, opKey := f.Identity(t, identity.Operator(f.Issuer.TrustDomain, "admin"), 0)
	must(pki.WriteKeyFile(l.OperatorKey(), opKey))
	must(os.WriteFile(l.OperatorCert(), pki.EncodeCertsPEM(op, f.Issuing.Cert), 0o644))
	return l
}
