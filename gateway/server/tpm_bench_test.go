package server_test

import (
	"crypto"
	"crypto/tls"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/keystore"
	"github.com/fleetgate/fleetgate/pkg/keystore/swtpmtest"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// BenchmarkConnectKeyStore compares a device's full mutual-TLS MQTT
// connect with its key in a file and inside swtpm (TLS 1.3 and 1.2): the
// TPM signs the handshake's CertificateVerify.
func BenchmarkConnectKeyStore(b *testing.B) {
	e := newEnv(b, limitsOff)
	sw := swtpmtest.Start(b)
	tpm, err := keystore.OpenTPM(sw.Socket, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tpm.Close() })
	if _, err := tpm.Generate(); err != nil {
		b.Fatal(err)
	}
	if err := tpm.Commit(); err != nil {
		b.Fatal(err)
	}
	tpmKey, err := tpm.Load()
	if err != nil {
		b.Fatal(err)
	}
	keys := []struct {
		name string
		key  crypto.Signer
	}{{"file", pkitest.Key(b)}, {"swtpm", tpmKey}}
	for _, k := range keys {
		for _, v := range []struct {
			name string
			max  uint16
		}{{"tls13", tls.VersionTLS13}, {"tls12", tls.VersionTLS12}} {
			b.Run(k.name+"/"+v.name, func(b *testing.B) {
				id := "bench-" + k.name
				cert, err := e.issuer(time.Now()).IssueIdentity(k.key.Public(), identity.Device(e.td, id), time.Hour)
				if err != nil {
					b.Fatal(err)
				}
				tc := pkitest.TLSCert(cert, k.key, e.ca.Cert)
				tc.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}
				conf := &tls.Config{Certificates: []tls.Certificate{tc}, MaxVersion: v.max}
				for b.Loop() {
					code, conn, err := e.rawConnect(b, 4, id, conf)
					if err != nil || code != 0 {
						b.Fatalf("connect: code %d, %v", code, err)
					}
					conn.Close()
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "µs/connect")
			})
		}
	}
}
