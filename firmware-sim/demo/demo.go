// Package demo is the guided tour of fleetgate on one machine: a dev
// gateway, a few real agents, a backend service reading their telemetry,
// and a revocation that cuts one device off.
package demo

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/firmware-sim/spawn"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Config configures the demo.
type Config struct {
	Devices int
	Watch   time.Duration
	BinDir  string
	DataDir string
}

type demo struct {
	cfg   Config
	out   io.Writer
	dir   string
	mqtt  string
	est   string
	admin string
	procs []*spawn.Process
}

// Run plays the demo, printing what happens to out.
func Run(ctx context.Context, cfg Config, out io.Writer) error {
	if cfg.Devices < 2 {
		cfg.Devices = 2
	}
	for _, b := range []string{"gateway", "agent"} {
		if _, err := os.Stat(filepath.Join(cfg.BinDir, b)); err != nil {
			return fmt.Errorf("%s binary not found in %s (run 'make build' first, or pass --bin-dir)", b, cfg.BinDir)
		}
	}
	d := &demo{cfg: cfg, out: out}
	defer d.stopAll()
	if cfg.DataDir == "" {
		dir, err := os.MkdirTemp("", "fleetgate-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		d.dir = dir
	} else {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return err
		}
		d.dir = cfg.DataDir
	}
	return d.play(ctx)
}

func (d *demo) step(n int, format string, args ...any) {
	fmt.Fprintf(d.out, "\n[%d/6] %s\n", n, fmt.Sprintf(format, args...))
}

func (d *demo) say(format string, args ...any) {
	fmt.Fprintf(d.out, "      %s\n", fmt.Sprintf(format, args...))
}

