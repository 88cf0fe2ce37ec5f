// Package server assembles the gateway: registry, certificate authority,
// MQTT broker, EST service and admin API, each on its own listener, and
// runs them until the context ends.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fleetgate/fleetgate/gateway/admin"
	"github.com/fleetgate/fleetgate/gateway/authority"
	"github.com/fleetgate/fleetgate/gateway/broker"
	gwest "github.com/fleetgate/fleetgate/gateway/est"
	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/metrics"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/registry"
	"github.com/fleetgate/fleetgate/pkg/registry/boltdb"
)

// Config is the gateway's configuration.
type Config struct {
	// DataDir holds the CA, the server certificate and the registry.
	DataDir string
	// Listen addresses. MetricsListen is optional: plain-HTTP /metrics
	// for a local scraper (keep it on loopback).
	MQTTListen    string
	ESTListen     string
	AdminListen   string
	MetricsListen string
	// Pprof also serves Go's profiler under /debug/pprof/ on
	// MetricsListen, for measuring a running gateway.
	Pprof bool
	// Dev initializes DataDir on first start (CA, server and operator
	// certificates for DevHosts) so a newcomer can run the gateway at once.
	Dev      bool
	DevHosts []string
	// DeviceTTL is the lifetime of device certificates.
	DeviceTTL time.Duration
	// TokenTTL is the default lifetime of enrollment tokens.
	TokenTTL time.Duration
	// CRLValidity is the nextUpdate distance of each CRL.
	CRLValidity time.Duration
	// CRLURL is written into issued certificates as their CRL distribution
	// point. Default: https://<first server name>:<EST port>/crl.
	CRLURL string
	// ConnectTimeout bounds an MQTT client's TLS handshake and CONNECT.
	ConnectTimeout time.Duration
	// SeenFlushInterval is how often last-seen times reach the registry.
	SeenFlushInterval time.Duration
	// ReadHeaderTimeout bounds the TLS handshake and the request headers,
	// ReadTimeout the whole request, on the EST and admin listeners
	// (defaults 10s and 30s): a client trickling bytes is cut off.
	ReadHeaderTimeout time.Duration
	ReadTimeout       time.Duration
	// MQTTMaxInflight is each MQTT session's store of unacknowledged QoS
	// 1 messages (8192 when 0); device publishes wait while a service
	// subscriber's store is half full.
	MQTTMaxInflight uint16
	// Limits bounds what one source address, session or device ID may ask
	// of the gateway.
	Limits Limits
	// WrapStore, when set, wraps the registry before anything uses it. It
	// is a seam for tests that inject storage faults (a fake that wraps the
	// real store); production leaves it nil.
	WrapStore func(registry.Store) registry.Store
}

// Limits are the gateway's abuse limits. Zero fields take the defaults
// (filled by SetDefaults); limit.Off turns a rate off, a negative
// MaxPayload or LockoutFailures turns that limit off.
// Sources are TCP peer addresses (IPv6 by /64): behind a TCP load balancer
// without the PROXY protocol every client shares one address, so raise or
// turn off the per-source limits there.
type Limits struct {
	// EnrollRate: EST simpleenroll and simplereenroll requests per source;
	// ESTReadRate: other EST requests (cacerts, csrattrs, CRL) per source.
	// Over them: 429 with Retry-After. Connections to the EST listener
	// beyond the two together are closed before the TLS handshake.
	// Turning either off also lifts the per-source cap on handshakes in
	// flight (a quarter of MaxHandshakes) on the EST listener, as turning
	// MQTTConnectRate off does on the MQTT one.
	EnrollRate  limit.Rate
	ESTReadRate limit.Rate
	// MQTTConnectRate: new MQTT connections per source, closed before the
	// TLS handshake when over it.
	MQTTConnectRate limit.Rate
	// MaxHandshakes bounds the TLS handshakes in flight on each listener.
	MaxHandshakes int
	// PublishRate: publishes per device session; over it the session's
	// reader is paced (delayed, nothing dropped).
	PublishRate limit.Rate
	// MaxPayload bounds a device PUBLISH payload in bytes.
	MaxPayload int
	// LockoutFailures bad enrollment tokens for one device ID within
	// LockoutWindow lock the ID out for LockoutWindow.
	LockoutFailures int
	LockoutWindow   time.Duration
}

