package pki

import (
	"crypto/tls"
	"crypto/x509"
	"time"
)

// LeafClientAuth returns a copy of cfg, which requires and verifies client
// certificates, that verifies only the client's own certificate against
// cfg.ClientCAs, ignoring the intermediates the client sends along.
//
// The fleet's client certificates are issued directly by the CA in
// ClientCAs. crypto/tls builds every chain it can from what the client
// sends and ClientCAs, so a client that sends its issuing CA along (the
// agent, OpenSSL with a chain file, most TLS stacks) makes it check the
// leaf's signature twice, against each copy of the CA: one more ECDSA
// verification and certificate parse in every handshake, about a tenth of
// a mutual-TLS connect. The checks are x509's own (signature, validity,
// client-auth usage, CA constraints), done once.
//
// A resumed session was verified when it was first established on this
// listener (its ticket is sealed with the process's own key); crypto/tls
// re-checks the leaf's expiry on resumption, and cfg's VerifyConnection
// (revocation) still runs for every handshake.
func LeafClientAuth(cfg *tls.Config) *tls.Config {
	c := cfg.Clone()
	roots, next := cfg.ClientCAs, cfg.VerifyConnection
	now := cfg.Time
	if now == nil {
		now = time.Now
	}
	c.ClientAuth = tls.RequireAnyClientCert // crypto/tls refuses a handshake without one
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) > 0 && !cs.DidResume {
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				Roots:       roots,
				CurrentTime: now(),
				KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			})
			if err != nil {
				return &tls.CertificateVerificationError{UnverifiedCertificates: cs.PeerCertificates, Err: err}
			}
		}
		if next != nil {
			return next(cs)
		}
		return nil
	}
	return c
}
