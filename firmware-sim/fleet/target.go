package fleet

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Target is the gateway a fleet runs against.
type Target struct {
	// ESTURL is the EST listener, https://HOST:PORT.
	ESTURL string
	// AdminURL is the admin API, https://HOST:PORT.
	AdminURL string
	// MQTTAddr is the MQTT listener, HOST:PORT.
	MQTTAddr string
	// DataDir holds the operator certificate (pki.Layout).
	DataDir string
	// CAFile is the bundle devices trust; default DataDir/ca.pem.
	CAFile string
}

// ErrNotLoopback: firmware-sim sends load only to loopback addresses.
var ErrNotLoopback = errors.New("firmware-sim sends load only to loopback addresses (127.0.0.0/8)")

// Validate checks the target: every address is on loopback (127.0.0.0/8)
// and the data directory is absolute.
func (t *Target) Validate() error {
	if t.DataDir == "" {
		return errors.New("--data-dir is required: the operator certificate that mints tokens lives there")
	}
	abs, err := filepath.Abs(t.DataDir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	t.DataDir = abs
	if t.CAFile == "" {
		t.CAFile = pki.Layout{Dir: t.DataDir}.CABundle()
	}
	for flag, u := range map[string]string{"--gateway": t.ESTURL, "--admin": t.AdminURL} {
		pu, err := url.Parse(u)
		if err != nil || pu.Scheme != "https" || pu.Host == "" {
			return fmt.Errorf("%s %q: want https://HOST:PORT", flag, u)
		}
		if _, err := loopbackIP(pu.Hostname()); err != nil {
			return fmt.Errorf("%s %q: %w", flag, u, err)
		}
	}
	host, _, err := net.SplitHostPort(t.MQTTAddr)
	if err != nil {
		return fmt.Errorf("--mqtt %q: want HOST:PORT: %w", t.MQTTAddr, err)
	}
	if _, err := loopbackIP(host); err != nil {
		return fmt.Errorf("--mqtt %q: %w", t.MQTTAddr, err)
	}
	return nil
}

// loopbackIP resolves host to an IPv4 loopback address.
func loopbackIP(host string) (net.IP, error) {
	ips, err := net.DefaultResolver.LookupIP(context.Background(), "ip", host)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", host, err)
	}
	for _, ip := range ips {
		if ip4 := ip.To4(); ip4 != nil && ip4[0] == 127 {
			return ip4, nil
		}
	}
	return nil, fmt.Errorf("%w: %s resolves to %v", ErrNotLoopback, host, ips)
}

// resolveLoopback replaces the host of HOST:PORT by its IPv4 loopback
// address and returns the original host as the TLS server name.
func resolveLoopback(addr string) (dial, serverName string, err error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", "", err
	}
	ip, err := loopbackIP(host)
	if err != nil {
		return "", "", err
	}
	return net.JoinHostPort(ip.String(), port), host, nil
}

// Groups parses a --tls-groups value: the key exchange the simulated
// devices offer. "x25519" (the default) is what both fleetgate and
// Mosquitto (OpenSSL 3.0) negotiate, so the two compare on equal terms;
// "mlkem" is Go's default hybrid X25519MLKEM768, which the agent offers;
// "default" leaves Go's default list.
func Groups(s string) ([]tls.CurveID, error) {
	switch strings.ToLower(s) {
	case "", "x25519":
		return []tls.CurveID{tls.X25519}, nil
	case "p256", "p-256", "secp256r1":
		return []tls.CurveID{tls.CurveP256}, nil
	case "mlkem", "x25519mlkem768":
		return []tls.CurveID{tls.X25519MLKEM768}, nil
	case "default":
		return nil, nil
	default:
		return nil, fmt.Errorf("TLS group %q: want x25519, p256, mlkem or default", s)
	}
}

// serverVerifier checks the server's certificate chain fully the first
// time it sees a leaf and remembers the verdict, so ten thousand simulated
// devices do not each spend ~60 µs of the machine's CPU re-verifying the
// same gateway certificate (CPU the gateway under test needs). A real
// device verifies every time; the load generator is not under test.
type serverVerifier struct {
	roots *x509.CertPool
	name  string
	mu    sync.Mutex
	good  map[[32]byte]bool
}

func (v *serverVerifier) verify(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("server sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	sum := sha256.Sum256(leaf.Raw)
	v.mu.Lock()
	ok := v.good[sum]
	v.mu.Unlock()
	if ok {
		return nil
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: v.roots, Intermediates: inter, DNSName: v.name}); err != nil {
		return &tls.CertificateVerificationError{UnverifiedCertificates: cs.PeerCertificates, Err: err}
	}
	v.mu.Lock()
	v.good[sum] = true
	v.mu.Unlock()
	return nil
}

// clientTLS is the base TLS configuration of every simulated client: TLS
// 1.3 (what the agent negotiates with the gateway), the chosen key
// exchange, and the cached server verification.
func clientTLS(roots *x509.CertPool, serverName string, groups []tls.CurveID) *tls.Config {
	v := &serverVerifier{roots: roots, name: serverName, good: map[[32]byte]bool{}}
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         serverName,
		CurvePreferences:   groups,
		InsecureSkipVerify: true, // verified by VerifyConnection, once per leaf
		VerifyConnection:   v.verify,
	}
}

// readPool loads a CA bundle.
func readPool(file string) (*x509.CertPool, []*x509.Certificate, error) {
	certs, err := pki.ReadCertsFile(file)
	if err != nil {
		return nil, nil, err
	}
	return pki.NewPool(certs...), certs, nil
}
