package pki_test

import (
	"crypto/x509"
	"testing"

	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// BenchmarkIssueDevice measures the CA's share of an enrollment: CSR
// signature check, policy, and signing the device certificate (which
// x509.CreateCertificate follows with a check of its own signature).
func BenchmarkIssueDevice(b *testing.B) {
	f := pkitest.New(b)
	csr, err := x509.ParseCertificateRequest(pkitest.CSR(b, pkitest.Key(b), "dev-1"))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.Issuer.IssueDevice(csr, "dev-1", 0); err != nil {
			b.Fatal(err)
		}
	}
}
