package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sh runs an outside tool and returns its combined output and exit code.
func sh(t *testing.T, timeout time.Duration, name string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		}
		t.Fatalf("%s: %v", name, err)
	}
	return string(out), 0
}

// TestStandardTools drives the gateway with tools that are not ours:
// openssl and curl enroll over EST, mosquitto_pub and mosquitto_sub use the
// issued files, and the topic ACL holds against them.
func TestStandardTools(t *testing.T) {
	requireTool(t, "openssl", "curl", "mosquitto_pub", "mosquitto_sub")
	g := newGateway(t)
	g.start(t)
	work := t.TempDir()
	p := func(name string) string { return filepath.Join(work, name) }
	ca := g.layout().CABundle()
	estBase := g.estURL() + "/.well-known/est"

	// cacerts with curl + openssl.
	if out, code := sh(t, 30*time.Second, "sh", "-c",
		"curl -sSf --cacert "+ca+" "+estBase+"/cacerts | base64 -d | openssl pkcs7 -inform DER -print_certs"); code != 0 || !strings.Contains(out, "fleetgate issuing CA") {
		t.Fatalf("cacerts: exit %d\n%s", code, out)
	}

	// Enroll with openssl req + curl.
	const id = "sensor-tools"
	token := lastLine(g.prov(t, "token", "create", "--device-id", id))
	if out, code := sh(t, 30*time.Second, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", p("dev.key"), "-subj", "/CN="+id, "-outform", "DER", "-out", p("dev.csr")); code != 0 {
		t.Fatalf("openssl req: %s", out)
	}
	if out, code := sh(t, 30*time.Second, "sh", "-c",
		"base64 "+p("dev.csr")+" > "+p("dev.b64")+" && curl -sS --fail-with-body --cacert "+ca+" -u "+id+":"+token+
			" -H 'Content-Type: application/pkcs10' --data-binary @"+p("dev.b64")+" "+estBase+"/simpleenroll -o "+p("dev.p7")); code != 0 {
		t.Fatalf("curl simpleenroll: exit %d\n%s", code, out)
	}
	if out, code := sh(t, 30*time.Second, "sh", "-c",
		"base64 -d "+p("dev.p7")+" | openssl pkcs7 -inform DER -print_certs -out "+p("dev.crt")+" && openssl x509 -in "+p("dev.crt")+" -noout -subject -ext subjectAltName,extendedKeyUsage"); code != 0 ||
		!strings.Contains(out, "CN = "+id) || !strings.Contains(out, "spiffe://fleetgate.local/device/"+id) || !strings.Contains(out, "Client Authentication") {
		t.Fatalf("issued certificate: exit %d\n%s", code, out)
	}
	// The same token a second time: refused with a plain-text reason.
	if out, _ := sh(t, 30*time.Second, "sh", "-c",
		"curl -sS -o - -w ' %{http_code}' --cacert "+ca+" -u "+id+":"+token+" --data-binary @"+p("dev.b64")+" "+estBase+"/simpleenroll"); !strings.HasSuffix(out, " 401") || !strings.Contains(out, "already used") {
		t.Fatalf("reused token: %q", out)
	}
	// A PEM CSR from openssl is accepted too.
	token2 := lastLine(g.prov(t, "token", "create", "--device-id", "sensor-pem"))
	if out, code := sh(t, 30*time.Second, "sh", "-c",
		"openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "+p("pem.key")+" -subj /CN=sensor-pem 2>/dev/null | "+
			"curl -sSf --cacert "+ca+" -u sensor-pem:"+token2+" --data-binary @- "+estBase+"/simpleenroll | base64 -d | openssl pkcs7 -inform DER -print_certs"); code != 0 || !strings.Contains(out, "sensor-pem") {
		t.Fatalf("PEM CSR enrollment: exit %d\n%s", code, out)
	}

	// A service subscriber with mosquitto_sub; the device publishes with
	// mosquitto_pub and the files it got from openssl and curl.
	svc := t.TempDir()
	g.prov(t, "cert", "issue", "--role", "service", "--name", "backend", "--out", svc)
	mq := []string{"-h", "localhost", "-p", port(g.mqtt), "--cafile", ca}
	svcArgs := append(append([]string{}, mq...), "--cert", filepath.Join(svc, "backend.crt"), "--key", filepath.Join(svc, "backend.key"))
	devArgs := append(append([]string{}, mq...), "--cert", p("dev.crt"), "--key", p("dev.key"))

	subOut := p("sub.out")
	subCmd := exec.Command("mosquitto_sub", append(svcArgs, "-t", "devices/+/telemetry/#", "-v", "-W", "20")...)
	f, err := os.Create(subOut)
	if err != nil {
		t.Fatal(err)
	}
	subCmd.Stdout, subCmd.Stderr = f, f
	if err := subCmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = subCmd.Process.Kill(); _ = subCmd.Wait(); f.Close() })
	// Publish probes until the subscriber shows one: its subscription is live.
	waitFor(t, 15*time.Second, "service subscriber to receive a probe", func() bool {
		sh(t, 10*time.Second, "mosquitto_pub", append(devArgs, "-i", id, "-q", "1", "-t", "devices/"+id+"/telemetry/probe", "-m", "probe")...)
		got, _ := os.ReadFile(subOut)
		return strings.Contains(string(got), "devices/"+id+"/telemetry/probe probe")
	})

	// A device may not publish to another device's topic (the subscriber
	// would see it), nor subscribe to another device's commands or to #.
	out, _ := sh(t, 15*time.Second, "mosquitto_pub", append(devArgs, "-i", id, "-q", "1", "-t", "devices/sensor-other/telemetry", "-m", "forged")...)
	t.Logf("publish to another device's topic: %s", strings.TrimSpace(out))
	for _, filter := range []string{"#", "devices/+/commands", "devices/sensor-other/commands", "devices/#", "$SYS/#"} {
		out, _ := sh(t, 15*time.Second, "mosquitto_sub", append(devArgs, "-i", id, "-t", filter, "-C", "1", "-W", "2")...)
		if !strings.Contains(out, "denied") {
			t.Errorf("device subscription to %q not denied: %q", filter, out)
		}
	}
	// Its own commands topic is fine.
	if out, _ := sh(t, 15*time.Second, "mosquitto_sub", append(devArgs, "-i", id, "-t", "devices/"+id+"/commands/#", "-C", "1", "-W", "1")...); strings.Contains(out, "denied") {
		t.Errorf("device may not subscribe to its own commands: %q", out)
	}
	// Another client ID than the certificate's device ID is refused.
	if out, code := sh(t, 15*time.Second, "mosquitto_pub", append(devArgs, "-i", "sensor-other", "-t", "devices/sensor-other/telemetry", "-m", "x")...); code == 0 {
		t.Errorf("client ID of another device accepted: %q", out)
	}
	// No client certificate: refused in the handshake.
	if out, code := sh(t, 15*time.Second, "mosquitto_pub", append(append([]string{}, mq...), "-t", "devices/"+id+"/telemetry", "-m", "x")...); code == 0 {
		t.Errorf("connection without a client certificate accepted: %q", out)
	}
	_ = subCmd.Process.Kill()
	_ = subCmd.Wait()
	got, _ := os.ReadFile(subOut)
	if !strings.Contains(string(got), "devices/"+id+"/telemetry/probe probe") {
		t.Errorf("service subscriber missed the device's telemetry:\n%s", got)
	}
	if strings.Contains(string(got), "forged") {
		t.Errorf("a device published into another device's topic:\n%s", got)
	}

	// Revoke: the CRL, fetched with curl and read by openssl, lists the serial.
	serial := strings.TrimSpace(strings.TrimPrefix(mustRun(t, "openssl", "x509", "-in", p("dev.crt"), "-noout", "-serial"), "serial="))
	g.prov(t, "revoke", id, "--reason", "keyCompromise")
	crl, code := sh(t, 30*time.Second, "sh", "-c", "curl -sSf --cacert "+ca+" "+g.estURL()+"/crl | openssl crl -inform DER -noout -text")
	if code != 0 || !strings.Contains(strings.ToUpper(crl), strings.ToUpper(serial)) || !strings.Contains(crl, "Key Compromise") {
		t.Fatalf("CRL does not list %s as key compromise:\n%s", serial, crl)
	}
	if out, code := sh(t, 15*time.Second, "mosquitto_pub", append(devArgs, "-i", id, "-t", "devices/"+id+"/telemetry", "-m", "after revoke")...); code == 0 {
		t.Errorf("revoked device published: %q", out)
	}
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}
