package server_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// The surfaces of the authorization matrix, in the column order of the
// expectation table in TestAuthorizationMatrix.
const (
	sConnect         = iota // MQTT CONNECT accepted (CONNACK 0)
	sPubOwnTelemetry        // publish devices/OWN/telemetry, seen by a service subscriber
	sPubOtherTelem          // publish devices/OTHER/telemetry, seen by a service subscriber
	sPubCommands            // publish devices/dev-c/commands, seen by device dev-c
	sSubOwnCommands         // subscribe devices/OWN/commands (SUBACK < 0x80)
	sSubOtherCmds           // subscribe devices/OTHER/commands
	sSubAllTelemetry        // subscribe devices/+/telemetry
	sSubHash                // subscribe #
	sSubSys                 // subscribe $SYS/#
	sSubShared              // subscribe $share/g/devices/+/telemetry
	sEnrollToken            // EST simpleenroll with a valid token for a new device
	sEnrollBadToken         // EST simpleenroll with a wrong token
	sReenroll               // EST simplereenroll for its own name
	sAdminList              // admin API: list devices
	numSurfaces
)

var surfaceNames = [numSurfaces]string{
	"mqtt connect", "publish own telemetry", "publish other device's telemetry", "publish commands",
	"subscribe own commands", "subscribe other device's commands", "subscribe devices/+/telemetry",
	"subscribe #", "subscribe $SYS/#", "subscribe $share/g/devices/+/telemetry",
	"est simpleenroll with token", "est simpleenroll with wrong token", "est simplereenroll", "admin list devices",
}

// authzRole is one kind of client of the matrix.
type authzRole struct {
	name string
	// cert is presented in every TLS handshake; nil presents none.
	cert *tls.Certificate
	// clientID of its MQTT sessions; own and other name the devices whose
	// topics are "its own" and "another device's".
	clientID, own, other string
	// cn is the name its re-enrollment CSR asks for.
	cn string
}

const (
	Y = true
	N = false
)