func (d *demo) play(ctx context.Context) error {
	var err error
	if d.mqtt, err = spawn.FreeAddr(); err != nil {
		return err
	}
	if d.est, err = spawn.FreeAddr(); err != nil {
		return err
	}
	if d.admin, err = spawn.FreeAddr(); err != nil {
		return err
	}
	gwDir := filepath.Join(d.dir, "gateway")

	d.step(1, "starting a gateway in dev mode (it makes its own CA on first start)")
	gw, err := d.start("gateway", filepath.Join(d.dir, "gateway.log"), "--dev", "--data-dir", gwDir,
		"--hosts", "localhost,127.0.0.1", "--mqtt-listen", d.mqtt, "--est-listen", d.est, "--admin-listen", d.admin, "--log-format", "text")
	if err != nil {
		return err
	}
	if err := d.waitHealthy(ctx, gw, pki.Layout{Dir: gwDir}); err != nil {
		return err
	}
	d.say("MQTT over mutual TLS  %s", d.mqtt)
	d.say("EST enrollment + CRL  https://%s/.well-known/est/", d.est)
	d.say("admin API             https://%s (operator certificate %s)", d.admin, pki.Layout{Dir: gwDir}.OperatorCert())

	layout := pki.Layout{Dir: gwDir}
	tlsConf, err := adminapi.OperatorTLS(layout)
	if err != nil {
		return err
	}
	tlsConf.ServerName = "localhost"
	admin := adminapi.NewClient("https://"+d.admin, tlsConf)

	d.step(2, "issuing a certificate for a backend service and subscribing to every device's telemetry")
	svc, err := d.serviceCert(ctx, admin)
	if err != nil {
		return err
	}
	watcher, err := newWatcher(layout, svc, "localhost:"+portOf(d.mqtt))
	if err != nil {
		return err
	}
	defer watcher.close()
	d.say("service 'demo-backend' subscribed to devices/+/telemetry and devices/+/presence")

	d.step(3, "minting one-time tokens and starting %d agents, each with its own key", d.cfg.Devices)
	ids := make([]string, d.cfg.Devices)
	for i := range ids {
		ids[i] = fmt.Sprintf("demo-sensor-%d", i+1)
	}
	toks, err := admin.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: ids, TTL: "1h", Batch: "demo"})
	if err != nil {
		return err
	}
	agents := map[string]*spawn.Process{}
	for _, tk := range toks.Tokens {
		p, err := d.start("agent", filepath.Join(d.dir, tk.DeviceID+".log"), "run",
			"--gateway", "https://localhost:"+portOf(d.est), "--mqtt", "localhost:"+portOf(d.mqtt),
			"--ca", layout.CABundle(), "--device-id", tk.DeviceID, "--token", tk.Token,
			"--state-dir", filepath.Join(d.dir, tk.DeviceID), "--interval", "1s", "--log-format", "text")
		if err != nil {
			return err
		}
		agents[tk.DeviceID] = p
		d.say("%s: token %s…, agent started", tk.DeviceID, tk.Token[:8])
	}

	d.step(4, "telemetry arriving at the service over mutually authenticated MQTT")
	seen := watcher.show(ctx, d.out, d.cfg.Watch)
	for _, id := range ids {
		if seen[id] == 0 {
			return fmt.Errorf("no telemetry from %s; see %s", id, filepath.Join(d.dir, id+".log"))
		}
	}
	devs, err := admin.Devices(ctx, "", "", "", 0)
	if err != nil {
		return err
	}
	for _, dv := range devs.Devices {
		d.say("registry: %-14s %-7s connected=%-5v cert until %s", dv.ID, dv.Status, dv.Connected, dv.CertNotAfter.Format(time.RFC3339))
	}

	victim := ids[1]
	d.step(5, "revoking %s as stolen (keyCompromise)", victim)
	start := time.Now()
	res, err := admin.Revoke(ctx, victim, "keyCompromise")
	if err != nil {
		return err
	}
	d.say("gateway: %d certificate(s) revoked, live session closed=%v, CRL #%d", len(res.RevokedSerials), res.Disconnected, res.CRLNumber)
	if at, ok := watcher.awaitOffline(victim, 10*time.Second); ok {
		d.say("service saw %s go offline %v after the revoke request", victim, at.Sub(start).Round(100*time.Microsecond))
	} else {
		return fmt.Errorf("%s did not go offline after revocation", victim)
	}
	code, ok := agents[victim].Wait(30 * time.Second)
	if !ok {
		return fmt.Errorf("revoked agent %s still running 30s after the revocation", victim)
	}
	d.say("agent %s exited with code %d: %s", victim, code, spawn.LastLine(agents[victim].Log))
	if code != 3 {
		return fmt.Errorf("revoked agent exited with %d, want 3", code)
	}

	d.step(6, "the other devices keep publishing; the revoked one is cut off")
	seen = watcher.show(ctx, d.out, d.cfg.Watch)
	if seen[victim] != 0 {
		return fmt.Errorf("telemetry from revoked %s still arrives", victim)
	}
	for _, id := range ids {
		if id != victim && seen[id] == 0 {
			return fmt.Errorf("no telemetry from %s after the revocation", id)
		}
	}
	d.say("done: %d devices enrolled, %s revoked and refused; stopping everything", len(ids), victim)
	fmt.Fprintln(d.out)
	return nil
}

func (d *demo) serviceCert(ctx context.Context, admin *adminapi.Client) (tls.Certificate, error) {
	key, err := pki.GenerateKey(pki.P256)
	if err != nil {
		return tls.Certificate{}, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "demo-backend"}}, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	resp, err := admin.IssueCertificate(ctx, adminapi.CertificateRequest{
		Role: "service", Name: "demo-backend", CSR: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr})),
	})
	if err != nil {
		return tls.Certificate{}, err
	}
	keyPEM, err := pki.MarshalKeyPEM(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.X509KeyPair([]byte(resp.Chain), keyPEM)
}

func (d *demo) waitHealthy(ctx context.Context, gw *spawn.Process, l pki.Layout) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if gw.Exited() {
			return fmt.Errorf("gateway exited at start; see %s", gw.Log)
		}
		if pool, err := pki.ReadPoolFile(l.CABundle()); err == nil {
			c := &http.Client{Timeout: time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "localhost"}}}
			if resp, err := c.Get("https://" + d.est + "/healthz"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("gateway not serving after 30s; see %s", gw.Log)
}

