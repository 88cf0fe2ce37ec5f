package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

// binDir holds the binaries built once for the whole package.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fleetgate-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	root, err := moduleRoot()
	if err == nil {
		cmd := exec.Command("go", "build", "-o", dir+"/", "./gateway", "./agent", "./provisioning")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, berr := cmd.CombinedOutput()
		if berr != nil {
			err = fmt.Errorf("build binaries: %v\n%s", berr, out)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", err
	}
	return filepath.Dir(strings.TrimSpace(string(out))), nil
}

func bin(name string) string { return filepath.Join(binDir, name) }

// requireTool skips (or, with FLEETGATE_REQUIRE_TOOLS=1, fails) when an
// outside tool is missing.
func requireTool(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			if os.Getenv("FLEETGATE_REQUIRE_TOOLS") == "1" {
				t.Fatalf("%s is not installed and FLEETGATE_REQUIRE_TOOLS=1", n)
			}
			t.Skipf("%s is not installed", n)
		}
	}
}

// freeAddr returns a loopback address with a port free at this moment.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// run executes a binary and returns stdout; it fails the test on a
// non-zero exit.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, errOut, code := runCode(t, name, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit %d\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// runCode executes a binary and returns stdout, stderr and the exit code.
func runCode(t *testing.T, name string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin(name), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%s: %v", name, err)
		}
		code = ee.ExitCode()
	}
	return stdout.String(), stderr.String(), code
}

// lastLine returns the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// proc is a background process with its output captured.
type proc struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  bytes.Buffer
	done chan struct{}
	err  error
}

func (p *proc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// start runs a binary in the background; it is killed at the end of the test.
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	p := &proc{done: make(chan struct{})}
	p.cmd = exec.Command(bin(name), args...)
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop(5 * time.Second)
		if t.Failed() {
			t.Logf("--- %s output ---\n%s", name, p.output())
		}
	})
	return p
}

// stop sends SIGTERM and waits, then kills.
func (p *proc) stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("process %s still running after %v\n%s", p.cmd.Path, timeout, p.output())
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("wait: %v", p.err)
	return -1
}

// gateway is a gateway process and its addresses.
type gateway struct {
	dir              string
	mqtt, est, admin string
	proc             *proc
	extra            []string
}

// newGateway initializes a data dir with the provisioning CLI.
func newGateway(t *testing.T, extra ...string) *gateway {
	t.Helper()
	g := &gateway{dir: filepath.Join(t.TempDir(), "gw"), mqtt: freeAddr(t), est: freeAddr(t), admin: freeAddr(t), extra: extra}
	run(t, "provisioning", "init", "--data-dir", g.dir, "--hosts", "localhost,127.0.0.1")
	return g
}

// start starts the gateway process and waits until it serves.
func (g *gateway) start(t *testing.T) {
	t.Helper()
	args := append([]string{"--data-dir", g.dir, "--mqtt-listen", g.mqtt, "--est-listen", g.est, "--admin-listen", g.admin, "--log-format", "json", "--log-level", "debug"}, g.extra...)
	g.proc = start(t, "gateway", args...)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.pool(t)}}, Timeout: time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-g.proc.done:
			t.Fatalf("gateway exited at start:\n%s", g.proc.output())
		default:
		}
		resp, err := client.Get("https://" + g.est + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("gateway not serving after 20s:\n%s", g.proc.output())
}

func (g *gateway) layout() pki.Layout { return pki.Layout{Dir: g.dir} }

func (g *gateway) pool(t *testing.T) *x509.CertPool {
	t.Helper()
	certs, err := pki.ReadCertsFile(g.layout().CABundle())
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func (g *gateway) estURL() string   { return "https://localhost:" + port(g.est) }
func (g *gateway) adminURL() string { return "https://localhost:" + port(g.admin) }
func (g *gateway) mqttAddr() string { return "localhost:" + port(g.mqtt) }

// prov runs the provisioning CLI against this gateway.
func (g *gateway) prov(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, "provisioning", append(args, "--data-dir", g.dir, "--gateway", g.adminURL())...)
}

// agentArgs are the flags an agent needs to reach this gateway.
func (g *gateway) agentArgs(id, stateDir string) []string {
	return []string{"--gateway", g.estURL(), "--mqtt", g.mqttAddr(), "--ca", g.layout().CABundle(), "--device-id", id, "--state-dir", stateDir, "--log-format", "text"}
}

// mqttMsg is one message a subscriber received.
type mqttMsg struct {
	topic   string
	payload []byte
	at      time.Time
}

// subscriber is a service MQTT client collecting messages.
type subscriber struct {
	client paho.Client
	msgs   chan mqttMsg
}

// subscribe connects with cert/key files (a service identity) and
// subscribes to filters.
func (g *gateway) subscribe(t *testing.T, certFile, keyFile, clientID string, filters ...string) *subscriber {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	s := &subscriber{msgs: make(chan mqttMsg, 10000)}
	opts := paho.NewClientOptions().AddBroker("ssl://" + g.mqttAddr()).SetClientID(clientID).
		SetTLSConfig(&tls.Config{RootCAs: g.pool(t), Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).SetCleanSession(true)
	s.client = paho.NewClient(opts)
	if tok := s.client.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscriber connect: %v", tok.Error())
	}
	t.Cleanup(func() { s.client.Disconnect(100) })
	subs := map[string]byte{}
	for _, f := range filters {
		subs[f] = 1
	}
	tok := s.client.SubscribeMultiple(subs, func(_ paho.Client, m paho.Message) {
		s.msgs <- mqttMsg{topic: m.Topic(), payload: append([]byte(nil), m.Payload()...), at: time.Now()}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	return s
}

// await returns the first message for which match is true.
func (s *subscriber) await(t *testing.T, timeout time.Duration, what string, match func(mqttMsg) bool) mqttMsg {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m := <-s.msgs:
			if match(m) {
				return m
			}
		case <-deadline:
			t.Fatalf("no %s within %v", what, timeout)
		}
	}
}
