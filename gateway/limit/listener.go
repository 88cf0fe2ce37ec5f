package limit

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/gateway/metrics"
)

// Defaults for ListenerConfig.
const (
	// DefaultMaxHandshakes bounds the TLS handshakes running at once on
	// one listener. A handshake is mostly waiting for the peer (two round
	// trips; a cellular device takes a second or more), so the bound is
	// well above the core count: 256 handshakes of 1 s each still admit
	// 256 devices a second, while the CPU cost of each (~0.3 ms) caps the
	// rate long before that on a LAN.
	DefaultMaxHandshakes = 256
	// DefaultHandshakeTimeout bounds a handshake, counted from accept.
	DefaultHandshakeTimeout = 10 * time.Second
)

// ListenerConfig configures NewListener.
type ListenerConfig struct {
	// Name labels the listener in metrics and logs ("mqtt", "est", "admin").
	Name string
	// TLS is the server configuration of every connection.
	TLS *tls.Config
	// Timeout bounds the handshake, counted from accept, so time spent
	// waiting for a free handshake slot counts too.
	Timeout time.Duration
	// KeepDeadline leaves the accept deadline on the connection after the
	// handshake instead of clearing it: the MQTT listener uses it to bound
	// the CONNECT packet too.
	KeepDeadline bool
	// WrapConn, when set, wraps each connection under TLS (the MQTT
	// listener batches writes there).
	WrapConn func(net.Conn) net.Conn
	// ConnectRate limits new connections per source; zero or Off for none.
	// Refused connections are closed before any TLS work.
	ConnectRate Rate
	// MaxHandshakes bounds the handshakes running at once; one goroutine
	// each. MaxQueued bounds accepted connections waiting for one of them
	// (default 4×MaxHandshakes), MaxPerSource a source's queued and running
	// handshakes together (default MaxHandshakes/4, so no one address can
	// hold every slot with connections that never finish; negative for no
	// cap). Connections beyond these are closed at once ("shed").
	MaxHandshakes int
	MaxQueued     int
	MaxPerSource  int
	// MaxSources bounds the sources tracked (DefaultMaxSources when 0).
	MaxSources int
	// OnHandshakeError, when set, hears of every failed handshake.
	OnHandshakeError func(remote net.Addr, err error)
	Logger           *slog.Logger
	Metrics          *metrics.Metrics
}

// Listener is a TLS listener that completes each handshake before Accept
// returns the connection, on a bounded set of goroutines: a flood of
// connections costs a bounded number of goroutines, file descriptors in a
// bounded queue, and no TLS work for the connections shed.
type Listener struct {
	inner   net.Listener
	cfg     ListenerConfig
	log     *slog.Logger
	sources *Sources

	rateLimited prometheus.Counter
	shedBusy    prometheus.Counter
	shedSource  prometheus.Counter
	shedExpired prometheus.Counter
	inFlight    prometheus.Gauge

	ready chan *tls.Conn
	ctx   context.Context // cancelled by Close: aborts handshakes
	stop  context.CancelFunc
	start sync.Once

	mu      sync.Mutex
	running int
	queue   []pending
	closed  bool
}

type pending struct {
	conn     net.Conn
	slot     Slot
	deadline time.Time
}

// NewListener wraps inner, which accepts raw TCP connections. It starts
// accepting at the first call of Accept.
func NewListener(inner net.Listener, cfg ListenerConfig) *Listener {
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultHandshakeTimeout
	}
	if cfg.MaxHandshakes <= 0 {
		cfg.MaxHandshakes = DefaultMaxHandshakes
	}
	if cfg.MaxQueued <= 0 {
		cfg.MaxQueued = 4 * cfg.MaxHandshakes
	}
	switch {
	case cfg.MaxPerSource == 0:
		cfg.MaxPerSource = max(1, cfg.MaxHandshakes/4)
	case cfg.MaxPerSource < 0:
		cfg.MaxPerSource = 0 // none
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New()
	}
	ctx, stop := context.WithCancel(context.Background())
	m := cfg.Metrics
	var rateLimited prometheus.Counter
	if !cfg.ConnectRate.IsOff() && !cfg.ConnectRate.IsZero() {
		rateLimited = m.RateLimited.WithLabelValues(cfg.Name + "_connect")
	}
	return &Listener{
		inner:       inner,
		cfg:         cfg,
		log:         cfg.Logger.With("listener", cfg.Name),
		sources:     NewSources(cfg.ConnectRate, cfg.MaxPerSource, cfg.MaxSources),
		rateLimited: rateLimited,
		shedBusy:    m.HandshakesShed.WithLabelValues(cfg.Name, "busy"),
		shedSource:  m.HandshakesShed.WithLabelValues(cfg.Name, "source_busy"),
		shedExpired: m.HandshakesShed.WithLabelValues(cfg.Name, "expired"),
		inFlight:    m.HandshakesInFlight.WithLabelValues(cfg.Name),
		ready:       make(chan *tls.Conn),
		ctx:         ctx,
		stop:        stop,
	}
}

