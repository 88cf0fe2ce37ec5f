// Package fleet simulates a fleet of devices in one process. Each device
// has its own P-256 key, mints its one-time token through the admin API,
// enrolls over EST (RFC 7030, a new HTTPS connection per request like the
// agent), holds its own mutual-TLS MQTT session (mqttc) and publishes
// telemetry to devices/ID/telemetry. No two devices share a credential.
//
// A service subscriber with a certificate of its own reads every device's
// telemetry; payloads carry the send time and a per-device sequence number
// so delivery, duplicates and publish→receive latency are measured.
//
// Connections spread over many loopback source addresses (127.0.0.2, …)
// so tens of thousands of them do not run out of ephemeral ports.
package fleet

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetgate/fleetgate/firmware-sim/mqttc"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/topic"
)

// Defaults for Config.
const (
	DefaultConcurrency = 64
	DefaultKeepalive   = 60 * time.Second
	// MaxSourceIPs keeps source addresses inside 127.0.0.2–127.255.255.254.
	MaxSourceIPs = 1<<24 - 3
)

// Config configures a fleet.
type Config struct {
	Target Target
	// Devices is the fleet size.
	Devices int
	// Prefix starts every device ID (default "sim-" + a random run ID), so
	// runs against one gateway never collide.
	Prefix string
	// SourceIPs is how many loopback source addresses the devices spread
	// over (127.0.0.2, 127.0.0.3, …). 0 gives each device an address of
	// its own, as in a real fleet, so per-address limits of the gateway
	// see one device per address; -1 lets the kernel choose (127.0.0.1).
	SourceIPs int
	// Groups are the TLS key exchanges offered (see Groups).
	Groups []tls.CurveID
	// Resume keeps a TLS session cache per device, so reconnects resume
	// (TLS 1.3 tickets) instead of doing a full handshake.
	Resume bool
	// Keepalive of device sessions.
	Keepalive time.Duration
	// ConnectTimeout bounds one connect.
	ConnectTimeout time.Duration
	// MaxInflight bounds unacknowledged QoS 1 publishes per device.
	MaxInflight int
	Log         *slog.Logger
}

// Fleet is a set of simulated devices against one gateway.
type Fleet struct {
	cfg      Config
	log      *slog.Logger
	Stats    *Stats
	Devices  []*Device
	admin    *adminapi.Client
	est      *est.Client
	roots    *x509.CertPool
	cas      []*x509.Certificate
	baseTLS  *tls.Config
	mqttAddr string // resolved to an IPv4 loopback address
	srcIPs   int    // 0: the kernel chooses

	byID map[string]*Device
}

// New checks the configuration, loads the trust bundle and the operator
// certificate and names the devices. It makes no key yet (see Prepare).
func New(cfg Config) (*Fleet, error) {
	if err := cfg.Target.Validate(); err != nil {
		return nil, err
	}
	if cfg.Devices < 0 {
		return nil, fmt.Errorf("--devices %d: must not be negative", cfg.Devices)
	}
	if cfg.Prefix == "" {
		var b [3]byte
		_, _ = rand.Read(b[:])
		cfg.Prefix = "sim-" + hex.EncodeToString(b[:]) + "-"
	}
	if cfg.SourceIPs == 0 {
		cfg.SourceIPs = max(cfg.Devices, 1)
	}
	if cfg.SourceIPs > MaxSourceIPs {
		return nil, fmt.Errorf("--source-ips %d: at most %d", cfg.SourceIPs, MaxSourceIPs)
	}
	if cfg.Keepalive <= 0 {
		cfg.Keepalive = DefaultKeepalive
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 20 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	f := &Fleet{cfg: cfg, log: cfg.Log.With("component", "fleet"), Stats: NewStats(), byID: map[string]*Device{}}
	var err error
	if f.roots, f.cas, err = readPool(cfg.Target.CAFile); err != nil {
		return nil, err
	}
	f.srcIPs = max(cfg.SourceIPs, 0)

	var serverName string
	if f.mqttAddr, serverName, err = resolveLoopback(cfg.Target.MQTTAddr); err != nil {
		return nil, fmt.Errorf("--mqtt: %w", err)
	}
	f.baseTLS = clientTLS(f.roots, serverName, cfg.Groups)

	adminTLS, err := adminapi.OperatorTLS(pki.Layout{Dir: cfg.Target.DataDir})
	if err != nil {
		return nil, fmt.Errorf("operator certificate: %w", err)
	}
	f.admin = adminapi.NewClient(cfg.Target.AdminURL, adminTLS)

	estTLS := clientTLS(f.roots, hostOf(cfg.Target.ESTURL), cfg.Groups)
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	tr := &http.Transport{
		TLSClientConfig: estTLS,
		// Like the agent: a new connection (and handshake) per request.
		DisableKeepAlives:     true,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			d := *dialer
			if src, ok := ctx.Value(sourceKey{}).(*net.TCPAddr); ok && src != nil {
				d.LocalAddr = src
			}
			return d.DialContext(ctx, network, addr)
		},
	}
	f.est = &est.Client{BaseURL: strings.TrimRight(cfg.Target.ESTURL, "/"), HTTP: &http.Client{Transport: tr, Timeout: 60 * time.Second}}

	f.Devices = make([]*Device, cfg.Devices)
	for i := range f.Devices {
		d := &Device{ID: fmt.Sprintf("%s%d", cfg.Prefix, i+1), Index: i}
		d.topic = topic.Telemetry(d.ID)
		f.Devices[i] = d
		f.byID[d.ID] = d
	}
	return f, nil
}

