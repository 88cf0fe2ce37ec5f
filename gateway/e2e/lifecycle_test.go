package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

type telemetryMsg struct {
	DeviceID string `json:"device_id"`
	Seq      uint64 `json:"seq"`
}

type stateMsg struct {
	Serial   string `json:"serial"`
	KeyStore string `json:"key_store"`
}

type presenceMsg struct {
	State string `json:"state"`
}

// TestDeviceLifecycle walks one device through its whole life with the real
// binaries: init → token → enroll → telemetry received by a service →
// renewal → revoke → live session closed and reconnect refused → gateway
// restart → still refused, and the CRL lists the serial.
func TestDeviceLifecycle(t *testing.T) {
	g := newGateway(t, "--device-cert-ttl", "1m")
	g.start(t)

	svcDir := t.TempDir()
	g.prov(t, "cert", "issue", "--role", "service", "--name", "backend", "--out", svcDir)
	sub := g.subscribe(t, filepath.Join(svcDir, "backend.crt"), filepath.Join(svcDir, "backend.key"), "backend-1",
		"devices/+/telemetry", "devices/+/state", "devices/+/presence")

	const id = "sensor-0042"
	token := lastLine(g.prov(t, "token", "create", "--device-id", id))
	if len(token) < 22 || strings.ContainsAny(token, " \t") {
		t.Fatalf("token create printed %q as its last line", token)
	}
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stateDir := filepath.Join(t.TempDir(), "agent")
	// --renew-at 0.15 of a one-minute certificate: the agent renews within
	// about ten seconds of enrolling.
	agent := start(t, "agent", append([]string{"run", "--token-file", tokenFile, "--interval", "200ms", "--renew-at", "0.15"}, g.agentArgs(id, stateDir)...)...)

	first := sub.await(t, 30*time.Second, "first state message", func(m mqttMsg) bool { return m.topic == "devices/"+id+"/state" })
	var st1 stateMsg
	if err := json.Unmarshal(first.payload, &st1); err != nil || st1.Serial == "" {
		t.Fatalf("state payload %s: %v", first.payload, err)
	}
	tm := sub.await(t, 10*time.Second, "telemetry", func(m mqttMsg) bool { return m.topic == "devices/"+id+"/telemetry" })
	var tel telemetryMsg
	if err := json.Unmarshal(tm.payload, &tel); err != nil || tel.DeviceID != id || tel.Seq == 0 {
		t.Fatalf("telemetry payload %s: %v", tm.payload, err)
	}
	if _, err := os.Stat(tokenFile); !os.IsNotExist(err) {
		t.Errorf("spent token file still exists (err %v)", err)
	}
	keyInfo, err := os.Stat(filepath.Join(stateDir, "device.key"))
	if err != nil {
		t.Fatal(err)
	}
	if keyInfo.Mode().Perm() != 0o600 {
		t.Errorf("device key mode %v, want 0600", keyInfo.Mode().Perm())
	}

	// Renewal: the agent reconnects with a new certificate and says so in
	// its retained state.
	renewed := sub.await(t, 40*time.Second, "state after renewal", func(m mqttMsg) bool {
		var st stateMsg
		return m.topic == "devices/"+id+"/state" && json.Unmarshal(m.payload, &st) == nil && st.Serial != st1.Serial
	})
	var st2 stateMsg
	_ = json.Unmarshal(renewed.payload, &st2)
	sub.await(t, 10*time.Second, "telemetry after renewal", func(m mqttMsg) bool { return m.topic == "devices/"+id+"/telemetry" })
	var detail struct {
		Status        string `json:"status"`
		CurrentSerial string `json:"current_serial"`
		Certificates  []struct {
			Serial string `json:"serial"`
		} `json:"certificates"`
	}
	if err := json.Unmarshal([]byte(g.prov(t, "devices", "show", id, "--json")), &detail); err != nil {
		t.Fatal(err)
	}
	if detail.Status != "active" || len(detail.Certificates) < 2 || detail.CurrentSerial == st1.Serial {
		t.Fatalf("after renewal the registry shows %+v", detail)
	}
	disk, err := pki.ReadCertsFile(filepath.Join(stateDir, "device.crt"))
	if err != nil {
		t.Fatal(err)
	}

	// Snapshot the certificate files now: the agent keeps renewing, and the
	// test reconnects with exactly these.
	certPEM, _ := os.ReadFile(filepath.Join(stateDir, "device.crt"))
	keyPEM, _ := os.ReadFile(filepath.Join(stateDir, "device.key"))

	// Revoke while the device publishes; its session must close at once.
	drain(sub)
	revokedAt := time.Now()
	out := g.prov(t, "revoke", id, "--reason", "keyCompromise")
	if !strings.Contains(out, "revoked") {
		t.Errorf("revoke printed %q", out)
	}
	off := sub.await(t, 10*time.Second, "offline presence", func(m mqttMsg) bool {
		var p presenceMsg
		return m.topic == "devices/"+id+"/presence" && json.Unmarshal(m.payload, &p) == nil && p.State == "offline"
	})
	t.Logf("revoke command → offline presence at the subscriber: %v (includes the CLI process start)", off.at.Sub(revokedAt))

	// The agent finds itself revoked and stops with exit code 3.
	if code := agent.wait(t, 30*time.Second); code != 3 {
		t.Fatalf("agent exit code %d, want 3 (revoked)\n%s", code, agent.output())
	}
	if !strings.Contains(agent.output(), "revoked") {
		t.Errorf("agent did not say it was revoked:\n%s", agent.output())
	}

	// A reconnect with the revoked certificate is refused.
	revokedCert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if err := tryConnect(t, g, id, revokedCert); err == nil {
		t.Fatal("revoked certificate connected")
	}

	// Restart the gateway (SIGTERM: a graceful stop, exit 0): the
	// revocation survives.
	g.proc.stop(10 * time.Second)
	if code := g.proc.wait(t, time.Second); code != 0 {
		t.Fatalf("gateway exit code %d after SIGTERM", code)
	}
	g.start(t)
	if err := tryConnect(t, g, id, revokedCert); err == nil {
		t.Fatal("revoked certificate connected after a gateway restart")
	}
	crl, err := est.NewClient(g.estURL(), g.pool(t), nil).CRL(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		listed[e.SerialNumber.Text(16)] = true
	}
	if !listed[pki.SerialHex(disk[0])] || !listed[st2.Serial] {
		t.Fatalf("CRL #%v lists %v; want the device's serials %s and %s", crl.Number, listed, pki.SerialHex(disk[0]), st2.Serial)
	}
	if err := crl.CheckSignatureFrom(g.issuing(t)); err != nil {
		t.Fatalf("CRL signature: %v", err)
	}
	// No new token for a revoked device.
	if _, errOut, code := runCode(t, "provisioning", "token", "create", "--device-id", id, "--data-dir", g.dir, "--gateway", g.adminURL()); code == 0 || !strings.Contains(errOut, "revoked") {
		t.Fatalf("token for a revoked device: exit %d, %s", code, errOut)
	}
}

func (g *gateway) issuing(t *testing.T) *x509.Certificate {
	t.Helper()
	certs, err := pki.ReadCertsFile(g.layout().IssuingCert())
	if err != nil {
		t.Fatal(err)
	}
	return certs[0]
}

// tryConnect makes one MQTT connection attempt with cert.
func tryConnect(t *testing.T, g *gateway, clientID string, cert tls.Certificate) error {
	t.Helper()
	opts := paho.NewClientOptions().AddBroker("ssl://" + g.mqttAddr()).SetClientID(clientID).
		SetTLSConfig(&tls.Config{RootCAs: g.pool(t), Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return err
	}
	// TLS 1.3 reports a refused client certificate only after the handshake:
	// make sure the session really works by a round trip.
	ptok := c.Publish("devices/"+clientID+"/telemetry", 1, false, []byte("probe"))
	ok := ptok.WaitTimeout(5*time.Second) && ptok.Error() == nil
	c.Disconnect(100)
	if !ok {
		return errors.New("session did not carry a publish")
	}
	return nil
}

func drain(s *subscriber) {
	for {
		select {
		case <-s.msgs:
		default:
			return
		}
	}
}
