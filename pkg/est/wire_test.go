package est_test

import (
	"bytes"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"testing"

	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

func TestDecodeCSRForms(t *testing.T) {
	der := pkitest.CSR(t, pkitest.Key(t), "sensor-1")
	b64 := base64.StdEncoding.EncodeToString(der)
	forms := map[string][]byte{
		"base64 lines (RFC 7030)": est.EncodeCSR(der),
		"base64 one line":         []byte(b64),
		"base64 without padding":  []byte(base64.RawStdEncoding.EncodeToString(der)),
		"pem":                     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
		"pem new header":          pem.EncodeToMemory(&pem.Block{Type: "NEW CERTIFICATE REQUEST", Bytes: der}),
		"raw der":                 der,
		"base64 with whitespace":  []byte("  \n" + b64[:10] + "\n" + b64[10:] + "\n\n"),
		"base64 CRLF lines":       bytes.ReplaceAll(est.EncodeCSR(der), []byte("\n"), []byte("\r\n")),
		"base64 with tabs":        []byte(b64[:20] + "\t" + b64[20:40] + " " + b64[40:]),
		"base64url":               []byte(base64.URLEncoding.EncodeToString(der)),
	}
	for name, body := range forms {
		t.Run(name, func(t *testing.T) {
			csr, err := est.DecodeCSR(body)
			if err != nil {
				t.Fatal(err)
			}
			if csr.Subject.CommonName != "sensor-1" {
				t.Errorf("CN %q", csr.Subject.CommonName)
			}
		})
	}
}

func TestDecodeCSRRejects(t *testing.T) {
	der := pkitest.CSR(t, pkitest.Key(t), "sensor-1")
	for name, body := range map[string][]byte{
		"empty":           nil,
		"garbage":         []byte("hello, world"),
		"base64 garbage":  []byte(base64.StdEncoding.EncodeToString([]byte("not asn.1"))),
		"pem certificate": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"truncated der":   der[:len(der)-10],
		"oversized":       bytes.Repeat([]byte("A"), est.MaxRequestSize+1),
		"broken pem":      []byte("-----BEGIN CERTIFICATE REQUEST-----\nxx"),
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := est.DecodeCSR(body); !errors.Is(err, est.ErrMalformed) {
				t.Fatalf("err = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestCertsRoundTrip(t *testing.T) {
	f := pkitest.New(t)
	dev, _ := f.Device(t, "sensor-1")
	body, err := est.EncodeCerts(dev, f.Issuing.Cert)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := est.DecodeCerts(body)
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 2 || !certs[0].Equal(dev) || !certs[1].Equal(f.Issuing.Cert) {
		t.Fatalf("got %d certs", len(certs))
	}
	if _, err := est.DecodeCerts([]byte("bm9wZQ==")); err == nil {
		t.Error("garbage decoded as certs")
	}
}

// Bodies are base64 in 64-column lines, each ending in a newline, as
// OpenSSL writes them.
func TestEncodeCSRLines(t *testing.T) {
	for n := range 200 {
		b := bytes.Repeat([]byte{0xfb, 0x0f, 0x3e}, n/3+1)[:n]
		enc := base64.StdEncoding.EncodeToString(b)
		var want []byte
		for len(enc) > 64 {
			want = append(append(want, enc[:64]...), '\n')
			enc = enc[64:]
		}
		want = append(append(want, enc...), '\n')
		if got := est.EncodeCSR(b); !bytes.Equal(got, want) {
			t.Fatalf("%d bytes: got %q, want %q", n, got, want)
		}
	}
}

func TestCSRAttrsIsDER(t *testing.T) {
	der, err := base64.StdEncoding.DecodeString(string(bytes.ReplaceAll(est.CSRAttrs(), []byte("\n"), nil)))
	if err != nil || len(der) < 10 || der[0] != 0x30 {
		t.Fatalf("csrattrs %x %v", der, err)
	}
}

func FuzzDecodeCSR(f *testing.F) {
	der := pkitest.CSR(f, pkitest.Key(f), "seed")
	f.Add(der)
	f.Add(est.EncodeCSR(der))
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	f.Add([]byte("0000"))
	f.Fuzz(func(t *testing.T, body []byte) {
		csr, err := est.DecodeCSR(body)
		if err == nil && csr == nil {
			t.Fatal("nil CSR without error")
		}
		if err != nil && !errors.Is(err, est.ErrMalformed) {
			t.Fatalf("error not ErrMalformed: %v", err)
		}
	})
}

func FuzzDecodeCerts(f *testing.F) {
	fx := pkitest.New(f)
	body, _ := est.EncodeCerts(fx.Issuing.Cert)
	f.Add(body)
	f.Add([]byte("MIIB"))
	f.Fuzz(func(t *testing.T, body []byte) {
		_, _ = est.DecodeCerts(body)
	})
}
