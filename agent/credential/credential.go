// Package credential keeps the device's identity on disk — its key (in a
// keystore) and its certificate — and obtains it over EST: enrollment with
// a one-time token, renewal with the current certificate.
//
// Files in the state directory:
//
//	device.crt       the certificate followed by its issuing CA (PEM)
//	device.crt.next  a renewed certificate not yet in place
//
// A renewal writes device.crt.next, commits the pending key, then renames
// the certificate. Recover finishes or rolls back a swap a crash
// interrupted, so the key and the certificate always match.
package credential

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/fleetgate/fleetgate/pkg/keystore"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// ErrNotEnrolled means the state directory holds no certificate yet.
var ErrNotEnrolled = errors.New("device not enrolled")

// Credential is a key and the certificate that goes with it.
type Credential struct {
	Key  crypto.Signer
	Cert *x509.Certificate
	// Chain is the certificate followed by its issuing CA.
	Chain []*x509.Certificate
}

// TLSCertificate returns the credential for a TLS client.
func (c *Credential) TLSCertificate() *tls.Certificate {
	tc := &tls.Certificate{PrivateKey: c.Key, Leaf: c.Cert}
	if _, software := c.Key.(*ecdsa.PrivateKey); !software {
		if pub, ok := c.Key.Public().(*ecdsa.PublicKey); ok && pub.Curve == elliptic.P256() {
			// A TPM signs P-256 with SHA-256 only; without this, TLS 1.2
			// could pick ECDSA with SHA-384 against a server preferring it.
			tc.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}
		}
	}
	for _, cert := range c.Chain {
		tc.Certificate = append(tc.Certificate, cert.Raw)
	}
	return tc
}

// RenewAt is when the certificate should be renewed: after fraction of its
// lifetime, moved earlier by up to jitter of the lifetime (so a fleet
// enrolled together does not renew together).
func (c *Credential) RenewAt(fraction, jitter float64, rnd func() float64) time.Time {
	life := c.Cert.NotAfter.Sub(c.Cert.NotBefore)
	offset := time.Duration(float64(life) * (fraction - jitter*rnd()))
	return c.Cert.NotBefore.Add(offset)
}

// Store is the identity kept in a state directory.
type Store struct {
	Dir  string
	Keys keystore.Store
	// Trust is the CA bundle; the issuing CA of a new certificate is taken
	// from it to complete the chain.
	Trust []*x509.Certificate
}

// CertPath is where the current certificate lives.
func (s *Store) CertPath() string { return filepath.Join(s.Dir, "device.crt") }

func (s *Store) nextCertPath() string { return s.CertPath() + ".next" }

// Recover completes or undoes a certificate swap that a crash interrupted.
func (s *Store) Recover() error {
	next, err := pki.ReadCertsFile(s.nextCertPath())
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// No certificate was waiting: a pending key belongs to a renewal
		// that never got its certificate.
		return s.Keys.Discard()
	case err != nil:
		_ = os.Remove(s.nextCertPath())
		return s.Keys.Discard()
	}
	if pending, err := s.Keys.LoadPending(); err == nil && pki.KeyMatches(next[0], pending) == nil {
		if err := s.Keys.Commit(); err != nil {
			return err
		}
	} else if cur, err := s.Keys.Load(); err != nil || pki.KeyMatches(next[0], cur) != nil {
		// The waiting certificate matches no key we hold.
		_ = os.Remove(s.nextCertPath())
		return s.Keys.Discard()
	}
	if err := os.Rename(s.nextCertPath(), s.CertPath()); err != nil {
		return fmt.Errorf("recover certificate: %w", err)
	}
	return s.Keys.Discard()
}

// Load returns the current credential, or ErrNotEnrolled.
func (s *Store) Load() (*Credential, error) {
	chain, err := pki.ReadCertsFile(s.CertPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotEnrolled
	}
	if err != nil {
		return nil, err
	}
	key, err := s.Keys.Load()
	if errors.Is(err, keystore.ErrNoKey) {
		return nil, fmt.Errorf("%s exists but the %s key store holds no key: %w", s.CertPath(), s.Keys.Kind(), err)
	}
	if err != nil {
		return nil, err
	}
	if err := pki.KeyMatches(chain[0], key); err != nil {
		return nil, fmt.Errorf("%s: %w", s.CertPath(), err)
	}
	return &Credential{Key: key, Cert: chain[0], Chain: chain}, nil
}

// Requester sends a CSR (DER) and returns the certificate issued for it.
type Requester func(ctx context.Context, csrDER []byte) (*x509.Certificate, error)

// Obtain gets a certificate for deviceID: with a new key when newKey (or
// when there is no current key), else for the current key. The new
// credential is on disk, swapped in crash-safely, when it returns.
func (s *Store) Obtain(ctx context.Context, deviceID string, newKey bool, request Requester) (*Credential, error) {
	var (
		key     crypto.Signer
		err     error
		pending bool
	)
	if !newKey {
		key, err = s.Keys.Load()
		if errors.Is(err, keystore.ErrNoKey) {
			newKey = true
		} else if err != nil {
			return nil, err
		}
	}
	if newKey {
		if key, err = s.Keys.Generate(); err != nil {
			return nil, err
		}
		pending = true
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: deviceID}}, key)
	if err != nil {
		s.discard(pending)
		return nil, fmt.Errorf("build CSR: %w", err)
	}
	cert, err := request(ctx, csr)
	if err != nil {
		s.discard(pending)
		return nil, err
	}
	if err := pki.KeyMatches(cert, key); err != nil {
		s.discard(pending)
		return nil, fmt.Errorf("gateway returned a certificate for another key: %w", err)
	}
	chain := s.chain(cert)
	if err := pki.WriteFileAtomic(s.nextCertPath(), pki.EncodeCertsPEM(chain...), 0o644); err != nil {
		s.discard(pending)
		return nil, err
	}
	if pending {
		if err := s.Keys.Commit(); err != nil {
			return nil, err
		}
	}
	if err := os.Rename(s.nextCertPath(), s.CertPath()); err != nil {
		return nil, fmt.Errorf("install certificate: %w", err)
	}
	return &Credential{Key: key, Cert: cert, Chain: chain}, nil
}

func (s *Store) discard(pending bool) {
	if pending {
		_ = s.Keys.Discard()
	}
}

// chain appends the issuing CA from the trust bundle, when found.
func (s *Store) chain(cert *x509.Certificate) []*x509.Certificate {
	for _, ca := range s.Trust {
		if bytes.Equal(ca.RawSubject, cert.RawIssuer) && cert.CheckSignatureFrom(ca) == nil {
			return []*x509.Certificate{cert, ca}
		}
	}
	return []*x509.Certificate{cert}
}
