package pki_test

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// handshake runs one TLS handshake between server and client over
// loopback TCP and returns the server's error.
func handshake(t *testing.T, server, client *tls.Config) (tls.ConnectionState, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	b, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c := tls.Client(b, client)
		if c.Handshake() == nil {
			// Take the session ticket (TLS 1.3 sends it after the
			// handshake), then let the server close.
			_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, _ = c.Read(make([]byte, 1))
		}
		c.Close()
	}()
	s := tls.Server(a, server)
	err = s.Handshake()
	st := s.ConnectionState()
	s.Close()
	<-done
	return st, err
}

func TestLeafClientAuth(t *testing.T) {
	f := pkitest.New(t)
	foreign := pkitest.NewDomain(t, pkitest.TrustDomain)
	ca := x509.NewCertPool()
	ca.AddCert(f.Issuing.Cert)
	var revoked *x509.Certificate
	calls := 0
	server := pki.LeafClientAuth(&tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{f.Server(t, "localhost")},
		ClientCAs:    ca,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			calls++
			if revoked != nil && cs.PeerCertificates[0].Equal(revoked) {
				return errors.New("certificate revoked")
			}
			return nil
		},
	})
	if server.ClientAuth != tls.RequireAnyClientCert {
		t.Fatalf("ClientAuth %v", server.ClientAuth)
	}
	leaf, key := f.Device(t, "dev-1")
	client := func(chain ...*x509.Certificate) *tls.Config {
		return &tls.Config{RootCAs: f.Pool(), ServerName: "localhost",
			Certificates: []tls.Certificate{pkitest.TLSCert(leaf, key, chain...)}}
	}
	withCert := func(c *x509.Certificate, k any, chain ...*x509.Certificate) *tls.Config {
		cfg := client()
		cfg.Certificates = []tls.Certificate{{Certificate: [][]byte{c.Raw}, PrivateKey: k, Leaf: c}}
		for _, ca := range chain {
			cfg.Certificates[0].Certificate = append(cfg.Certificates[0].Certificate, ca.Raw)
		}
		return cfg
	}

	t.Run("the certificate alone is admitted, and with its CA sent along", func(t *testing.T) {
		for _, c := range []*tls.Config{client(), client(f.Issuing.Cert), client(f.Issuing.Cert, f.Root.Cert)} {
			st, err := handshake(t, server, c)
			if err != nil {
				t.Fatal(err)
			}
			if !st.PeerCertificates[0].Equal(leaf) {
				t.Fatal("peer certificate is not the client's")
			}
		}
	})

	t.Run("a certificate of another CA is refused, whatever chain comes with it", func(t *testing.T) {
		fl, fk := foreign.Device(t, "dev-1")
		for _, c := range []*tls.Config{withCert(fl, fk), withCert(fl, fk, foreign.Issuing.Cert), withCert(fl, fk, f.Issuing.Cert)} {
			c.RootCAs = f.Pool()
			_, err := handshake(t, server, c)
			var unknown x509.UnknownAuthorityError
			if !errors.As(err, &unknown) {
				t.Fatalf("foreign certificate: %v, want an unknown authority error", err)
			}
		}
	})

	t.Run("a certificate signed by a CA the client sends (not trusted) is refused", func(t *testing.T) {
		// An intermediate under the trusted root, but not the gateway's CA.
		other, err := pki.NewIntermediateCA(f.Root, pki.CAOptions{CommonName: "other", TrustDomain: pkitest.TrustDomain, Key: pkitest.Key(t)})
		if err != nil {
			t.Fatal(err)
		}
		is := &pki.Issuer{CA: other, TrustDomain: pkitest.TrustDomain}
		k := pkitest.Key(t)
		c, err := is.IssueIdentity(k.Public(), identity.Device(pkitest.TrustDomain, "dev-1"), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := handshake(t, server, withCert(c, k, other.Cert, f.Root.Cert)); err == nil {
			t.Fatal("a certificate outside the gateway's CA was admitted through a chain the client sent")
		}
	})

	t.Run("expired and not yet valid certificates are refused", func(t *testing.T) {
		for name, at := range map[string]time.Time{"expired": leaf.NotAfter.Add(time.Hour), "not yet valid": leaf.NotBefore.Add(-time.Hour)} {
			s := server.Clone()
			s.Time = func() time.Time { return at }
			srv := pki.LeafClientAuth(&tls.Config{Certificates: s.Certificates, ClientCAs: ca, ClientAuth: tls.RequireAndVerifyClientCert, Time: s.Time})
			_, err := handshake(t, srv, client(f.Issuing.Cert))
			var invalid x509.CertificateInvalidError
			if !errors.As(err, &invalid) {
				t.Fatalf("%s: %v, want a certificate invalid error", name, err)
			}
		}
	})

	t.Run("a certificate without client authentication usage is refused", func(t *testing.T) {
		k := pkitest.Key(t)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(99), Subject: pkix.Name{CommonName: "dev-1"},
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, f.Issuing.Cert, k.Public(), f.Issuing.Signer)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		_, err = handshake(t, server, withCert(c, k, f.Issuing.Cert))
		var invalid x509.CertificateInvalidError
		if !errors.As(err, &invalid) || invalid.Reason != x509.IncompatibleUsage {
			t.Fatalf("server-auth certificate as client: %v, want incompatible usage", err)
		}
	})

	t.Run("no certificate is refused", func(t *testing.T) {
		c := client()
		c.Certificates = nil
		if _, err := handshake(t, server, c); err == nil {
			t.Fatal("a client without a certificate was admitted")
		}
	})

	t.Run("the listener's own check runs for new and resumed sessions", func(t *testing.T) {
		c := client(f.Issuing.Cert)
		c.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		if _, err := handshake(t, server, c); err != nil {
			t.Fatal(err)
		}
		calls = 0
		st, err := handshake(t, server, c)
		if err != nil || !st.DidResume {
			t.Fatalf("second handshake: resumed %v, %v", st.DidResume, err)
		}
		if calls != 1 {
			t.Fatalf("VerifyConnection ran %d times on resumption, want 1", calls)
		}
		revoked = leaf
		defer func() { revoked = nil }()
		if _, err := handshake(t, server, c); err == nil {
			t.Fatal("a revoked certificate resumed its session")
		}
	})
}