// setDefaults fills zero fields.
func (l *Limits) setDefaults() {
	l.EnrollRate = l.EnrollRate.Or(gwest.DefaultEnrollRate)
	l.ESTReadRate = l.ESTReadRate.Or(gwest.DefaultReadRate)
	l.MQTTConnectRate = l.MQTTConnectRate.Or(broker.DefaultConnectRate)
	l.PublishRate = l.PublishRate.Or(broker.DefaultPublishRate)
	if l.MaxHandshakes == 0 {
		l.MaxHandshakes = limit.DefaultMaxHandshakes
	}
	if l.MaxPayload == 0 {
		l.MaxPayload = broker.DefaultMaxPayload
	}
	if l.LockoutFailures == 0 {
		l.LockoutFailures = authority.DefaultLockoutFailures
	}
	if l.LockoutWindow == 0 {
		l.LockoutWindow = authority.DefaultLockoutWindow
	}
}

func (l *Limits) validate() error {
	for name, r := range map[string]limit.Rate{
		"--est-enroll-rate": l.EnrollRate, "--est-read-rate": l.ESTReadRate,
		"--mqtt-connect-rate": l.MQTTConnectRate, "--mqtt-publish-rate": l.PublishRate,
	} {
		if err := r.Validate(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	if l.MaxHandshakes < 1 {
		return fmt.Errorf("--max-tls-handshakes %d must be at least 1", l.MaxHandshakes)
	}
	if l.MaxPayload > broker.DefaultMaxPacketSize-1024 {
		return fmt.Errorf("--mqtt-max-payload %d exceeds the MQTT packet limit (%d bytes with headers)", l.MaxPayload, broker.DefaultMaxPacketSize)
	}
	if l.LockoutFailures > 0 && l.LockoutWindow < time.Second {
		return fmt.Errorf("--enroll-lockout-window %v is under a second", l.LockoutWindow)
	}
	return nil
}

// estConnectRate is the EST listener's per-source connection rate: the
// enroll and read rates together, so a client that ignores 429 answers
// costs no TLS handshakes beyond what the two would answer.
func (l Limits) estConnectRate() limit.Rate {
	if l.EnrollRate.IsOff() || l.ESTReadRate.IsOff() {
		return limit.Off
	}
	return limit.Rate{PerSecond: l.EnrollRate.PerSecond + l.ESTReadRate.PerSecond, Burst: l.EnrollRate.Burst + l.ESTReadRate.Burst}
}

// Defaults for Config.
const (
	DefaultDataDir    = "/var/lib/fleetgate"
	DefaultDevDataDir = "fleetgate-dev"
	DefaultMQTTListen = ":8883"
	DefaultESTListen  = ":8443"
	DefaultAdmin      = ":9443"
)

// SetDefaults fills empty fields.
func (c *Config) SetDefaults() {
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
		if c.Dev {
			c.DataDir = DefaultDevDataDir
		}
	}
	if c.MQTTListen == "" {
		c.MQTTListen = DefaultMQTTListen
	}
	if c.ESTListen == "" {
		c.ESTListen = DefaultESTListen
	}
	if c.AdminListen == "" {
		c.AdminListen = DefaultAdmin
	}
	if len(c.DevHosts) == 0 {
		c.DevHosts = []string{"localhost", "127.0.0.1", "::1"}
	}
	if c.DeviceTTL == 0 {
		c.DeviceTTL = pki.DefaultDeviceValidity
	}
	if c.TokenTTL == 0 {
		c.TokenTTL = authority.DefaultTokenTTL
	}
	if c.CRLValidity == 0 {
		c.CRLValidity = authority.DefaultCRLValidity
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = broker.DefaultConnectTimeout
	}
	if c.SeenFlushInterval == 0 {
		c.SeenFlushInterval = 30 * time.Second
	}
	if c.ReadHeaderTimeout == 0 {
		c.ReadHeaderTimeout = 10 * time.Second
	}
	if c.ReadTimeout == 0 {
		c.ReadTimeout = 30 * time.Second
	}
	c.Limits.setDefaults()
}

// Validate checks the configuration and makes paths absolute.
func (c *Config) Validate() error {
	abs, err := filepath.Abs(c.DataDir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	c.DataDir = abs
	for name, addr := range map[string]string{"--mqtt-listen": c.MQTTListen, "--est-listen": c.ESTListen, "--admin-listen": c.AdminListen} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("%s %q: %w", name, addr, err)
		}
	}
	if c.MetricsListen != "" {
		if _, _, err := net.SplitHostPort(c.MetricsListen); err != nil {
			return fmt.Errorf("--metrics-listen %q: %w", c.MetricsListen, err)
		}
	} else if c.Pprof {
		return errors.New("--pprof needs --metrics-listen")
	}
	if c.DeviceTTL < time.Minute {
		return fmt.Errorf("device certificate lifetime %v is under a minute", c.DeviceTTL)
	}
	if c.TokenTTL <= 0 || c.TokenTTL > authority.MaxTokenTTL {
		return fmt.Errorf("token TTL %v must be positive and at most %v", c.TokenTTL, authority.MaxTokenTTL)
	}
	if c.CRLValidity < 10*time.Minute {
		return fmt.Errorf("CRL validity %v is under 10 minutes", c.CRLValidity)
	}
	return c.Limits.validate()
}

