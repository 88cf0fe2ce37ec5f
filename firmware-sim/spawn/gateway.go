// Package spawn starts the servers firmware-sim measures as child
// processes on free loopback ports: a fleetgate gateway in dev mode (which
// firmware-sim can restart under load) and, for the bench, Mosquitto
// configured to accept the same device certificates.
package spawn

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// GatewayConfig configures a spawned gateway.
type GatewayConfig struct {
	// Path of the gateway binary.
	Path string
	// DataDir of the gateway; created (dev mode) when it holds no CA.
	DataDir string
	// LogLevel of the gateway (default info).
	LogLevel string
	// Args are extra gateway flags.
	Args []string
}

// Gateway is a gateway process started by firmware-sim.
type Gateway struct {
	cfg GatewayConfig
	// Listen addresses, fixed across restarts.
	MQTT, EST, Admin, Metrics string
	// LogFile receives the gateway's output (appended across restarts).
	LogFile string
	proc    *Process
}

// StartGateway starts `PATH --dev --data-dir DIR` on free loopback ports
// and waits until it serves.
func StartGateway(ctx context.Context, cfg GatewayConfig) (*Gateway, error) {
	if cfg.Path == "" {
		return nil, errors.New("gateway binary path is empty")
	}
	path, err := exec.LookPath(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("gateway binary: %w", err)
	}
	cfg.Path = path
	if cfg.DataDir, err = filepath.Abs(cfg.DataDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("gateway data dir: %w", err)
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "info"
	}
	g := &Gateway{cfg: cfg, LogFile: filepath.Join(cfg.DataDir, "gateway.log")}
	for _, a := range []*string{&g.MQTT, &g.EST, &g.Admin, &g.Metrics} {
		if *a, err = FreeAddr(); err != nil {
			return nil, err
		}
	}
	if err := g.start(ctx); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *Gateway) args() []string {
	return append([]string{
		"--dev", "--data-dir", g.cfg.DataDir, "--hosts", "localhost,127.0.0.1",
		"--mqtt-listen", g.MQTT, "--est-listen", g.EST, "--admin-listen", g.Admin, "--metrics-listen", g.Metrics,
		"--log-format", "json", "--log-level", g.cfg.LogLevel,
	}, g.cfg.Args...)
}

func (g *Gateway) start(ctx context.Context) error {
	p, err := Start(g.cfg.Path, g.args(), g.LogFile)
	if err != nil {
		return err
	}
	g.proc = p
	if err := g.waitReady(ctx, 60*time.Second); err != nil {
		g.proc.Stop(5 * time.Second)
		return err
	}
	return nil
}

// waitReady waits until the EST listener answers /healthz and the MQTT
// listener accepts connections.
func (g *Gateway) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	l := pki.Layout{Dir: g.cfg.DataDir}
	var client *http.Client
	for time.Now().Before(deadline) {
		if g.proc.Exited() {
			return fmt.Errorf("gateway exited at start (%v); last log line: %s", g.proc.Err(), LastLine(g.LogFile))
		}
		if client == nil {
			if pool, err := pki.ReadPoolFile(l.CABundle()); err == nil {
				client = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
					TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "localhost"}, DisableKeepAlives: true,
				}}
			}
		}
		if client != nil {
			if resp, err := client.Get("https://" + g.EST + "/healthz"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					if c, err := net.DialTimeout("tcp", g.MQTT, time.Second); err == nil {
						c.Close()
						return nil
					}
				}
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("gateway not serving after %v; see %s", timeout, g.LogFile)
}

// PID is the gateway's process ID (it changes on restart).
func (g *Gateway) PID() int { return g.proc.PID() }

// DataDir is the gateway's data directory.
func (g *Gateway) DataDir() string { return g.cfg.DataDir }

// Target is where a fleet finds this gateway.
func (g *Gateway) Target() fleet.Target {
	return fleet.Target{
		ESTURL:   "https://" + g.EST,
		AdminURL: "https://" + g.Admin,
		MQTTAddr: g.MQTT,
		DataDir:  g.cfg.DataDir,
	}
}

// Stop stops the gateway with SIGTERM (SIGKILL after timeout).
func (g *Gateway) Stop(timeout time.Duration) error { return g.proc.Stop(timeout) }

// Restart stops the gateway and starts it again on the same ports and data
// directory. It returns when the new process serves, with how long the
// stop took and how long until it served again.
func (g *Gateway) Restart(ctx context.Context) (stopTook, startTook time.Duration, err error) {
	t0 := time.Now()
	if err := g.proc.Stop(30 * time.Second); err != nil {
		return time.Since(t0), 0, fmt.Errorf("stop gateway: %w", err)
	}
	stopTook = time.Since(t0)
	t1 := time.Now()
	// The listening ports are free again once the process has exited;
	// retry briefly in case the kernel still holds one.
	var last error
	for range 20 {
		if last = g.start(ctx); last == nil {
			return stopTook, time.Since(t1), nil
		}
		if ctx.Err() != nil || !strings.Contains(LastLine(g.LogFile), "address already in use") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return stopTook, time.Since(t1), fmt.Errorf("restart gateway: %w", last)
}

// Metric reads one counter or gauge (summed over its labels) from the
// gateway's /metrics.
func (g *Gateway) Metric(ctx context.Context, name string) (float64, error) {
	return ScrapeMetric(ctx, "http://"+g.Metrics+"/metrics", name)
}

// ScrapeMetric reads a Prometheus text endpoint and sums the samples of
// metric name.
func ScrapeMetric(ctx context.Context, url, name string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	var sum float64
	found := false
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			continue
		}
		sum += v
		found = true
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("scrape %s: %w", url, err)
	}
	if !found {
		return 0, fmt.Errorf("metric %s not found at %s", name, url)
	}
	return sum, nil
}

// FreeAddr returns a loopback address whose port is free at this moment.
func FreeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}