// TestAuthorizationMatrix tries every surface of the gateway as every kind
// of client and compares each outcome with one table. Publishes count as
// allowed only when a subscriber received them, subscriptions when the
// SUBACK granted them.
func TestAuthorizationMatrix(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	now := time.Now()

	enroll := func(id string) tls.Certificate {
		key := pkitest.Key(t)
		cert, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(t, key, id), id, e.token(t, id, ""))
		if err != nil {
			t.Fatalf("enroll %s: %v", id, err)
		}
		return pkitest.TLSCert(cert, key, e.ca.Cert)
	}
	tlsOf := func(c *x509.Certificate, k crypto.Signer) *tls.Certificate {
		tc := pkitest.TLSCert(c, k, e.ca.Cert)
		return &tc
	}
	devA, devB, devC := enroll("dev-a"), enroll("dev-b"), enroll("dev-c")
	devRev := enroll("dev-rev")
	if _, err := e.admin.Revoke(ctx, "dev-rev", "keyCompromise"); err != nil {
		t.Fatal(err)
	}
	svc := e.serviceCert(t, "backend")
	observerCert := e.serviceCert(t, "observer")
	opCert, err := tls.LoadX509KeyPair(e.layout.OperatorCert(), e.layout.OperatorKey())
	if err != nil {
		t.Fatal(err)
	}
	foreignCert, foreignKey := pkitest.NewDomain(t, e.td).Device(t, "dev-a") // same trust domain name, another CA
	foreign := pkitest.TLSCert(foreignCert, foreignKey)
	expired := tlsOf(e.deviceCert(t, "dev-exp", e.issuer(now.Add(-3*time.Hour)), time.Hour))
	notYet := tlsOf(e.deviceCert(t, "dev-fut", e.issuer(now.Add(3*time.Hour)), time.Hour))
	wrongEKU := e.serverAuthDeviceCert(t, "dev-eku")
	caAsClient := tls.Certificate{Certificate: [][]byte{e.ca.Cert.Raw}, PrivateKey: e.ca.Signer}

	roles := []authzRole{
		{name: "device A", cert: &devA, clientID: "dev-a", own: "dev-a", other: "dev-b", cn: "dev-a"},
		{name: "device B", cert: &devB, clientID: "dev-b", own: "dev-b", other: "dev-a", cn: "dev-b"},
		{name: "service", cert: &svc, clientID: "authz", own: "dev-a", other: "dev-b", cn: "backend"},
		{name: "operator", cert: &opCert, clientID: "admin", own: "dev-a", other: "dev-b", cn: "admin"},
		{name: "foreign CA", cert: &foreign, clientID: "dev-a", own: "dev-a", other: "dev-b", cn: "dev-a"},
		{name: "expired", cert: expired, clientID: "dev-exp", own: "dev-exp", other: "dev-a", cn: "dev-exp"},
		{name: "revoked", cert: &devRev, clientID: "dev-rev", own: "dev-rev", other: "dev-a", cn: "dev-rev"},
		{name: "not yet valid", cert: notYet, clientID: "dev-fut", own: "dev-fut", other: "dev-a", cn: "dev-fut"},
		{name: "wrong EKU (serverAuth only)", cert: &wrongEKU, clientID: "dev-eku", own: "dev-eku", other: "dev-a", cn: "dev-eku"},
		{name: "CA certificate as client", cert: &caAsClient, clientID: "dev-a", own: "dev-a", other: "dev-b", cn: e.ca.Cert.Subject.CommonName},
		{name: "no client certificate", cert: nil, clientID: "dev-a", own: "dev-a", other: "dev-b", cn: "dev-a"},
	}
	// The expected outcome of every cell. simpleenroll authenticates by
	// token alone, so every client whose TLS handshake passes may enroll
	// a new device with a valid token; a certificate the TLS layer refuses
	// (foreign CA, expired, revoked, not yet valid, wrong EKU) fails every
	// surface, simpleenroll included.
	want := map[string][numSurfaces]bool{
		//                              conn pubOwn pubOth pubCmd subOwn subOth sub+ sub# $SYS share enrTok enrBad reenr admin
		"device A":                    {Y, Y, N, N, Y, N, N, N, N, N, Y, N, Y, N},
		"device B":                    {Y, Y, N, N, Y, N, N, N, N, N, Y, N, Y, N},
		"service":                     {Y, N, N, Y, N, N, Y, N, N, Y, Y, N, N, N},
		"operator":                    {N, N, N, N, N, N, N, N, N, N, Y, N, N, Y},
		"foreign CA":                  {N, N, N, N, N, N, N, N, N, N, N, N, N, N},
		"expired":                     {N, N, N, N, N, N, N, N, N, N, N, N, N, N},
		"revoked":                     {N, N, N, N, N, N, N, N, N, N, N, N, N, N},
		"not yet valid":               {N, N, N, N, N, N, N, N, N, N, N, N, N, N},
		"wrong EKU (serverAuth only)": {N, N, N, N, N, N, N, N, N, N, N, N, N, N},
		"CA certificate as client":    {N, N, N, N, N, N, N, N, N, N, Y, N, N, N},
		"no client certificate":       {N, N, N, N, N, N, N, N, N, N, Y, N, N, N},
	}

	telemetry := e.observe(t, "observer", &observerCert, "devices/+/telemetry")
	commands := e.observe(t, "dev-c", &devC, "devices/dev-c/commands")
	// forbidden maps the payload of every publish the gateway refused to
	// its cell: none may ever reach a subscriber.
	forbidden := map[string]string{}

	cells := 0
	for ri, r := range roles {
		row, ok := want[r.name]
		if !ok {
			t.Fatalf("no expectations for role %q", r.name)
		}
		for s := range numSurfaces {
			cells++
			cell := r.name + " / " + surfaceNames[s]
			t.Run(r.name+"/"+surfaceNames[s], func(t *testing.T) {
				var allowed bool
				var detail string
				switch s {
				case sConnect:
					allowed, detail = e.tryConnect(t, r)
				case sPubOwnTelemetry, sPubOtherTelem, sPubCommands:
					dev, obs := r.own, telemetry
					switch s {
					case sPubOtherTelem:
						dev = r.other
					case sPubCommands:
						dev, obs = "dev-c", commands
					}
					kind := "telemetry"
					if s == sPubCommands {
						kind = "commands"
					}
					payload := fmt.Sprintf("authz %d/%d %s", ri, s, rand.Text())
					allowed, detail = e.tryPublish(t, r, "devices/"+dev+"/"+kind, payload, obs)
					if !allowed {
						forbidden[payload] = cell
					}
				case sSubOwnCommands, sSubOtherCmds, sSubAllTelemetry, sSubHash, sSubSys, sSubShared:
					filter := map[int]string{
						sSubOwnCommands: "devices/" + r.own + "/commands", sSubOtherCmds: "devices/" + r.other + "/commands",
						sSubAllTelemetry: "devices/+/telemetry", sSubHash: "#", sSubSys: "$SYS/#", sSubShared: "$share/g/devices/+/telemetry",
					}[s]
					allowed, detail = e.trySubscribe(t, r, filter)
				case sEnrollToken:
					id := fmt.Sprintf("enr-%d", ri)
					_, err := e.est(r.cert).SimpleEnroll(ctx, pkitest.CSR(t, pkitest.Key(t), id), id, e.token(t, id, ""))
					allowed, detail = err == nil, errText(err)
				case sEnrollBadToken:
					id := fmt.Sprintf("bad-%d", ri)
					e.token(t, id, "")
					_, err := e.est(r.cert).SimpleEnroll(ctx, pkitest.CSR(t, pkitest.Key(t), id), id, "not-the-token")
					allowed, detail = err == nil, errText(err)
				case sReenroll:
					_, err := e.est(r.cert).SimpleReenroll(ctx, pkitest.CSR(t, pkitest.Key(t), r.cn))
					allowed, detail = err == nil, errText(err)
				case sAdminList:
					conf := confOf(r)
					conf.RootCAs = e.pool
					_, err := adminapi.NewClient("https://"+e.srv.Addr("admin"), conf).Devices(ctx, "", "", "", 0)
					allowed, detail = err == nil, errText(err)
				}
				if allowed != row[s] {
					t.Errorf("%s: allowed = %v, want %v (%s)", cell, allowed, row[s], detail)
				} else {
					t.Logf("%s: allowed = %v (%s)", cell, allowed, detail)
				}
			})
		}
	}

	// A refused publish leaves no trace: after a sentinel through each
	// subscriber's own queue, none of the refused payloads arrived.
	sentinel := "authz sentinel " + rand.Text()
	if ok, detail := e.tryPublish(t, roles[0], "devices/dev-a/telemetry", sentinel, telemetry); !ok {
		t.Fatalf("telemetry sentinel: %s", detail)
	}
	if ok, detail := e.tryPublish(t, roles[2], "devices/dev-c/commands", sentinel+" cmd", commands); !ok {
		t.Fatalf("commands sentinel: %s", detail)
	}
	for _, obs := range []*observer{telemetry, commands} {
		for payload, cell := range forbidden {
			if obs.seen(payload) {
				t.Errorf("%s: refused, yet the subscriber received %q", cell, payload)
			}
		}
	}
	t.Logf("authorization matrix: %d roles × %d surfaces = %d cells", len(roles), int(numSurfaces), cells)
}

