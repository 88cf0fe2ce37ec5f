package spawn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

// MosquittoConfig configures a spawned Mosquitto.
type MosquittoConfig struct {
	// Path of the mosquitto binary (default: found in PATH or /usr/sbin).
	Path string
	// Gateway is the data directory of the fleetgate gateway whose CA
	// and server certificate Mosquitto uses, so the same device
	// certificates work on both.
	Gateway pki.Layout
	// Dir receives the configuration and copies of the certificates.
	Dir string
	// MaxQueued is max_queued_messages (large, so QoS 1 is not dropped).
	MaxQueued int
}

// Mosquitto is a Mosquitto process started by firmware-sim.
type Mosquitto struct {
	Addr    string
	Config  string
	LogFile string
	Version string
	proc    *Process
}

// FindMosquitto returns the path of the mosquitto binary, or an error
// saying it is not installed.
func FindMosquitto(path string) (string, error) {
	if path != "" {
		return exec.LookPath(path)
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/mosquitto"); err == nil {
		return "/usr/sbin/mosquitto", nil
	}
	return "", errors.New("mosquitto is not installed (Debian: apt-get install -y mosquitto)")
}

// MosquittoConf renders the configuration: mutual TLS on one loopback
// listener with the gateway's issuing CA and server certificate, the
// client certificate's CN as user name, TCP_NODELAY (without it each
// connect stalls ~40 ms on delayed ACKs) and a deep queue for QoS 1.
// Connection logging is off, as the gateway logs no line per connect.
func MosquittoConf(port int, dir string, maxQueued int) string {
	return strings.Join([]string{
		"# written by firmware-sim bench",
		"per_listener_settings false",
		"allow_anonymous false",
		fmt.Sprintf("listener %d 127.0.0.1", port),
		"cafile " + filepath.Join(dir, "ca.pem"),
		"certfile " + filepath.Join(dir, "server.crt"),
		"keyfile " + filepath.Join(dir, "server.key"),
		"require_certificate true",
		"use_identity_as_username true",
		"set_tcp_nodelay true",
		fmt.Sprintf("max_queued_messages %d", maxQueued),
		"persistence false",
		"connection_messages false",
		"log_dest stderr",
		"log_type error",
		"log_type warning",
		"",
	}, "\n")
}

// StartMosquitto writes the configuration and certificates into cfg.Dir
// (readable by the mosquitto user, which Mosquitto drops to when started
// as root), starts `mosquitto -c FILE` and waits until it accepts
// connections.
func StartMosquitto(ctx context.Context, cfg MosquittoConfig) (*Mosquitto, error) {
	path, err := FindMosquitto(cfg.Path)
	if err != nil {
		return nil, err
	}
	if cfg.MaxQueued <= 0 {
		cfg.MaxQueued = 1_000_000
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("mosquitto dir: %w", err)
	}
	if err := os.Chmod(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("mosquitto dir: %w", err)
	}
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		if u, err := user.Lookup("mosquitto"); err == nil {
			uid, _ = strconv.Atoi(u.Uid)
			gid, _ = strconv.Atoi(u.Gid)
		}
	}
	// The issuing CA alone is not a trust anchor to OpenSSL (it is not
	// self-signed): give it the whole bundle, issuing CA and root.
	files := []struct {
		src, name string
		secret    bool
	}{
		{cfg.Gateway.CABundle(), "ca.pem", false},
		{cfg.Gateway.ServerCert(), "server.crt", false},
		{cfg.Gateway.ServerKey(), "server.key", true},
	}
	for _, f := range files {
		data, err := os.ReadFile(f.src)
		if err != nil {
			return nil, fmt.Errorf("mosquitto: %w", err)
		}
		dst := filepath.Join(cfg.Dir, f.name)
		mode := os.FileMode(0o644)
		if f.secret && uid >= 0 {
			mode = 0o600
		}
		if err := os.WriteFile(dst, data, mode); err != nil {
			return nil, fmt.Errorf("mosquitto: %w", err)
		}
		if err := os.Chmod(dst, mode); err != nil {
			return nil, fmt.Errorf("mosquitto: %w", err)
		}
		if f.secret && uid >= 0 {
			if err := os.Chown(dst, uid, gid); err != nil {
				return nil, fmt.Errorf("mosquitto: give the key to the mosquitto user: %w", err)
			}
		}
	}
	addr, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	_, portStr, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	m := &Mosquitto{Addr: addr, Config: filepath.Join(cfg.Dir, "mosquitto.conf"), LogFile: filepath.Join(cfg.Dir, "mosquitto.log")}
	if err := os.WriteFile(m.Config, []byte(MosquittoConf(port, cfg.Dir, cfg.MaxQueued)), 0o644); err != nil {
		return nil, fmt.Errorf("mosquitto config: %w", err)
	}
	if out, err := exec.Command(path, "-h").CombinedOutput(); len(out) > 0 {
		_ = err // mosquitto -h exits non-zero after printing its version
		m.Version = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	if m.proc, err = Start(path, []string{"-c", m.Config}, m.LogFile); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if m.proc.Exited() {
			return nil, fmt.Errorf("mosquitto exited at start (%v); last log line: %s", m.proc.Err(), LastLine(m.LogFile))
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			// It binds the port before it reads the certificates (as the
			// mosquitto user): make sure it is still up.
			time.Sleep(300 * time.Millisecond)
			if m.proc.Exited() {
				return nil, fmt.Errorf("mosquitto exited at start (%v); last log line: %s", m.proc.Err(), LastLine(m.LogFile))
			}
			return m, nil
		}
		if time.Now().After(deadline) {
			m.proc.Stop(5 * time.Second)
			return nil, fmt.Errorf("mosquitto not listening on %s after 15s; see %s", addr, m.LogFile)
		}
		select {
		case <-ctx.Done():
			m.proc.Stop(5 * time.Second)
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// PID is Mosquitto's process ID.
func (m *Mosquitto) PID() int { return m.proc.PID() }

// Stop stops Mosquitto.
func (m *Mosquitto) Stop() error { return m.proc.Stop(10 * time.Second) }