// Server is a running gateway.
type Server struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics.Metrics
	store   *boltdb.Store
	reg     registry.Store // store, or what WrapStore made of it
	ca      *authority.Authority
	broker  *broker.Broker

	listeners map[string]net.Listener
	https     []*http.Server

	stop    chan struct{}
	wg      sync.WaitGroup
	closeMu sync.Once
}

// New opens the data directory and registry and binds every listener, so
// configuration and port errors surface before anything is served.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Server, error) {
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: log, metrics: metrics.New(), listeners: map[string]net.Listener{}, stop: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			s.closeResources()
		}
	}()
	layout := pki.Layout{Dir: cfg.DataDir}
	if err := s.prepareDataDir(layout); err != nil {
		return nil, err
	}
	ca, err := pki.LoadIssuingCA(layout)
	if err != nil {
		return nil, fmt.Errorf("load issuing CA: %w", err)
	}
	td, err := identity.TrustDomainOf(ca.Cert)
	if err != nil {
		return nil, err
	}
	if err := pki.CheckKeyFileMode(layout.ServerKey()); err != nil {
		return nil, err
	}
	serverCert, err := tls.LoadX509KeyPair(layout.ServerCert(), layout.ServerKey())
	if err != nil {
		return nil, fmt.Errorf("load server certificate: %w", err)
	}
	crlURL := cfg.CRLURL
	if crlURL == "" {
		crlURL = defaultCRLURL(serverCert, cfg.ESTListen)
	}

	s.store, err = boltdb.Open(layout.Registry(), boltdb.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, explainUnwritable(layout.Dir, layout.Registry(), err)
	}
	s.reg = s.store
	if cfg.WrapStore != nil {
		s.reg = cfg.WrapStore(s.store)
	}
	lim := cfg.Limits
	s.ca, err = authority.New(ctx, authority.Config{
		Issuer:          &pki.Issuer{CA: ca, TrustDomain: td, CRLURLs: []string{crlURL}},
		Store:           s.reg,
		DeviceTTL:       cfg.DeviceTTL,
		TokenTTL:        cfg.TokenTTL,
		CRLValidity:     cfg.CRLValidity,
		CRLFile:         layout.CRL(),
		LockoutFailures: lim.LockoutFailures,
		LockoutWindow:   lim.LockoutWindow,
		Logger:          log,
		Metrics:         s.metrics,
	})
	if err != nil {
		return nil, err
	}

	for name, addr := range map[string]string{"mqtt": cfg.MQTTListen, "est": cfg.ESTListen, "admin": cfg.AdminListen, "metrics": cfg.MetricsListen} {
		if addr == "" {
			continue
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s on %s: %w", name, addr, err)
		}
		s.listeners[name] = l
	}

	base := &tls.Config{
		MinVersion:       tls.VersionTLS12,
		Certificates:     []tls.Certificate{serverCert},
		ClientCAs:        s.ca.ClientCAs(),
		VerifyConnection: s.ca.VerifyConnection,
	}
	mqttTLS := base.Clone()
	mqttTLS.ClientAuth = tls.RequireAndVerifyClientCert
	s.broker, err = broker.New(broker.Config{
		Listener:       s.listeners["mqtt"],
		TLS:            mqttTLS,
		TrustDomain:    td,
		ConnectTimeout: cfg.ConnectTimeout,
		MaxPayload:     lim.MaxPayload,
		MaxInflight:    cfg.MQTTMaxInflight,
		ConnectRate:    lim.MQTTConnectRate,
		MaxHandshakes:  lim.MaxHandshakes,
		PublishRate:    lim.PublishRate,
		OnSeen:         s.ca.Seen,
		Revoked:        s.ca.IsRevoked,
		Logger:         log,
		Metrics:        s.metrics,
	})
	if err != nil {
		return nil, err
	}
	s.ca.OnRevoke(func(deviceID string) bool {
		start := time.Now()
		if s.broker.Revoke(deviceID) {
			s.metrics.RevokeDisconnect.Observe(time.Since(start).Seconds())
			return true
		}
		return false
	})

	estHandler, err := gwest.NewHandler(gwest.Config{
		Authority: s.ca, Logger: log, Metrics: s.metrics,
		EnrollRate: lim.EnrollRate, ReadRate: lim.ESTReadRate,
	})
	if err != nil {
		return nil, err
	}
	estTLS := base.Clone()
	estTLS.ClientAuth = tls.VerifyClientCertIfGiven
	// A device enrolls once and renews weeks later: a session ticket
	// would never be used, and sealing one costs each enrollment ~40 µs.
	estTLS.SessionTicketsDisabled = true
	estConnect := lim.estConnectRate()
	estPerSource := 0
	if estConnect.IsOff() {
		estPerSource = -1
	}
	s.addHTTP("est", estHandler, estTLS, estConnect, estPerSource, time.Minute)

	// The admin API has no per-source rates: its clients are operators
	// (the provisioning CLI mints tokens by the thousand). Its handshakes
	// are bounded like every listener's.
	adminTLS := base.Clone()
	adminTLS.ClientAuth = tls.RequireAndVerifyClientCert
	s.addHTTP("admin", admin.NewHandler(admin.Config{
		Authority: s.ca, Store: s.reg, Sessions: s.broker, Metrics: s.metrics.Handler(), Logger: log,
	}), adminTLS, limit.Off, 0, 30*time.Minute)

	if _, ok := s.listeners["metrics"]; ok {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", s.metrics.Handler())
		if cfg.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		s.addHTTP("metrics", mux, nil, limit.Off, 0, time.Minute)
	}
	ok = true
	return s, nil
}