func errText(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

// serviceCert issues a service certificate through the admin API.
func (e *env) serviceCert(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key := pkitest.Key(t)
	csr := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: pkitest.CSR(t, key, name)})
	resp, err := e.admin.IssueCertificate(context.Background(), adminapi.CertificateRequest{Role: "service", Name: name, CSR: string(csr)})
	if err != nil {
		t.Fatal(err)
	}
	certs, err := pki.ParseCertsPEM([]byte(resp.Chain))
	if err != nil {
		t.Fatal(err)
	}
	return pkitest.TLSCert(certs[0], key, certs[1:]...)
}

// serverAuthDeviceCert signs, with the gateway's own CA, a certificate that
// names device id correctly but carries only the serverAuth EKU.
func (e *env) serverAuthDeviceCert(t *testing.T, id string) tls.Certificate {
	t.Helper()
	key := pkitest.Key(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: id},
		URIs:                  []*url.URL{identity.Device(e.td, id).URI()},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, e.ca.Cert, key.Public(), e.ca.Signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return pkitest.TLSCert(cert, key, e.ca.Cert)
}

// confOf presents r's certificate whatever CAs the server asks for: with
// tls.Config.Certificates, Go's client would hold back a certificate that
// does not chain to an acceptable CA, and the gateway would never see it.
func confOf(r authzRole) *tls.Config {
	return &tls.Config{GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		if r.cert == nil {
			return &tls.Certificate{}, nil
		}
		return r.cert, nil
	}}
}

// session is a raw MQTT 5 session after a successful CONNECT.
type session struct {
	conn *tls.Conn
	r    *bufio.Reader
}

// dial connects as r with MQTT 5; it reports the refusal when the TLS
// handshake or CONNECT is refused.
func (e *env) dial(t *testing.T, r authzRole) (*session, string) {
	t.Helper()
	code, conn, err := e.rawConnect(t, 5, r.clientID, confOf(r))
	if err != nil {
		return nil, "refused: " + err.Error()
	}
	if code != 0 {
		conn.Close()
		return nil, fmt.Sprintf("CONNACK 0x%02x", code)
	}
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	return &session{conn: conn, r: bufio.NewReader(conn)}, "CONNACK 0x00"
}

func (s *session) close() {
	var buf bytes.Buffer
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: 5}
	if pk.DisconnectEncode(&buf) == nil {
		_, _ = s.conn.Write(buf.Bytes())
	}
	s.conn.Close()
}

