package pki_test

import (
	"crypto/rand"
	"crypto/rsa"
	"math/big"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
	zx509 "github.com/zmap/zcrypto/x509"
	"github.com/zmap/zlint/v3"
	"github.com/zmap/zlint/v3/lint"
)

// rfcLints are the lints of the RFCs that govern a private device PKI. The
// CA/Browser Forum lints are for the public web PKI and demand things device
// certificates need not have (policies, AIA, DNS names).
func rfcLints(t *testing.T) lint.Registry {
	t.Helper()
	reg, err := lint.GlobalRegistry().Filter(lint.FilterOptions{
		IncludeSources: lint.SourceList{lint.RFC5280, lint.RFC5480, lint.RFC3279},
	})
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

func checkResults(t *testing.T, what string, rs *zlint.ResultSet) {
	t.Helper()
	n := 0
	for name, r := range rs.Results {
		if r.Status == lint.Error || r.Status == lint.Fatal {
			t.Errorf("%s: %s: %s %s", what, name, r.Status, r.Details)
		}
		if r.Status != lint.NA && r.Status != lint.NE {
			n++
		}
	}
	if n == 0 {
		t.Errorf("%s: no lint applied", what)
	}
}

func TestCertificatesPassRFCLints(t *testing.T) {
	reg := rfcLints(t)
	f := pkitest.New(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := f.Issuer.IssueDevice(parseCSR(t, pkitest.CSR(t, pkitest.Key(t), "sensor-0042")), "sensor-0042", 0)
	if err != nil {
		t.Fatal(err)
	}
	devRSA, err := f.Issuer.IssueDevice(parseCSR(t, pkitest.CSR(t, rsaKey, "sensor-rsa")), "sensor-rsa", 0)
	if err != nil {
		t.Fatal(err)
	}
	svc, _ := f.Identity(t, identity.Service(pkitest.TrustDomain, "backend"), 0)
	op, _ := f.Identity(t, identity.Operator(pkitest.TrustDomain, "admin"), 0)
	srv := f.Server(t, "gateway.example", "127.0.0.1").Leaf

	for name, der := range map[string][]byte{
		"root CA":    f.Root.Cert.Raw,
		"issuing CA": f.Issuing.Cert.Raw,
		"device":     dev.Raw,
		"device rsa": devRSA.Raw,
		"service":    svc.Raw,
		"operator":   op.Raw,
		"server":     srv.Raw,
	} {
		zc, err := zx509.ParseCertificate(der)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		checkResults(t, name, zlint.LintCertificateEx(zc, reg))
	}

	now := time.Now()
	crlDER, err := f.Issuer.CRL([]pki.CRLEntry{
		{Serial: dev.SerialNumber, RevokedAt: now, Reason: 1},
		{Serial: devRSA.SerialNumber, RevokedAt: now, Reason: 0},
	}, big.NewInt(3), now, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	zcrl, err := zx509.ParseRevocationList(crlDER)
	if err != nil {
		t.Fatal(err)
	}
	checkResults(t, "crl", zlint.LintRevocationListEx(zcrl, reg))
}
