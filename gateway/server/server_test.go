package server_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// env is an in-process gateway on loopback ports with a real data dir.
type env struct {
	srv    *server.Server
	layout pki.Layout
	pool   *x509.CertPool
	admin  *adminapi.Client
	ca     *pki.CA
	td     string
}

func newEnv(t testing.TB, mods ...func(*server.Config)) *env {
	t.Helper()
	l := pki.Layout{Dir: t.TempDir()}
	if err := pki.Init(l, pki.InitOptions{Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	cfg := server.Config{DataDir: l.Dir, MQTTListen: "127.0.0.1:0", ESTListen: "127.0.0.1:0", AdminListen: "127.0.0.1:0"}
	for _, m := range mods {
		m(&cfg)
	}
	srv, err := server.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	certs, err := pki.ReadCertsFile(l.CABundle())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	tlsConf, err := adminapi.OperatorTLS(l)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadIssuingCA(l)
	if err != nil {
		t.Fatal(err)
	}
	return &env{srv: srv, layout: l, pool: pool, admin: adminapi.NewClient("https://"+srv.Addr("admin"), tlsConf), ca: ca, td: pki.DefaultTrustDomain}
}

func (e *env) est(cert *tls.Certificate) *est.Client {
	return est.NewClient("https://"+e.srv.Addr("est"), e.pool, func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		if cert == nil {
			return &tls.Certificate{}, nil
		}
		return cert, nil
	})
}

func (e *env) token(t testing.TB, id string, ttl string) string {
	t.Helper()
	resp, err := e.admin.CreateTokens(context.Background(), adminapi.TokenRequest{DeviceIDs: []string{id}, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Tokens[0].Token
}

// snapshot is the registry state visible through the admin API.
func (e *env) snapshot(t *testing.T) string {
	t.Helper()
	devs, err := e.admin.Devices(context.Background(), "", "", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	audit, err := e.admin.Audit(context.Background(), 0, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, d := range devs.Devices {
		fmt.Fprintf(&b, "%s/%s/%s ", d.ID, d.Status, d.CurrentSerial)
	}
	fmt.Fprintf(&b, "audit=%d", len(audit.Events))
	return b.String()
}

// issuer signs certificates with the gateway's own CA, for certificates the
// gateway would never issue (expired, not yet valid, wrong EKU).
func (e *env) issuer(now time.Time) *pki.Issuer {
	return &pki.Issuer{CA: e.ca, TrustDomain: e.td, Now: func() time.Time { return now }}
}

// csrSignedByOtherKey builds a CSR for pub whose signature was made by
// another key: it parses, but its signature does not verify.
func csrSignedByOtherKey(t *testing.T, cn string) []byte {
	t.Helper()
	claimed := pkitest.CSR(t, pkitest.Key(t), cn)
	csr, err := x509.ParseCertificateRequest(claimed)
	if err != nil {
		t.Fatal(err)
	}
	other := pkitest.Key(t).(*ecdsa.PrivateKey)
	sum := sha256.Sum256(csr.RawTBSCertificateRequest)
	sig, err := ecdsa.SignASN1(rand.Reader, other, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	der, err := asn1.Marshal(struct {
		TBS       asn1.RawValue
		Algorithm pkix.AlgorithmIdentifier
		Signature asn1.BitString
	}{
		TBS:       asn1.RawValue{FullBytes: csr.RawTBSCertificateRequest},
		Algorithm: pkix.AlgorithmIdentifier{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}},
		Signature: asn1.BitString{Bytes: sig, BitLength: len(sig) * 8},
	})
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestEnrollmentRefusals(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	good := pkitest.CSR(t, pkitest.Key(t), "sensor-1")
	tok := e.token(t, "sensor-1", "")
	tokOther := e.token(t, "sensor-2", "")
	expired := e.token(t, "sensor-3", "1ms")
	time.Sleep(5 * time.Millisecond)

	cases := []struct {
		name   string
		id     string
		token  string
		csr    []byte
		status int
		reason string
	}{
		{"garbage csr", "sensor-1", tok, []byte("this is not a CSR"), http.StatusBadRequest, "malformed"},
		{"csr signed by a different key", "sensor-1", tok, csrSignedByOtherKey(t, "sensor-1"), http.StatusBadRequest, "signature"},
		{"cn not matching the token's device", "sensor-1", tok, pkitest.CSR(t, pkitest.Key(t), "sensor-2"), http.StatusBadRequest, "common name"},
		{"uri san of another device", "sensor-1", tok, pkitest.CSR(t, pkitest.Key(t), "sensor-1", identity.Device(e.td, "sensor-2").URI()), http.StatusBadRequest, "URI SAN"},
		{"wrong token", "sensor-1", "not-the-token", good, http.StatusUnauthorized, "invalid"},
		{"token of another device", "sensor-1", tokOther, good, http.StatusUnauthorized, "invalid"},
		{"expired token", "sensor-3", expired, pkitest.CSR(t, pkitest.Key(t), "sensor-3"), http.StatusUnauthorized, "expired"},
		{"invalid device id", "Sensor 1", tok, good, http.StatusUnauthorized, "invalid"},
		{"empty token", "sensor-1", "", good, http.StatusUnauthorized, "token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.snapshot(t)
			_, err := e.est(nil).SimpleEnroll(ctx, tc.csr, tc.id, tc.token)
			var estErr *est.Error
			if !errors.As(err, &estErr) || estErr.StatusCode != tc.status {
				t.Fatalf("err = %v, want HTTP %d", err, tc.status)
			}
			if !strings.Contains(estErr.Message, tc.reason) {
				t.Errorf("reason %q does not mention %q", estErr.Message, tc.reason)
			}
			if after := e.snapshot(t); after != before {
				t.Errorf("state changed:\nbefore %s\nafter  %s", before, after)
			}
		})
	}

	// None of the refusals consumed the token: it still enrolls, once.
	cert, err := e.est(nil).SimpleEnroll(ctx, good, "sensor-1", tok)
	if err != nil {
		t.Fatalf("valid enrollment after refusals: %v", err)
	}
	if cert.Subject.CommonName != "sensor-1" {
		t.Fatalf("CN %q", cert.Subject.CommonName)
	}
	before := e.snapshot(t)
	if _, err := e.est(nil).SimpleEnroll(ctx, good, "sensor-1", tok); !est.IsStatus(err, http.StatusUnauthorized) || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("reused token: %v", err)
	}
	if after := e.snapshot(t); after != before {
		t.Errorf("reused token changed state:\nbefore %s\nafter  %s", before, after)
	}
}

func TestConcurrentTokenUseWinsOnce(t *testing.T) {
	e := newEnv(t)
	tok := e.token(t, "race-1", "")
	const n = 16
	results := make(chan error, n)
	for range n {
		go func() {
			_, err := e.est(nil).SimpleEnroll(context.Background(), pkitest.CSR(t, pkitest.Key(t), "race-1"), "race-1", tok)
			results <- err
		}()
	}
	ok := 0
	for range n {
		if err := <-results; err == nil {
			ok++
		} else if !est.IsStatus(err, http.StatusUnauthorized) {
			t.Errorf("unexpected error: %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d enrollments succeeded with one token, want exactly 1", ok)
	}
	d, err := e.admin.Device(context.Background(), "race-1")
	if err != nil || len(d.Certificates) != 1 {
		t.Fatalf("device has %d certificates (%v), want 1", len(d.Certificates), err)
	}
}

// mqttConnect makes one MQTT 3.1.1 connection attempt.
func (e *env) mqttConnect(clientID string, conf *tls.Config) error {
	if conf.RootCAs == nil {
		conf.RootCAs = e.pool
	}
	// Present the certificate whatever CAs the server names: with
	// tls.Config.Certificates Go's client silently withholds one that does
	// not chain to them, and a foreign-CA case would test "no certificate".
	if len(conf.Certificates) > 0 {
		c := conf.Certificates[0]
		conf.Certificates = nil
		conf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }
	}
	conf.ServerName = "localhost"
	opts := paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID(clientID).SetTLSConfig(conf).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return err
	}
	defer c.Disconnect(50)
	// With TLS 1.3 a refused client certificate surfaces after the client's
	// side of the handshake: a round trip proves the session is real.
	p := c.Publish("devices/"+clientID+"/telemetry", 1, false, []byte("x"))
	if !p.WaitTimeout(5*time.Second) || p.Error() != nil {
		return fmt.Errorf("publish failed: %v", p.Error())
	}
	return nil
}

func TestMQTTRefusals(t *testing.T) {
	e := newEnv(t)
	now := time.Now()
	devCert, devKey := e.deviceCert(t, "dev-1", e.issuer(now), time.Hour)
	expCert, expKey := e.deviceCert(t, "dev-2", e.issuer(now.Add(-3*time.Hour)), time.Hour)
	futCert, futKey := e.deviceCert(t, "dev-3", e.issuer(now.Add(3*time.Hour)), time.Hour)
	foreign := pkitest.NewDomain(t, e.td) // same trust domain name, another CA
	forCert, forKey := foreign.Device(t, "dev-1")
	opCerts, err := pki.ReadCertsFile(e.layout.OperatorCert())
	if err != nil {
		t.Fatal(err)
	}
	opKey, err := pki.ReadKeyFile(e.layout.OperatorKey())
	if err != nil {
		t.Fatal(err)
	}
	caAsClient := tls.Certificate{Certificate: [][]byte{e.ca.Cert.Raw}, PrivateKey: e.ca.Signer}

	tc := func(c *x509.Certificate, k crypto.Signer) []tls.Certificate {
		return []tls.Certificate{pkitest.TLSCert(c, k, e.ca.Cert)}
	}
	cases := []struct {
		name     string
		clientID string
		conf     *tls.Config
		ok       bool
	}{
		{"valid device certificate", "dev-1", &tls.Config{Certificates: tc(devCert, devKey)}, true},
		{"valid device certificate over TLS 1.2", "dev-1", &tls.Config{Certificates: tc(devCert, devKey), MaxVersion: tls.VersionTLS12}, true},
		{"no client certificate", "dev-1", &tls.Config{}, false},
		{"certificate from a foreign CA", "dev-1", &tls.Config{Certificates: tc(forCert, forKey)}, false},
		{"expired certificate", "dev-2", &tls.Config{Certificates: tc(expCert, expKey)}, false},
		{"not yet valid certificate", "dev-3", &tls.Config{Certificates: tc(futCert, futKey)}, false},
		{"TLS 1.1 client", "dev-1", &tls.Config{Certificates: tc(devCert, devKey), MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11}, false},
		{"client ID of another device", "dev-9", &tls.Config{Certificates: tc(devCert, devKey)}, false},
		{"operator certificate", "admin", &tls.Config{Certificates: []tls.Certificate{pkitest.TLSCert(opCerts[0], opKey)}}, false},
		{"CA certificate as a client", "dev-1", &tls.Config{Certificates: []tls.Certificate{caAsClient}}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := e.mqttConnect(c.clientID, c.conf)
			if c.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !c.ok && err == nil {
				t.Fatal("connected")
			}
		})
	}
}

func (e *env) deviceCert(t testing.TB, id string, is *pki.Issuer, ttl time.Duration) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key := pkitest.Key(t)
	c, err := is.IssueIdentity(key.Public(), identity.Device(e.td, id), ttl)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func TestRevocationCutsLiveSession(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	key := pkitest.Key(t)
	cert, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(t, key, "victim"), "victim", e.token(t, "victim", ""))
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan time.Time, 1)
	// A persistent session: the broker would keep it (and queue commands
	// for it) after a plain disconnect, but not after a revocation.
	opts := paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID("victim").
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.ca.Cert)}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetCleanSession(false).
		SetConnectionLostHandler(func(paho.Client, error) { lost <- time.Now() })
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	// The broker registers the session right after it sends CONNACK.
	for i := 0; !e.srv.Broker().Connected("victim"); i++ {
		if i == 100 {
			t.Fatal("broker does not list the session")
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	res, err := e.admin.Revoke(ctx, "victim", "keyCompromise")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Disconnected || len(res.RevokedSerials) != 1 {
		t.Errorf("revoke answer %+v", res)
	}
	select {
	case at := <-lost:
		t.Logf("revoke request → client saw its session closed: %v", at.Sub(start))
	case <-time.After(5 * time.Second):
		t.Fatal("live session survived revocation")
	}
	if e.srv.Broker().HasSession("victim") {
		t.Error("the broker still stores the revoked device's session")
	}
	if err := e.mqttConnect("victim", &tls.Config{Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.ca.Cert)}}); err == nil {
		t.Fatal("revoked certificate reconnected")
	}
	// Re-enrollment over EST with the revoked certificate is refused too.
	tc := pkitest.TLSCert(cert, key, e.ca.Cert)
	if _, err := e.est(&tc).SimpleReenroll(ctx, pkitest.CSR(t, key, "victim")); err == nil {
		t.Fatal("revoked certificate re-enrolled")
	}
	if _, err := e.admin.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: []string{"victim"}}); !adminapi.IsStatus(err, http.StatusConflict) {
		t.Fatalf("token for a revoked device: %v", err)
	}
	again, err := e.admin.Revoke(ctx, "victim", "keyCompromise")
	if err != nil || !again.AlreadyRevoked {
		t.Fatalf("second revoke: %+v %v", again, err)
	}
}