// await reads packets until one of type typ arrives (deliveries of
// retained messages are skipped).
func (s *session) await(typ byte) (packets.Packet, error) {
	for {
		first, err := s.r.ReadByte()
		if err != nil {
			return packets.Packet{}, err
		}
		pk := packets.Packet{ProtocolVersion: 5}
		if err := pk.FixedHeader.Decode(first); err != nil {
			return pk, err
		}
		n, mul := 0, 1
		for {
			b, err := s.r.ReadByte()
			if err != nil {
				return pk, err
			}
			n += int(b&127) * mul
			mul *= 128
			if b&128 == 0 {
				break
			}
		}
		pk.FixedHeader.Remaining = n
		body := make([]byte, n)
		if _, err := io.ReadFull(s.r, body); err != nil {
			return pk, err
		}
		switch pk.FixedHeader.Type {
		case packets.Disconnect:
			_ = pk.DisconnectDecode(body)
			return pk, fmt.Errorf("DISCONNECT 0x%02x", pk.ReasonCode)
		case typ:
			switch typ {
			case packets.Puback:
				err = pk.PubackDecode(body)
			case packets.Suback:
				err = pk.SubackDecode(body)
			}
			return pk, err
		}
	}
}

func (e *env) tryConnect(t *testing.T, r authzRole) (bool, string) {
	s, detail := e.dial(t, r)
	if s == nil {
		return false, detail
	}
	s.close()
	return true, detail
}

// tryPublish publishes payload at QoS 1 and reports whether obs received
// it. A PUBACK success that never reaches the subscriber fails the test.
func (e *env) tryPublish(t *testing.T, r authzRole, topic, payload string, obs *observer) (bool, string) {
	t.Helper()
	s, detail := e.dial(t, r)
	if s == nil {
		return false, detail
	}
	defer s.close()
	var buf bytes.Buffer
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 5,
		TopicName: topic, Payload: []byte(payload), PacketID: 7,
	}
	if err := pk.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := s.conn.Write(buf.Bytes()); err != nil {
		return false, "write: " + err.Error()
	}
	ack, err := s.await(packets.Puback)
	if err != nil {
		return false, "no PUBACK: " + err.Error()
	}
	if ack.ReasonCode >= 0x80 {
		return false, fmt.Sprintf("PUBACK 0x%02x", ack.ReasonCode)
	}
	if !obs.wait(payload, 10*time.Second) {
		t.Errorf("PUBACK 0x%02x for %s, but the subscriber never received it", ack.ReasonCode, topic)
		return false, "acknowledged, not delivered"
	}
	return true, fmt.Sprintf("PUBACK 0x%02x, delivered", ack.ReasonCode)
}

// trySubscribe subscribes to filter and reports whether the SUBACK granted it.
func (e *env) trySubscribe(t *testing.T, r authzRole, filter string) (bool, string) {
	t.Helper()
	s, detail := e.dial(t, r)
	if s == nil {
		return false, detail
	}
	defer s.close()
	var buf bytes.Buffer
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 5,
		PacketID: 9, Filters: packets.Subscriptions{{Filter: filter, Qos: 1}},
	}
	if err := pk.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := s.conn.Write(buf.Bytes()); err != nil {
		return false, "write: " + err.Error()
	}
	ack, err := s.await(packets.Suback)
	if err != nil {
		return false, "no SUBACK: " + err.Error()
	}
	if len(ack.ReasonCodes) != 1 {
		return false, fmt.Sprintf("SUBACK with %d codes", len(ack.ReasonCodes))
	}
	return ack.ReasonCodes[0] < 0x80, fmt.Sprintf("SUBACK 0x%02x", ack.ReasonCodes[0])
}

// observer is a paho subscriber that remembers every payload it received.
type observer struct {
	mu   sync.Mutex
	got  map[string]bool
	name string
}

func (e *env) observe(t *testing.T, clientID string, cert *tls.Certificate, filter string) *observer {
	t.Helper()
	o := &observer{got: map[string]bool{}, name: clientID}
	opts := paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID(clientID).
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{*cert}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetCleanSession(true).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("observer %s connect: %v", clientID, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(50) })
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) {
		o.mu.Lock()
		o.got[string(m.Payload())] = true
		o.mu.Unlock()
	})
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("observer %s subscribe: %v", clientID, tok.Error())
	}
	if st, ok := tok.(*paho.SubscribeToken); !ok || st.Result()[filter] >= 0x80 {
		t.Fatalf("observer %s: subscription to %s refused", clientID, filter)
	}
	return o
}

func (o *observer) seen(payload string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.got[payload]
}

func (o *observer) wait(payload string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for !o.seen(payload) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}
