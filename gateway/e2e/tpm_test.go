package e2e

import (
	"crypto"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/keystore/swtpmtest"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// TestAgentWithTPMKey runs the real agent with its key inside swtpm:
// enroll, publish, restart with the key reloaded from its blob, renew with
// a new TPM key, publish again.
func TestAgentWithTPMKey(t *testing.T) {
	sw := swtpmtest.Start(t)
	g := newGateway(t, "--device-cert-ttl", "1h")
	g.start(t)
	svcDir := t.TempDir()
	g.prov(t, "cert", "issue", "--role", "service", "--name", "backend", "--out", svcDir)
	sub := g.subscribe(t, filepath.Join(svcDir, "backend.crt"), filepath.Join(svcDir, "backend.key"), "backend-tpm",
		"devices/+/telemetry", "devices/+/state")

	const id = "pi-tpm-1"
	state := filepath.Join(t.TempDir(), "agent")
	args := func(cmd string, extra ...string) []string {
		return append(append([]string{cmd, "--key", "tpm", "--tpm", sw.Socket}, g.agentArgs(id, state)...), extra...)
	}
	token := lastLine(g.prov(t, "token", "create", "--device-id", id))
	out := run(t, "agent", args("enroll", "--token", token)...)
	if !strings.Contains(out, "enrolled "+id) {
		t.Fatalf("enroll printed %q", out)
	}
	pub1 := certPublicKey(t, state)
	blob, err := os.ReadFile(filepath.Join(state, "device.tpm"))
	if err != nil {
		t.Fatalf("no TPM key blob: %v", err)
	}
	if strings.Contains(string(blob), "PRIVATE KEY") {
		t.Fatal("the TPM blob holds a plain private key")
	}
	if _, err := os.Stat(filepath.Join(state, "device.key")); !os.IsNotExist(err) {
		t.Fatalf("a key file exists beside the TPM key (err %v)", err)
	}
	if st := run(t, "agent", args("status", "--json")...); !strings.Contains(st, `"key_store": "tpm"`) {
		t.Fatalf("status does not name the TPM key store:\n%s", st)
	}

	runOnce := func(what string) stateMsg {
		t.Helper()
		drain(sub)
		a := start(t, "agent", args("run", "--interval", "200ms")...)
		m := sub.await(t, 30*time.Second, what+": state", func(m mqttMsg) bool { return m.topic == "devices/"+id+"/state" })
		var st stateMsg
		if err := json.Unmarshal(m.payload, &st); err != nil {
			t.Fatal(err)
		}
		if st.KeyStore != "tpm" {
			t.Errorf("%s: state says key store %q", what, st.KeyStore)
		}
		sub.await(t, 10*time.Second, what+": telemetry", func(m mqttMsg) bool { return m.topic == "devices/"+id+"/telemetry" })
		a.stop(10 * time.Second)
		if code := a.wait(t, time.Second); code != 0 {
			t.Fatalf("%s: agent exit %d\n%s", what, code, a.output())
		}
		return st
	}
	first := runOnce("first run")
	// Restart: the key comes back from its blob, the same public key.
	again := runOnce("restart")
	if again.Serial != first.Serial || !pub1.Equal(certPublicKey(t, state)) {
		t.Fatal("identity changed across an agent restart")
	}

	// Renewal with a new key, made in the TPM too.
	out = run(t, "agent", args("renew")...)
	if !strings.Contains(out, "renewed "+id) {
		t.Fatalf("renew printed %q", out)
	}
	if pub2 := certPublicKey(t, state); pub2.Equal(pub1) {
		t.Fatal("renewal kept the old key")
	}
	if blob2, _ := os.ReadFile(filepath.Join(state, "device.tpm")); string(blob2) == string(blob) {
		t.Fatal("renewal did not replace the TPM key blob")
	}
	renewed := runOnce("after renewal")
	if renewed.Serial == first.Serial {
		t.Fatal("agent still uses the old certificate after renewal")
	}

	// No TPM at the path: one clear line and a failure exit.
	_, errOut, code := runCode(t, "agent", append([]string{"status", "--key", "tpm", "--tpm", filepath.Join(t.TempDir(), "tpmrm0")}, g.agentArgs(id, state)...)...)
	if code == 0 || !strings.Contains(errOut, "no TPM at") {
		t.Fatalf("missing TPM: exit %d, %q", code, errOut)
	}
}

type publicKey interface{ Equal(x crypto.PublicKey) bool }

func certPublicKey(t *testing.T, state string) publicKey {
	t.Helper()
	certs, err := pki.ReadCertsFile(filepath.Join(state, "device.crt"))
	if err != nil {
		t.Fatal(err)
	}
	return certs[0].PublicKey.(publicKey)
}