func hostOf(u string) string {
	rest := u[strings.Index(u, "://")+3:]
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		rest = rest[:i]
	}
	if h, _, err := net.SplitHostPort(rest); err == nil {
		return h
	}
	return rest
}

// Admin is the fleet's admin API client.
func (f *Fleet) Admin() *adminapi.Client { return f.admin }

// Prefix is the prefix of every device ID of this fleet.
func (f *Fleet) Prefix() string { return f.cfg.Prefix }

// Device looks a device up by ID.
func (f *Fleet) Device(id string) *Device { return f.byID[id] }

// sourceKey carries a device's source address to the EST dialer.
type sourceKey struct{}

// sourceFor is the source address of device i: 127.0.0.2 + i modulo the
// number of source addresses. Linux routes all of 127.0.0.0/8 to the
// loopback interface, so any of them can connect to 127.0.0.1, and each
// has its own ~28,000 ephemeral ports.
func (f *Fleet) sourceFor(i int) *net.TCPAddr {
	if f.srcIPs == 0 {
		return nil
	}
	n := uint32(2 + i%f.srcIPs)
	return &net.TCPAddr{IP: net.IPv4(127, byte(n>>16), byte(n>>8), byte(n))}
}

// Device is one simulated device.
type Device struct {
	ID    string
	Index int
	topic string

	key   *ecdsa.PrivateKey
	csr   []byte
	token string
	cert  *tls.Certificate
	tls   *tls.Config // per device: its certificate and session cache

	conn atomic.Pointer[mqttc.Conn]
	seq  atomic.Uint64 // last sequence number published
	sent atomic.Uint64 // publishes written (QoS 0) or acknowledged (QoS 1)

	connectedAt atomic.Int64 // unix nanos of the last successful connect
	kicked      atomic.Bool  // the session was closed to simulate a network drop
}

// Conn is the device's live session, or nil.
func (d *Device) Conn() *mqttc.Conn {
	c := d.conn.Load()
	if c == nil {
		return nil
	}
	select {
	case <-c.Done():
		return nil
	default:
		return c
	}
}

// Enrolled reports whether the device holds a certificate.
func (d *Device) Enrolled() bool { return d.cert != nil }

// Cert is the device's TLS certificate (nil before enrollment).
func (d *Device) Cert() *tls.Certificate { return d.cert }

// Sent is how many publishes succeeded.
func (d *Device) Sent() uint64 { return d.sent.Load() }