func TestReenrollWithRekey(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	key := pkitest.Key(t)
	cert, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(t, key, "renewer"), "renewer", e.token(t, "renewer", ""))
	if err != nil {
		t.Fatal(err)
	}
	tc := pkitest.TLSCert(cert, key, e.ca.Cert)
	newKey := pkitest.Key(t)
	renewed, err := e.est(&tc).SimpleReenroll(ctx, pkitest.CSR(t, newKey, "renewer"))
	if err != nil {
		t.Fatal(err)
	}
	if pki.KeyMatches(renewed, newKey) != nil || renewed.SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Fatal("renewal did not certify the new key")
	}
	// Renewing for another identity is refused.
	if _, err := e.est(&tc).SimpleReenroll(ctx, pkitest.CSR(t, newKey, "someone-else")); !est.IsStatus(err, http.StatusBadRequest) {
		t.Fatalf("re-enroll as another device: %v", err)
	}
	// Without a client certificate there is nothing to renew.
	if _, err := e.est(nil).SimpleReenroll(ctx, pkitest.CSR(t, newKey, "renewer")); !est.IsStatus(err, http.StatusUnauthorized) {
		t.Fatalf("re-enroll without a certificate: %v", err)
	}
	d, err := e.admin.Device(ctx, "renewer")
	if err != nil || len(d.Certificates) != 2 || d.CurrentSerial != pki.SerialHex(renewed) {
		t.Fatalf("device after renewal: %+v %v", d, err)
	}
}

func TestAdminAPIRequiresOperator(t *testing.T) {
	e := newEnv(t)
	svcCert, svcKey := e.deviceCert(t, "x", e.issuer(time.Now()), time.Hour) // a device certificate
	conf := &tls.Config{RootCAs: e.pool, Certificates: []tls.Certificate{pkitest.TLSCert(svcCert, svcKey, e.ca.Cert)}}
	c := adminapi.NewClient("https://"+e.srv.Addr("admin"), conf)
	if _, err := c.Devices(context.Background(), "", "", "", 0); !adminapi.IsStatus(err, http.StatusForbidden) {
		t.Fatalf("device certificate on the admin API: %v", err)
	}
	noCert := adminapi.NewClient("https://"+e.srv.Addr("admin"), &tls.Config{RootCAs: e.pool})
	if _, err := noCert.Devices(context.Background(), "", "", "", 0); err == nil {
		t.Fatal("admin API answered without a client certificate")
	}
}
