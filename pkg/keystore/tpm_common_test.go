package keystore_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"net"
	"testing"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/keystore"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// Shared checks for the TPM store tests on the simulator (build tag
// tpmsimulator) and on swtpm.

// ecPub returns key's public key, failing unless it is ECDSA P-256.
func ecPub(t testing.TB, key crypto.Signer) *ecdsa.PublicKey {
	t.Helper()
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("public key %T, want ECDSA P-256", key.Public())
	}
	return pub
}

// checkSigns signs a digest with key and verifies the signature.
func checkSigns(t testing.TB, key crypto.Signer, msg string) {
	t.Helper()
	sum := sha256.Sum256([]byte(msg))
	sig, err := key.Sign(rand.Reader, sum[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("sign: %v", err)
	}
	if !ecdsa.VerifyASN1(ecPub(t, key), sum[:], sig) {
		t.Fatal("signature does not verify")
	}
}

// checkCSR builds a certificate request signed by key and checks it.
func checkCSR(t testing.TB, key crypto.Signer) {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "d1"}}, key)
	if err != nil {
		t.Fatalf("create CSR: %v", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("CSR signature: %v", err)
	}
	if !ecPub(t, key).Equal(csr.PublicKey) {
		t.Fatal("CSR carries another public key")
	}
	if csr.SignatureAlgorithm != x509.ECDSAWithSHA256 {
		t.Fatalf("CSR signature algorithm %v", csr.SignatureAlgorithm)
	}
}

// checkMutualTLS runs a mutual TLS handshake at version over loopback in
// which the client authenticates with a device certificate for key.
func checkMutualTLS(t testing.TB, key crypto.Signer, version uint16) {
	t.Helper()
	f := pkitest.New(t)
	leaf, err := f.Issuer.IssueIdentity(key.Public(), identity.Device(pkitest.TrustDomain, "d1"), 0)
	if err != nil {
		t.Fatal(err)
	}
	clientCert := pkitest.TLSCert(leaf, key, f.Issuing.Cert)
	server := &tls.Config{
		Certificates: []tls.Certificate{f.Server(t, "localhost")},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    f.Pool(),
		MinVersion:   version,
		MaxVersion:   version,
	}
	client := &tls.Config{
		Certificates: []tls.Certificate{clientCert},
		RootCAs:      f.Pool(),
		ServerName:   "localhost",
		MinVersion:   version,
		MaxVersion:   version,
	}
	// Loopback TCP rather than net.Pipe: the kernel's buffers let the TLS
	// 1.3 server send its session tickets while the client's last flight
	// is still on the way.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		conn *tls.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		srv := tls.Server(c, server)
		if err := srv.Handshake(); err != nil {
			c.Close()
			done <- result{err: err}
			return
		}
		buf := make([]byte, 4)
		if _, err = io.ReadFull(srv, buf); err == nil {
			_, err = srv.Write(buf)
		}
		done <- result{srv, err}
	}()
	cli, err := tls.Dial("tcp", ln.Addr().String(), client)
	if err == nil {
		defer cli.Close()
		// In TLS 1.3 the client is done before the server has checked
		// its certificate: one round trip makes the server's verdict
		// visible.
		if _, err = cli.Write([]byte("ping")); err == nil {
			_, err = io.ReadFull(cli, make([]byte, 4))
		}
	}
	res := <-done
	if res.conn != nil {
		defer res.conn.Close()
	}
	if err != nil || res.err != nil {
		t.Fatalf("handshake: client: %v, server: %v", err, res.err)
	}
	srv := res.conn
	st := srv.ConnectionState()
	if st.Version != version {
		t.Fatalf("negotiated version %x, want %x", st.Version, version)
	}
	if len(st.PeerCertificates) == 0 || !st.PeerCertificates[0].Equal(leaf) {
		t.Fatal("server did not see the device certificate")
	}
}

// checkRejectsOtherHashes checks that a TPM key refuses digests other than
// SHA-256 with an error, rather than signing something else.
func checkRejectsOtherHashes(t testing.TB, key crypto.Signer) {
	t.Helper()
	sum384 := make([]byte, 48)
	if _, err := key.Sign(rand.Reader, sum384, crypto.SHA384); err == nil {
		t.Error("SHA-384 digest accepted")
	}
	if _, err := key.Sign(rand.Reader, make([]byte, 20), crypto.SHA256); err == nil {
		t.Error("20-byte digest accepted as SHA-256")
	}
	if _, err := key.Sign(rand.Reader, make([]byte, 32), nil); err == nil {
		t.Error("nil SignerOpts accepted")
	}
}

// mustNoKey fails unless err is keystore.ErrNoKey.
func mustNoKey(t testing.TB, what string, err error) {
	t.Helper()
	if !errors.Is(err, keystore.ErrNoKey) {
		t.Fatalf("%s: got %v, want ErrNoKey", what, err)
	}
}
