package identity_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/topic"
)

// FuzzValidateName checks that the two spellings of the name grammar agree
// and that every name they accept is safe where names end up: as one MQTT
// topic level and as one file name.
func FuzzValidateName(f *testing.F) {
	for _, s := range []string{
		"sensor-0042", "a", "0", "a.b_c-d", strings.Repeat("a", 63), strings.Repeat("a", 64),
		"", ".", "..", "-a", "_a", ".a", "A", "a/b", "a+", "a#", "$sys", "a\x00b", "ä", "a b", "a\\b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := identity.ValidateName(s)
		if ok := identity.ValidDeviceID(s); ok != (err == nil) {
			t.Fatalf("ValidDeviceID(%q) = %v but ValidateName says %v", s, ok, err)
		}
		if err != nil {
			if !errors.Is(err, identity.ErrInvalidName) {
				t.Fatalf("ValidateName(%q) = %v, not ErrInvalidName", s, err)
			}
			return
		}
		if len(s) == 0 || len(s) > identity.MaxNameLen {
			t.Fatalf("accepted %q of %d bytes", s, len(s))
		}
		if strings.ToLower(s) != s {
			t.Fatalf("accepted %q, which collides with another name on a case-insensitive file system", s)
		}
		for i := 0; i < len(s); i++ {
			if c := s[i]; c < 0x21 || c > 0x7e {
				t.Fatalf("accepted %q with byte %#x", s, c)
			}
		}
		// A topic level: no separator, no wildcard, not a $-topic.
		if strings.ContainsAny(s, "/+#") || s[0] == '$' {
			t.Fatalf("accepted %q, which is not a plain topic level", s)
		}
		if levels := strings.Split(topic.Telemetry(s), "/"); len(levels) != 3 || levels[1] != s {
			t.Fatalf("telemetry topic of %q has levels %q", s, levels)
		}
		if !topic.Allowed(identity.RoleDevice, s, topic.Telemetry(s), topic.Publish) {
			t.Fatalf("device %q may not publish its own telemetry", s)
		}
		if !topic.Allowed(identity.RoleDevice, s, topic.Commands(s), topic.Subscribe) {
			t.Fatalf("device %q may not subscribe to its own commands", s)
		}
		// A file name: one local path element that does not start an option.
		if !filepath.IsLocal(s) || filepath.Base(s) != s || filepath.Clean(s) != s || s == "." || s == ".." || s[0] == '-' {
			t.Fatalf("accepted %q, which is not a plain file name", s)
		}
		if strings.ContainsAny(s, `\:`) {
			t.Fatalf("accepted %q with a Windows path character", s)
		}
	})
}

// FuzzParse feeds arbitrary URLs to Parse: what it accepts is a valid
// identity that survives a round trip through its own SPIFFE ID.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"spiffe://fleetgate.local/device/sensor-1",
		"spiffe://fleetgate.local/service/backend",
		"spiffe://fleetgate.local/operator/admin",
		"spiffe://fleetgate.local/device/a/b",
		"spiffe://fleetgate.local/device/",
		"spiffe://fleetgate.local//device/a",
		"spiffe://fleetgate.local/device%2Fa",
		"spiffe://fleetgate.local/device/%61",
		"spiffe://FLEETGATE.local/device/a",
		"spiffe://fleetgate.local:443/device/a",
		"spiffe://user@fleetgate.local/device/a",
		"spiffe://fleetgate.local/device/a?x=1",
		"spiffe://fleetgate.local/device/a#frag",
		"spiffe:fleetgate.local/device/a",
		"https://fleetgate.local/device/a",
		"spiffe://fleetgate.local",
		"spiffe://fleetgate.local/admin/root",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		u, err := url.Parse(raw)
		if err != nil {
			return
		}
		id, err := identity.Parse(u)
		if err != nil {
			if !isIdentityError(err) {
				t.Fatalf("Parse(%q): error %v wraps no identity sentinel", raw, err)
			}
			return
		}
		checkIdentity(t, raw, id)
		if id.TrustDomain != u.Host || u.Path != "/"+string(id.Role)+"/"+id.Name {
			t.Fatalf("Parse(%q) = %+v, not what the URL says (host %q, path %q)", raw, id, u.Host, u.Path)
		}
	})
}