// parallel runs fn for i in [0, n) on workers goroutines and returns the
// first error.
func parallel(ctx context.Context, n, workers int, fn func(ctx context.Context, i int) error) error {
	if workers <= 0 {
		workers = 1
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(workers, max(n, 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(ctx, i); err != nil {
					cancel(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return context.Cause(ctx)
}

// Prepare makes every device's key and CSR, on all cores, before any load
// starts: the device side's own crypto is not what a storm measures.
func (f *Fleet) Prepare(ctx context.Context) error {
	return parallel(ctx, len(f.Devices), runtime.NumCPU(), func(_ context.Context, i int) error {
		d := f.Devices[i]
		if d.key != nil {
			return nil
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("device key: %w", err)
		}
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: d.ID}}, key)
		if err != nil {
			return fmt.Errorf("device CSR: %w", err)
		}
		d.key, d.csr = key, csr
		return nil
	})
}

// MintTokens mints one token per device through the admin API, in batches
// of adminapi.MaxTokensPerRequest.
func (f *Fleet) MintTokens(ctx context.Context, ttl time.Duration) error {
	for start := 0; start < len(f.Devices); start += adminapi.MaxTokensPerRequest {
		end := min(start+adminapi.MaxTokensPerRequest, len(f.Devices))
		ids := make([]string, 0, end-start)
		for _, d := range f.Devices[start:end] {
			ids = append(ids, d.ID)
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		resp, err := f.admin.CreateTokens(rctx, adminapi.TokenRequest{DeviceIDs: ids, TTL: ttl.String(), Batch: "firmware-sim " + strings.TrimSuffix(f.cfg.Prefix, "-")})
		cancel()
		if err != nil {
			return fmt.Errorf("mint tokens %d–%d: %w", start+1, end, err)
		}
		for _, t := range resp.Tokens {
			d := f.byID[t.DeviceID]
			if d == nil {
				return fmt.Errorf("mint tokens: gateway answered a token for unknown device %q", t.DeviceID)
			}
			d.token = t.Token
		}
	}
	for _, d := range f.Devices {
		if d.token == "" {
			return fmt.Errorf("mint tokens: no token for %s", d.ID)
		}
	}
	return nil
}

// EnrollOptions shapes an enrollment storm.
type EnrollOptions struct {
	// Rate is the target enrollments per second; 0 is as fast as the
	// workers go.
	Rate float64
	// Concurrency is the number of enrollments in flight at most.
	Concurrency int
}

// Enroll enrolls every device that holds a token and no certificate. A
// failed enrollment is counted, not fatal; it returns how many succeeded.
func (f *Fleet) Enroll(ctx context.Context, o EnrollOptions) (int, error) {
	if o.Concurrency <= 0 {
		o.Concurrency = DefaultConcurrency
	}
	var lim *rate.Limiter
	if o.Rate > 0 {
		lim = rate.NewLimiter(rate.Limit(o.Rate), max(1, int(o.Rate/50)))
	}
	var ok atomic.Int64
	err := parallel(ctx, len(f.Devices), o.Concurrency, func(ctx context.Context, i int) error {
		d := f.Devices[i]
		if d.cert != nil || d.token == "" {
			return nil
		}
		if lim != nil {
			if err := lim.Wait(ctx); err != nil {
				return nil //nolint:nilerr // the storm ends with its context
			}
		}
		if err := f.enrollOne(ctx, d); err != nil {
			if ctx.Err() == nil {
				f.Stats.Error("enroll", err)
				f.log.Debug("enroll failed", "device", d.ID, "error", err)
			}
			return nil
		}
		ok.Add(1)
		return nil
	})
	return int(ok.Load()), err
}

func (f *Fleet) enrollOne(ctx context.Context, d *Device) error {
	start := time.Now()
	ctx = context.WithValue(ctx, sourceKey{}, f.sourceFor(d.Index))
	leaf, err := f.est.SimpleEnroll(ctx, d.csr, d.ID, d.token)
	if err != nil {
		return err
	}
	f.Stats.Enroll.Observe(time.Since(start))
	return f.setCert(d, leaf)
}

// setCert installs an issued certificate with its issuing CA as chain.
func (f *Fleet) setCert(d *Device, leaf *x509.Certificate) error {
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(&d.key.PublicKey) {
		return errors.New("issued certificate does not match the device key")
	}
	chain := [][]byte{leaf.Raw}
	for _, ca := range f.cas {
		if bytes.Equal(ca.RawSubject, leaf.RawIssuer) {
			chain = append(chain, ca.Raw)
			break
		}
	}
	d.cert = &tls.Certificate{Certificate: chain, PrivateKey: d.key, Leaf: leaf}
	conf := f.baseTLS.Clone()
	conf.Certificates = []tls.Certificate{*d.cert}
	if f.cfg.Resume {
		// One cache per device: a ticket carries the identity it was
		// issued to, and devices must never resume each other's sessions.
		conf.ClientSessionCache = tls.NewLRUClientSessionCache(1)
	}
	d.tls = conf
	f.Stats.Enrolled.Add(1)
	return nil
}

// Dial opens a new MQTT session for d (without installing it as the
// device's session) and records the connect latency.
func (f *Fleet) Dial(ctx context.Context, d *Device) (*mqttc.Conn, error) {
	return f.DialTo(ctx, d, f.mqttAddr)
}

// DialTo is Dial to another MQTT server (a peer broker in the bench) that
// trusts the same CA.
func (f *Fleet) DialTo(ctx context.Context, d *Device, addr string) (*mqttc.Conn, error) {
	if d.tls == nil {
		return nil, fmt.Errorf("device %s is not enrolled", d.ID)
	}
	start := time.Now()
	c, err := mqttc.Dial(ctx, mqttc.Options{
		Addr:           addr,
		TLS:            d.tls,
		LocalAddr:      f.sourceFor(d.Index),
		ClientID:       d.ID,
		Keepalive:      f.cfg.Keepalive,
		ConnectTimeout: f.cfg.ConnectTimeout,
		MaxInflight:    f.cfg.MaxInflight,
		ReadBufferSize: 512,
	})
	if err != nil {
		return nil, err
	}
	f.Stats.Connect.Observe(time.Since(start))
	return c, nil
}

// ConnectOptions shapes a connect storm.
type ConnectOptions struct {
	Rate        float64
	Concurrency int
	// Addr overrides the MQTT server (bench: the peer broker).
	Addr string
	// Count connects only the first Count devices (0: all).
	Count int
}

// Connect opens a session for every enrolled device without one and keeps
// it. Failures are counted; it returns how many connected.
func (f *Fleet) Connect(ctx context.Context, o ConnectOptions) (int, error) {
	if o.Concurrency <= 0 {
		o.Concurrency = DefaultConcurrency
	}
	addr := f.mqttAddr
	if o.Addr != "" {
		addr = o.Addr
	}
	var lim *rate.Limiter
	if o.Rate > 0 {
		lim = rate.NewLimiter(rate.Limit(o.Rate), max(1, int(o.Rate/50)))
	}
	n := len(f.Devices)
	if o.Count > 0 && o.Count < n {
		n = o.Count
	}
	var ok atomic.Int64
	err := parallel(ctx, n, o.Concurrency, func(ctx context.Context, i int) error {
		d := f.Devices[i]
		if d.tls == nil || d.Conn() != nil {
			return nil
		}
		if lim != nil {
			if err := lim.Wait(ctx); err != nil {
				return nil //nolint:nilerr // the storm ends with its context
			}
		}
		c, err := f.DialTo(ctx, d, addr)
		if err != nil {
			if ctx.Err() == nil {
				f.Stats.Error("connect", err)
				f.log.Debug("connect failed", "device", d.ID, "error", err)
			}
			return nil
		}
		f.install(d, c)
		ok.Add(1)
		return nil
	})
	return int(ok.Load()), err
}

// Adopt makes c, dialed with Dial or DialTo, the device's session.
func (f *Fleet) Adopt(d *Device, c *mqttc.Conn) { f.install(d, c) }

// install makes c the device's session.
func (f *Fleet) install(d *Device, c *mqttc.Conn) {
	d.conn.Store(c)
	d.connectedAt.Store(time.Now().UnixNano())
	f.Stats.Connects.Add(1)
	f.Stats.Connected.Add(1)
	go func() {
		<-c.Done()
		f.Stats.Connected.Add(-1)
		if !errors.Is(c.Err(), mqttc.ErrClosed) {
			f.Stats.Lost.Add(1)
		}
	}()
}

// DisconnectAll closes every session with DISCONNECT, on a few workers.
func (f *Fleet) DisconnectAll(ctx context.Context) {
	_ = parallel(ctx, len(f.Devices), 16, func(_ context.Context, i int) error {
		if c := f.Devices[i].conn.Swap(nil); c != nil {
			_ = c.Disconnect()
		}
		return nil
	})
	// Wait briefly until the watchers saw every close, so Connected is
	// exact for the next phase.
	deadline := time.Now().Add(5 * time.Second)
	for f.Stats.Connected.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}

// ConnectedAt is when the device's last session was established.
func (d *Device) ConnectedAt() time.Time {
	if n := d.connectedAt.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// Each runs fn for every device on workers goroutines; the first error
// stops it.
func (f *Fleet) Each(ctx context.Context, workers int, fn func(ctx context.Context, d *Device) error) error {
	return parallel(ctx, len(f.Devices), workers, func(ctx context.Context, i int) error { return fn(ctx, f.Devices[i]) })
}

// ResetSessions gives every device an empty TLS session cache, so tickets
// of one server are never offered to another.
func (f *Fleet) ResetSessions() {
	if !f.cfg.Resume {
		return
	}
	for _, d := range f.Devices {
		if d.tls != nil {
			conf := d.tls.Clone()
			conf.ClientSessionCache = tls.NewLRUClientSessionCache(1)
			d.tls = conf
		}
	}
}

// Revoke revokes d through the admin API and waits up to wait for its
// session to see the close. It returns the time from the start of the
// request to the close.
func (f *Fleet) Revoke(ctx context.Context, d *Device, wait time.Duration) (time.Duration, error) {
	c := d.Conn()
	start := time.Now()
	if _, err := f.admin.Revoke(ctx, d.ID, "keyCompromise"); err != nil {
		return 0, fmt.Errorf("revoke %s: %w", d.ID, err)
	}
	if c == nil {
		return 0, fmt.Errorf("revoke %s: device had no session", d.ID)
	}
	select {
	case <-c.Done():
		lat := c.ClosedAt().Sub(start)
		f.Stats.Revoke.Observe(lat)
		return lat, nil
	case <-time.After(wait):
		return 0, fmt.Errorf("revoke %s: session still open %v after the request", d.ID, wait)
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}