// prepareDataDir checks the data directory, initializing it in dev mode.
func (s *Server) prepareDataDir(l pki.Layout) error {
	_, err := os.Stat(l.IssuingKey())
	switch {
	case err == nil:
	case errors.Is(err, fs.ErrNotExist) && s.cfg.Dev:
		s.log.Info("dev mode: initializing data directory", "dir", l.Dir, "hosts", strings.Join(s.cfg.DevHosts, ","))
		if err := pki.Init(l, pki.InitOptions{Hosts: s.cfg.DevHosts}); err != nil {
			return err
		}
		s.log.Info("dev mode: CA bundle for devices", "file", l.CABundle())
		s.log.Info("dev mode: operator certificate", "cert", l.OperatorCert(), "key", l.OperatorKey())
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("data dir %s holds no CA: run 'provisioning init --data-dir %s --hosts HOST,...' first, or start the gateway with --dev", l.Dir, l.Dir)
	default:
		return fmt.Errorf("data dir: %w", err)
	}
	st, err := os.Stat(l.Dir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if st.Mode().Perm()&0o002 != 0 {
		return fmt.Errorf("data dir %s is writable by everyone (mode %04o): run chmod 700 %s", l.Dir, st.Mode().Perm(), l.Dir)
	}
	if err := checkDataDir(l); err != nil {
		return err
	}
	return checkWritable(l.Dir)
}

// checkWritable refuses a data directory the gateway cannot write, before
// anything is served: the registry, the CRL copy and bbolt's lock all
// live there, and bbolt's own error on a read-only disk does not say so
// plainly. A full disk is no reason to refuse: devices already enrolled
// can still connect, and writes fail one by one with 503.
func checkWritable(dir string) error {
	f, err := os.CreateTemp(dir, ".write-check-*")
	if err != nil {
		return explainUnwritable(dir, dir, err)
	}
	name := f.Name()
	_ = f.Close()
	return os.Remove(name)
}

// explainUnwritable words an error of writing path (the data dir itself,
// or the registry file in it) for an operator.
func explainUnwritable(dir, path string, err error) error {
	switch {
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("data dir %s is read-only (a read-only file system): the gateway writes its registry there; remount it read-write: %w", dir, err)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("data dir %s is read-only for this user (cannot write %s): the gateway writes its registry there; check owner and mode: %w", dir, path, err)
	}
	return err
}

func defaultCRLURL(cert tls.Certificate, estListen string) string {
	host := "localhost"
	if cert.Leaf != nil {
		switch {
		case len(cert.Leaf.DNSNames) > 0:
			host = cert.Leaf.DNSNames[0]
		case len(cert.Leaf.IPAddresses) > 0:
			host = cert.Leaf.IPAddresses[0].String()
		}
	}
	port := strconv.Itoa(pki.DefaultESTPort)
	if _, p, err := net.SplitHostPort(estListen); err == nil && p != "" && p != "0" {
		port = p
	}
	return "https://" + net.JoinHostPort(host, port) + "/crl"
}

// addHTTP serves h on the named listener. connectRate limits new
// connections per source before TLS; perSource caps one source's
// handshakes in flight (0: the listener's default, negative: none).
func (s *Server) addHTTP(name string, h http.Handler, tlsConf *tls.Config, connectRate limit.Rate, perSource int, writeTimeout time.Duration) {
	l, ok := s.listeners[name]
	if !ok {
		return
	}
	clog := s.log.With("component", name)
	if tlsConf != nil {
		// Handshakes run on the listener's bounded pool, not on
		// net/http's goroutine per connection.
		l = limit.NewListener(l, limit.ListenerConfig{
			Name:          name,
			TLS:           tlsConf,
			Timeout:       s.cfg.ReadHeaderTimeout,
			ConnectRate:   connectRate,
			MaxHandshakes: s.cfg.Limits.MaxHandshakes,
			MaxPerSource:  perSource,
			OnHandshakeError: func(remote net.Addr, err error) {
				clog.Debug("TLS handshake error", "remote", remote, "error", err)
			},
			Logger:  clog,
			Metrics: s.metrics,
		})
		s.listeners[name] = l
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: s.cfg.ReadHeaderTimeout,
		ReadTimeout:       s.cfg.ReadTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          log.New(slogWriter{clog}, "", 0),
	}
	s.https = append(s.https, srv)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("listener stopped", "listener", name, "error", err)
		}
	}()
}

