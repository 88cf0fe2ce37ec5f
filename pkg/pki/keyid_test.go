package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"testing"
)

// The direct path of subjectPublicKeyBits must give the very bytes that
// x509 writes into the subjectPublicKey bit string, or subject key
// identifiers would change.
func TestSubjectPublicKeyBitsMatchX509(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	cases := []struct {
		name string
		pub  crypto.PublicKey
	}{
		{"ECDSA P-256", &p256.PublicKey},
		{"ECDSA P-384", &p384.PublicKey},
		{"ECDSA P-521 takes the generic path", &p521.PublicKey},
		{"RSA 2048", &rsa2048.PublicKey},
		{"Ed25519 takes the generic path", edPub},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			der, err := x509.MarshalPKIXPublicKey(tc.pub)
			if err != nil {
				t.Fatal(err)
			}
			want, err := parseSPKI(der)
			if err != nil {
				t.Fatal(err)
			}
			got, err := subjectPublicKeyBits(tc.pub)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("bits %x, x509 writes %x", got, want)
			}
		})
	}
}

func TestSubjectPublicKeyBitsRefusesUnknownKeys(t *testing.T) {
	if _, err := subjectPublicKeyBits(struct{}{}); err == nil {
		t.Fatal("no error for a key x509 cannot marshal")
	}
}
