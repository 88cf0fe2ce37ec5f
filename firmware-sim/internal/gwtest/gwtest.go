// Package gwtest runs a real fleetgate gateway (gateway/server) inside a
// test process, on 127.0.0.1:0 with real TLS and a bbolt registry in a
// temporary directory, for firmware-sim's tests. Only tests import it: the
// firmware-sim program talks to gateways over the network.
package gwtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Gateway is an in-process gateway.
type Gateway struct {
	t      testing.TB
	Layout pki.Layout
	cfg    server.Config

	mu  sync.Mutex
	srv *server.Server
}

// Start starts a gateway in dev mode in a temporary directory and stops it
// when the test ends.
func Start(t testing.TB) *Gateway {
	t.Helper()
	dir := t.TempDir()
	g := &Gateway{t: t, Layout: pki.Layout{Dir: dir}, cfg: server.Config{
		DataDir: dir, Dev: true, DevHosts: []string{"localhost", "127.0.0.1"},
		MQTTListen: "127.0.0.1:0", ESTListen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
	}}
	srv, err := g.start()
	if err != nil {
		t.Fatal(err)
	}
	// Restarts come back on the same ports.
	g.cfg.MQTTListen, g.cfg.ESTListen, g.cfg.AdminListen = srv.Addr("mqtt"), srv.Addr("est"), srv.Addr("admin")
	t.Cleanup(func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.srv != nil {
			g.srv.Close()
		}
	})
	return g
}

func (g *Gateway) start() (*server.Server, error) {
	srv, err := server.New(context.Background(), g.cfg, nil)
	if err != nil {
		return nil, err
	}
	if err := srv.Start(); err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.srv = srv
	g.mu.Unlock()
	return srv, nil
}

// Server is the running gateway.
func (g *Gateway) Server() *server.Server {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.srv
}

// MQTTAddr is the MQTT listener.
func (g *Gateway) MQTTAddr() string { return g.cfg.MQTTListen }

// Target is where a fleet finds the gateway.
func (g *Gateway) Target() fleet.Target {
	return fleet.Target{
		ESTURL:   "https://" + g.cfg.ESTListen,
		AdminURL: "https://" + g.cfg.AdminListen,
		MQTTAddr: g.cfg.MQTTListen,
		DataDir:  g.Layout.Dir,
	}
}

// PID is 0: an in-process gateway shares the test's process.
func (g *Gateway) PID() int { return 0 }

// Restart closes the gateway and starts a new one on the same ports and
// data directory.
func (g *Gateway) Restart(ctx context.Context) (time.Duration, time.Duration, error) {
	t0 := time.Now()
	g.mu.Lock()
	old := g.srv
	g.srv = nil
	g.mu.Unlock()
	if err := old.Close(); err != nil {
		return time.Since(t0), 0, err
	}
	stopped := time.Since(t0)
	t1 := time.Now()
	var err error
	for range 50 {
		if _, err = g.start(); err == nil {
			return stopped, time.Since(t1), nil
		}
		select {
		case <-ctx.Done():
			return stopped, time.Since(t1), ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return stopped, time.Since(t1), err
}

// Pool is the CA bundle devices trust.
func (g *Gateway) Pool() *x509.CertPool {
	g.t.Helper()
	p, err := pki.ReadPoolFile(g.Layout.CABundle())
	if err != nil {
		g.t.Fatal(err)
	}
	return p
}

// Cert issues a client certificate for a device or service identity
// straight from the gateway's CA (no EST).
func (g *Gateway) Cert(role identity.Role, name string) tls.Certificate {
	g.t.Helper()
	ca, err := pki.LoadIssuingCA(g.Layout)
	if err != nil {
		g.t.Fatal(err)
	}
	td, err := identity.TrustDomainOf(ca.Cert)
	if err != nil {
		g.t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		g.t.Fatal(err)
	}
	is := &pki.Issuer{CA: ca, TrustDomain: td, CRLURLs: []string{"https://localhost/crl"}}
	leaf, err := is.IssueIdentity(key.Public(), identity.Identity{TrustDomain: td, Role: role, Name: name}, time.Hour)
	if err != nil {
		g.t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{leaf.Raw, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}
}

// ClientTLS is a client configuration presenting cert and trusting the
// gateway.
func (g *Gateway) ClientTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{RootCAs: g.Pool(), ServerName: "localhost", Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
}