// MaxHeaderBytes bounds the request headers on every HTTP listener
// (net/http adds 4 KiB of slack); larger ones get 431.
const MaxHeaderBytes = 32 << 10

// slogWriter routes net/http's own log lines (TLS handshake errors from
// scanners and broken clients) to debug level.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.log.Debug(strings.TrimSpace(string(p)))
	return len(p), nil
}

// Addr returns the bound address of a listener: "mqtt", "est", "admin" or
// "metrics".
func (s *Server) Addr(name string) string {
	if l, ok := s.listeners[name]; ok {
		return l.Addr().String()
	}
	return ""
}

// Authority returns the certificate authority (tests).
func (s *Server) Authority() *authority.Authority { return s.ca }

// Broker returns the MQTT broker (tests).
func (s *Server) Broker() *broker.Broker { return s.broker }

// Metrics returns the gateway's collectors.
func (s *Server) Metrics() *metrics.Metrics { return s.metrics }

// Start serves MQTT and starts the background loops. HTTP listeners are
// already serving.
func (s *Server) Start() error {
	if err := s.broker.Serve(); err != nil {
		return fmt.Errorf("start broker: %w", err)
	}
	s.wg.Add(1)
	go s.background()
	s.log.Info("gateway ready",
		"mqtt", s.Addr("mqtt"), "est", s.Addr("est"), "admin", s.Addr("admin"), "metrics", s.Addr("metrics"),
		"data_dir", s.cfg.DataDir, "trust_domain", s.ca.TrustDomain())
	return nil
}

