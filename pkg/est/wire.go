// Package est is the RFC 7030 (Enrollment over Secure Transport) wire format
// fleetgate speaks: base64 PKCS#10 requests in, base64 PKCS#7 certs-only
// answers out, and a client for devices.
package est

import (
	"bytes"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/smallstep/pkcs7"
)

// Paths and media types of RFC 7030.
const (
	PathPrefix     = "/.well-known/est"
	PathCACerts    = PathPrefix + "/cacerts"
	PathEnroll     = PathPrefix + "/simpleenroll"
	PathReenroll   = PathPrefix + "/simplereenroll"
	PathCSRAttrs   = PathPrefix + "/csrattrs"
	PathCRL        = "/crl"
	TypePKCS10     = "application/pkcs10"
	TypeCertsOnly  = "application/pkcs7-mime; smime-type=certs-only"
	TypeCSRAttrs   = "application/csrattrs"
	TypePKIXCRL    = "application/pkix-crl"
	MaxRequestSize = 64 << 10 // a CSR with an 8192-bit RSA key is ~2.5 KiB
)

// ErrMalformed is returned for a body that is not a certificate request or
// certificate bundle in any form this package accepts.
var ErrMalformed = errors.New("malformed EST message")

// DecodeCSR reads a certificate request from an EST body. RFC 7030 says
// base64 DER; PEM and raw DER are accepted too, because real clients send
// them. The signature is not checked here.
func DecodeCSR(body []byte) (*x509.CertificateRequest, error) {
	der, err := decodeDER(body, "CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: not a PKCS#10 request: %v", ErrMalformed, err)
	}
	return csr, nil
}

// decodeDER turns PEM (with one of pemTypes), base64 or raw DER into DER.
func decodeDER(body []byte, pemTypes ...string) ([]byte, error) {
	if len(body) > MaxRequestSize {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(body), MaxRequestSize)
	}
	if isDERSequence(body) {
		return body, nil
	}
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) == 0 {
		return nil, fmt.Errorf("%w: empty body", ErrMalformed)
	}
	if bytes.HasPrefix(trimmed, []byte("-----BEGIN ")) {
		block, _ := pem.Decode(trimmed)
		if block == nil {
			return nil, fmt.Errorf("%w: broken PEM", ErrMalformed)
		}
		for _, t := range pemTypes {
			if block.Type == t {
				return block.Bytes, nil
			}
		}
		return nil, fmt.Errorf("%w: PEM block %q", ErrMalformed, block.Type)
	}
	// The common case, base64 in lines (RFC 7030 and every client seen):
	// the decoder skips line breaks itself, so the body needs no cleaning
	// copy. Anything else (spaces, tabs, other alphabets) takes the
	// general path below, which gives the same bytes for this case.
	der := make([]byte, base64.StdEncoding.DecodedLen(len(trimmed)))
	if n, err := base64.StdEncoding.Decode(der, trimmed); err == nil {
		return der[:n], nil
	}
	clean := bytes.Map(func(r rune) rune {
		if r == '\r' || r == '\n' || r == ' ' || r == '\t' {
			return -1
		}
		return r
	}, trimmed)
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if der, err := enc.DecodeString(string(clean)); err == nil {
			return der, nil
		}
	}
	return nil, fmt.Errorf("%w: neither base64, PEM nor DER", ErrMalformed)
}

// isDERSequence reports whether b is exactly one DER SEQUENCE. Base64 text
// may start with '0' (0x30) too, so the length must add up.
func isDERSequence(b []byte) bool {
	var raw asn1.RawValue
	rest, err := asn1.Unmarshal(b, &raw)
	return err == nil && len(rest) == 0 && raw.Tag == asn1.TagSequence && raw.IsCompound
}

// EncodeCerts builds a base64 PKCS#7 certs-only body (RFC 7030 section 4.1.3).
func EncodeCerts(certs ...*x509.Certificate) ([]byte, error) {
	var der []byte
	switch len(certs) {
	case 1: // every enrollment answer: no need to copy the certificate
		der = certs[0].Raw
	default:
		for _, c := range certs {
			der = append(der, c.Raw...)
		}
	}
	p7, err := pkcs7.DegenerateCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("encode certs-only: %w", err)
	}
	return base64Lines(p7), nil
}

// DecodeCerts reads certificates from a PKCS#7 certs-only body (base64, PEM
// or raw DER).
func DecodeCerts(body []byte) ([]*x509.Certificate, error) {
	der, err := decodeDER(body, "PKCS7", "CMS")
	if err != nil {
		return nil, err
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return nil, fmt.Errorf("%w: not PKCS#7: %v", ErrMalformed, err)
	}
	if len(p7.Certificates) == 0 {
		return nil, fmt.Errorf("%w: PKCS#7 holds no certificate", ErrMalformed)
	}
	return p7.Certificates, nil
}

// EncodeCSR is the request body a client sends: base64 DER.
func EncodeCSR(der []byte) []byte { return base64Lines(der) }

// base64Lines encodes b as base64 in 64-column lines, as OpenSSL and most
// EST clients write it.
func base64Lines(b []byte) []byte {
	const line = 64
	n := base64.StdEncoding.EncodedLen(len(b))
	lines := max(1, (n+line-1)/line)
	out := make([]byte, n+lines)
	// Encode at the end of out, then move each line forward to its place:
	// one allocation, no intermediate string.
	enc := out[lines:]
	base64.StdEncoding.Encode(enc, b)
	w := 0
	for len(enc) > line {
		w += copy(out[w:], enc[:line])
		out[w] = '\n'
		w++
		enc = enc[line:]
	}
	w += copy(out[w:], enc)
	out[w] = '\n'
	return out[:w+1]
}

// Object identifiers used in the CSR attributes answer.
var (
	oidECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidECPublicKey     = asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}
	oidP256            = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
)

// CSRAttrs is the base64 body of the csrattrs answer (RFC 7030 section
// 4.5.2): sign with ecdsa-with-SHA256 and use a P-256 key.
func CSRAttrs() []byte {
	type attribute struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.ObjectIdentifier `asn1:"set"`
	}
	sig, _ := asn1.Marshal(oidECDSAWithSHA256)
	attr, _ := asn1.Marshal(attribute{Type: oidECPublicKey, Values: []asn1.ObjectIdentifier{oidP256}})
	der, _ := asn1.Marshal(asn1.RawValue{Tag: asn1.TagSequence, IsCompound: true, Bytes: append(sig, attr...)})
	return base64Lines(der)
}