// Accept returns the next connection whose TLS handshake succeeded.
func (l *Listener) Accept() (net.Conn, error) {
	l.start.Do(func() { go l.acceptLoop() })
	select {
	case c := <-l.ready:
		return c, nil
	case <-l.ctx.Done():
		return nil, net.ErrClosed
	}
}

// Close stops accepting, aborts running handshakes and closes queued
// connections. Connections already returned by Accept stay open.
func (l *Listener) Close() error {
	l.stop()
	err := l.inner.Close()
	l.mu.Lock()
	l.closed = true
	q := l.queue
	l.queue = nil
	l.mu.Unlock()
	for _, p := range q {
		l.drop(p)
	}
	return err
}

// Addr is the inner listener's address.
func (l *Listener) Addr() net.Addr { return l.inner.Addr() }

// InFlight returns the handshakes running and queued (tests, metrics).
func (l *Listener) InFlight() (running, queued int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.running, len(l.queue)
}

// acceptLoop accepts raw connections, applies the per-source limits and
// hands each connection to a handshake goroutine or the queue.
// Transient errors (out of file descriptors) are retried with a pause:
// the servers above stop serving on the first Accept error.
func (l *Listener) acceptLoop() {
	var pause time.Duration
	for {
		c, err := l.inner.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || l.ctx.Err() != nil {
				l.stop()
				return
			}
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed; retrying", "error", err, "pause", pause)
			time.Sleep(pause)
			continue
		}
		pause = 0
		l.admit(c)
	}
}

func (l *Listener) admit(c net.Conn) {
	now := time.Now()
	src := SourceOfAddr(c.RemoteAddr())
	if ok, _ := l.sources.Allow(src, now); !ok {
		l.rateLimited.Inc()
		l.log.Debug("connection refused: rate limited", "remote", c.RemoteAddr())
		_ = c.Close()
		return
	}
	slot, ok := l.sources.Acquire(src, now)
	if !ok {
		l.shedSource.Inc()
		l.log.Debug("connection shed: too many handshakes from this source", "remote", c.RemoteAddr())
		_ = c.Close()
		return
	}
	p := pending{conn: c, slot: slot, deadline: now.Add(l.cfg.Timeout)}
	_ = c.SetDeadline(p.deadline)
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		l.drop(p)
	case l.running < l.cfg.MaxHandshakes:
		l.running++
		l.inFlight.Set(float64(l.running))
		l.mu.Unlock()
		go l.work(p)
	case len(l.queue) < l.cfg.MaxQueued:
		l.queue = append(l.queue, p)
		l.mu.Unlock()
	default:
		l.mu.Unlock()
		l.shedBusy.Inc()
		l.log.Debug("connection shed: handshake queue full", "remote", c.RemoteAddr())
		l.drop(p)
	}
}

func (l *Listener) drop(p pending) {
	_ = p.conn.Close()
	p.slot.Release()
}

// work runs handshakes, p first, then from the queue until it is empty.
func (l *Listener) work(p pending) {
	for {
		l.handshake(p)
		l.mu.Lock()
		if len(l.queue) == 0 {
			l.running--
			l.inFlight.Set(float64(l.running))
			l.mu.Unlock()
			return
		}
		p = l.queue[0]
		l.queue[0] = pending{}
		l.queue = l.queue[1:]
		l.mu.Unlock()
	}
}

func (l *Listener) handshake(p pending) {
	defer p.slot.Release()
	if l.ctx.Err() != nil {
		_ = p.conn.Close()
		return
	}
	if !time.Now().Before(p.deadline) {
		l.shedExpired.Inc()
		_ = p.conn.Close()
		return
	}
	raw := p.conn
	if l.cfg.WrapConn != nil {
		raw = l.cfg.WrapConn(raw)
	}
	tc := tls.Server(raw, l.cfg.TLS)
	ctx, cancel := context.WithDeadline(l.ctx, p.deadline)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		if l.cfg.OnHandshakeError != nil && l.ctx.Err() == nil {
			l.cfg.OnHandshakeError(p.conn.RemoteAddr(), err)
		}
		_ = tc.Close()
		return
	}
	if !l.cfg.KeepDeadline {
		_ = tc.SetDeadline(time.Time{})
	}
	select {
	case l.ready <- tc:
	case <-l.ctx.Done():
		_ = tc.Close()
	}
}