func (s *Server) background() {
	defer s.wg.Done()
	seen := time.NewTicker(s.cfg.SeenFlushInterval)
	defer seen.Stop()
	crl := time.NewTicker(time.Minute)
	defer crl.Stop()
	prune := time.NewTicker(time.Hour)
	defer prune.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-seen.C:
			if err := s.ca.FlushSeen(context.Background()); err != nil {
				s.log.Warn("flush last-seen times", "error", err)
			}
		case <-crl.C:
			if err := s.ca.RefreshCRL(context.Background()); err != nil {
				s.log.Error("refresh CRL", "error", err)
			}
		case <-prune.C:
			n, err := s.reg.PruneTokens(context.Background(), time.Now().Add(-7*24*time.Hour))
			if err != nil {
				s.log.Warn("prune tokens", "error", err)
			} else if n > 0 {
				s.log.Info("pruned old tokens", "count", n)
			}
		}
	}
}

// Run serves until ctx ends, then shuts down gracefully.
func (s *Server) Run(ctx context.Context) error {
	if err := s.Start(); err != nil {
		s.Close()
		return err
	}
	<-ctx.Done()
	s.log.Info("shutting down")
	return s.Close()
}

// Close stops every listener, lets in-flight requests finish (up to 10 s),
// flushes last-seen times and closes the registry.
func (s *Server) Close() error {
	var err error
	s.closeMu.Do(func() {
		close(s.stop)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, h := range s.https {
			_ = h.Shutdown(ctx)
		}
		if s.broker != nil {
			_ = s.broker.Close()
		}
		s.wg.Wait()
		if s.ca != nil {
			if e := s.ca.FlushSeen(ctx); e != nil {
				s.log.Warn("flush last-seen times", "error", e)
			}
		}
		err = s.closeResources()
	})
	return err
}

func (s *Server) closeResources() error {
	for name, l := range s.listeners {
		if name == "mqtt" {
			continue // the broker owns it
		}
		_ = l.Close()
	}
	if s.broker == nil {
		if l, ok := s.listeners["mqtt"]; ok {
			_ = l.Close()
		}
	}
	if s.store != nil {
		return s.store.Close()
	}
	return nil
}