// FuzzFromCertificate builds real certificates with fuzzed URI SANs, common
// names and CA flags, and checks the mapping never yields an identity of
// another trust domain, a CA, or a device whose common name differs.
func FuzzFromCertificate(f *testing.F) {
	const td = "fleetgate.local"
	f.Add("spiffe://fleetgate.local/device/sensor-1", "", "sensor-1", false)
	f.Add("spiffe://fleetgate.local/device/sensor-1", "", "sensor-2", false)
	f.Add("spiffe://fleetgate.local/device/sensor-1", "", "sensor-1", true)
	f.Add("spiffe://fleetgate.local/service/backend", "", "anything", false)
	f.Add("spiffe://fleetgate.local/operator/admin", "", "", false)
	f.Add("spiffe://other.domain/device/sensor-1", "", "sensor-1", false)
	f.Add("spiffe://fleetgate.local/device/sensor-1", "spiffe://fleetgate.local/device/sensor-2", "sensor-1", false)
	f.Add("spiffe://fleetgate.local", "", "fleetgate issuing CA", true)
	f.Add("spiffe://fleetgate.local/device%2Fsensor-1", "", "sensor-1", false)

	caKey := newKey(f)
	leafKey := newKey(f)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "fuzz CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		f.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, uri1, uri2, cn string, isCA bool) {
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(2),
			Subject:               pkix.Name{CommonName: cn},
			NotBefore:             ca.NotBefore,
			NotAfter:              ca.NotAfter,
			IsCA:                  isCA,
			BasicConstraintsValid: true,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		for _, s := range []string{uri1, uri2} {
			if s == "" {
				continue
			}
			u, err := url.Parse(s)
			if err != nil {
				return
			}
			tmpl.URIs = append(tmpl.URIs, u)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, leafKey.Public(), caKey)
		if err != nil {
			return
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return // the x509 parser refuses the SAN or name: no certificate to map
		}
		id, err := identity.FromCertificate(cert, td)
		if err != nil {
			if !isIdentityError(err) {
				t.Fatalf("FromCertificate: error %v wraps no identity sentinel", err)
			}
			return
		}
		checkIdentity(t, cert.URIs[0].String(), id)
		switch {
		case id.TrustDomain != td:
			t.Fatalf("certificate with URIs %v mapped to %v of another trust domain", cert.URIs, id)
		case cert.IsCA:
			t.Fatalf("CA certificate mapped to %v", id)
		case len(cert.URIs) != 1:
			t.Fatalf("certificate with %d URI SANs mapped to %v", len(cert.URIs), id)
		case id.Role == identity.RoleDevice && cert.Subject.CommonName != id.Name:
			t.Fatalf("device %v mapped from a certificate with common name %q", id, cert.Subject.CommonName)
		}
		if back, err := identity.Parse(cert.URIs[0]); err != nil || back != id {
			t.Fatalf("URI SAN %v parses to %+v, %v; the certificate mapped to %+v", cert.URIs[0], back, err, id)
		}
	})
}

// checkIdentity asserts what holds for every identity Parse or
// FromCertificate hands out.
func checkIdentity(t *testing.T, from string, id identity.Identity) {
	t.Helper()
	if err := id.Validate(); err != nil {
		t.Fatalf("%q yields invalid identity %+v: %v", from, id, err)
	}
	switch id.Role {
	case identity.RoleDevice, identity.RoleService, identity.RoleOperator:
	default:
		t.Fatalf("%q yields unknown role %q", from, id.Role)
	}
	u, err := url.Parse(id.String())
	if err != nil {
		t.Fatalf("SPIFFE ID %q of %q does not parse: %v", id.String(), from, err)
	}
	back, err := identity.Parse(u)
	if err != nil || back != id {
		t.Fatalf("SPIFFE ID %q of %q parses back to %+v, %v", id.String(), from, back, err)
	}
}

func isIdentityError(err error) bool {
	return errors.Is(err, identity.ErrNoIdentity) || errors.Is(err, identity.ErrForeignDomain) ||
		errors.Is(err, identity.ErrInvalidName) || errors.Is(err, identity.ErrInvalidTrustDomain)
}

// newKey makes an Ed25519 key: the cheapest signer, as the fuzzer signs a
// certificate per input.
func newKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