// start starts one of the binaries with a fresh log file.
func (d *demo) start(name, logFile string, args ...string) (*spawn.Process, error) {
	if err := os.Remove(logFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	p, err := spawn.Start(filepath.Join(d.cfg.BinDir, name), args, logFile)
	if err != nil {
		return nil, err
	}
	d.procs = append(d.procs, p)
	return p, nil
}

// stopAll stops agents first, then the gateway, each with SIGTERM.
func (d *demo) stopAll() {
	for i := len(d.procs) - 1; i >= 0; i-- {
		_ = d.procs[i].Stop(10 * time.Second)
	}
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// watcher is the backend service: an MQTT client holding a service
// certificate, subscribed to telemetry and presence.
type watcher struct {
	client paho.Client
	mu     sync.Mutex
	msgs   []paho.Message
	wake   chan struct{}
}

func newWatcher(l pki.Layout, cert tls.Certificate, broker string) (*watcher, error) {
	pool, err := pki.ReadPoolFile(l.CABundle())
	if err != nil {
		return nil, err
	}
	w := &watcher{wake: make(chan struct{}, 1)}
	opts := paho.NewClientOptions().AddBroker("ssl://" + broker).SetClientID("demo").
		SetTLSConfig(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second)
	w.client = paho.NewClient(opts)
	if tok := w.client.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("service connect: %v", tok.Error())
	}
	tok := w.client.SubscribeMultiple(map[string]byte{"devices/+/telemetry": 1, "devices/+/presence": 1}, func(_ paho.Client, m paho.Message) {
		w.mu.Lock()
		w.msgs = append(w.msgs, m)
		w.mu.Unlock()
		select {
		case w.wake <- struct{}{}:
		default:
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("service subscribe: %v", tok.Error())
	}
	return w, nil
}

func (w *watcher) close() { w.client.Disconnect(100) }

func (w *watcher) take() []paho.Message {
	w.mu.Lock()
	defer w.mu.Unlock()
	m := w.msgs
	w.msgs = nil
	return m
}

// show prints telemetry for a while and returns messages per device.
func (w *watcher) show(ctx context.Context, out io.Writer, d time.Duration) map[string]int {
	w.take()
	seen := map[string]int{}
	end := time.After(d)
	for {
		select {
		case <-ctx.Done():
			return seen
		case <-end:
			return seen
		case <-w.wake:
		}
		for _, m := range w.take() {
			parts := strings.Split(m.Topic(), "/")
			if len(parts) < 3 || parts[2] != "telemetry" {
				continue
			}
			var msg struct {
				Seq    uint64 `json:"seq"`
				System struct {
					Load1   *float64 `json:"load1"`
					MemAvKB *uint64  `json:"mem_available_kb"`
					TempC   *float64 `json:"cpu_temp_c"`
				} `json:"system"`
			}
			_ = json.Unmarshal(m.Payload(), &msg)
			seen[parts[1]]++
			var fields []string
			if msg.System.Load1 != nil {
				fields = append(fields, fmt.Sprintf("load1=%.2f", *msg.System.Load1))
			}
			if msg.System.MemAvKB != nil {
				fields = append(fields, fmt.Sprintf("mem_free=%dMiB", *msg.System.MemAvKB/1024))
			}
			if msg.System.TempC != nil {
				fields = append(fields, fmt.Sprintf("cpu=%.1f°C", *msg.System.TempC))
			}
			sort.Strings(fields)
			fmt.Fprintf(out, "      %s  %-14s seq=%-3d %s\n", time.Now().Format("15:04:05"), parts[1], msg.Seq, strings.Join(fields, " "))
		}
	}
}

// awaitOffline waits for an offline presence message of id.
func (w *watcher) awaitOffline(id string, timeout time.Duration) (time.Time, bool) {
	end := time.After(timeout)
	for {
		for _, m := range w.take() {
			if m.Topic() == "devices/"+id+"/presence" && strings.Contains(string(m.Payload()), `"offline"`) {
				return time.Now(), true
			}
		}
		select {
		case <-w.wake:
		case <-end:
			return time.Time{}, false
		}
	}
}
