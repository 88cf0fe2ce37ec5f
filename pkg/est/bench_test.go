package est_test

import (
	"testing"

	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// BenchmarkDecodeCSR measures reading a simpleenroll body: base64 in
// 64-column lines, as est.Client and OpenSSL send it.
func BenchmarkDecodeCSR(b *testing.B) {
	body := est.EncodeCSR(pkitest.CSR(b, pkitest.Key(b), "dev-1"))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := est.DecodeCSR(body); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEncodeCerts measures the simpleenroll answer: one device
// certificate as base64 PKCS#7 certs-only.
func BenchmarkEncodeCerts(b *testing.B) {
	f := pkitest.New(b)
	cert, _ := f.Device(b, "dev-1")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := est.EncodeCerts(cert); err != nil {
			b.Fatal(err)
		}
	}
}
