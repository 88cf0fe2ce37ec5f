package limit_test

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/metrics"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

func TestRateSet(t *testing.T) {
	cases := []struct {
		in   string
		want limit.Rate
		err  string
	}{
		{"50:100", limit.Rate{PerSecond: 50, Burst: 100}, ""},
		{"50", limit.Rate{PerSecond: 50, Burst: 50}, ""},
		{"0.5", limit.Rate{PerSecond: 0.5, Burst: 1}, ""},
		{"2.5/s:7", limit.Rate{PerSecond: 2.5, Burst: 7}, ""},
		{"off", limit.Off, ""},
		{"0", limit.Off, ""},
		{"-3", limit.Rate{}, "positive"},
		{"NaN", limit.Rate{}, "positive"},
		{"fast", limit.Rate{}, "RATE"},
		{"5:0", limit.Rate{}, "burst"},
		{"5:x", limit.Rate{}, "burst"},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			var r limit.Rate
			err := r.Set(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Set(%q) = %v, want error with %q", tc.in, err, tc.err)
				}
				return
			}
			if err != nil || r != tc.want {
				t.Fatalf("Set(%q) = %+v, %v; want %+v", tc.in, r, err, tc.want)
			}
			var back limit.Rate
			if err := back.Set(r.String()); err != nil || back != r {
				t.Fatalf("round trip of %q through %q gave %+v, %v", tc.in, r.String(), back, err)
			}
		})
	}
}

func TestSourcesRate(t *testing.T) {
	s := limit.NewSources(limit.Rate{PerSecond: 1, Burst: 3}, 0, 0)
	now := time.Unix(1000, 0)
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	for i := range 3 {
		if ok, _ := s.Allow(a, now); !ok {
			t.Fatalf("request %d within the burst refused", i+1)
		}
	}
	ok, wait := s.Allow(a, now)
	if ok || wait <= 0 || wait > time.Second {
		t.Fatalf("4th request: ok=%v wait=%v, want refused with a wait up to 1s", ok, wait)
	}
	if ok, _ := s.Allow(b, now); !ok {
		t.Fatal("another source was refused")
	}
	if ok, _ := s.Allow(a, now.Add(time.Second)); !ok {
		t.Fatal("refused after the bucket refilled")
	}
}

func TestSourcesIPv6CountsBy64(t *testing.T) {
	s := limit.NewSources(limit.Rate{PerSecond: 0.001, Burst: 2}, 0, 0)
	now := time.Unix(1000, 0)
	for _, a := range []string{"[2001:db8:1:2::1]:1000", "[2001:db8:1:2:ffff::9]:2000"} {
		if ok, _ := s.Allow(limit.SourceOf(a), now); !ok {
			t.Fatalf("%s refused within the burst", a)
		}
	}
	if ok, _ := s.Allow(limit.SourceOf("[2001:db8:1:2:abcd::1]:3"), now); ok {
		t.Fatal("a third address of the same /64 got its own bucket")
	}
	if ok, _ := s.Allow(limit.SourceOf("[2001:db8:1:3::1]:3"), now); !ok {
		t.Fatal("another /64 was refused")
	}
	if limit.SourceOf("[::ffff:192.0.2.7]:1") != netip.MustParseAddr("192.0.2.7") {
		t.Fatal("an IPv4-mapped address is not its IPv4 source")
	}
}

// An attacker with many addresses cannot grow the map without bound, and
// memory comes back once the sources are idle.
func TestSourcesBounded(t *testing.T) {
	const max = 100
	s := limit.NewSources(limit.Rate{PerSecond: 10, Burst: 10}, 0, max)
	now := time.Unix(1000, 0)
	for i := range 10_000 {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		s.Allow(a, now)
		if n := s.Len(); n > max {
			t.Fatalf("%d sources tracked after %d, bound %d", n, i+1, max)
		}
	}
	// Once the buckets are full again the sources are forgotten.
	s.Allow(netip.MustParseAddr("192.0.2.1"), now.Add(2*time.Minute))
	if n := s.Len(); n > 1 {
		t.Fatalf("%d sources still tracked after they went idle", n)
	}
}

func TestSourcesInFlightCap(t *testing.T) {
	s := limit.NewSources(limit.Off, 2, 0)
	now := time.Now()
	a := netip.MustParseAddr("192.0.2.1")
	s1, ok1 := s.Acquire(a, now)
	_, ok2 := s.Acquire(a, now)
	if _, ok := s.Acquire(a, now); !ok1 || !ok2 || ok {
		t.Fatalf("acquire: %v %v %v, want true true false", ok1, ok2, ok)
	}
	if _, ok := s.Acquire(netip.MustParseAddr("192.0.2.2"), now); !ok {
		t.Fatal("another source was capped")
	}
	s1.Release()
	if _, ok := s.Acquire(a, now); !ok {
		t.Fatal("a released slot was not reusable")
	}
}

// testListener serves TLS on loopback through a limit.Listener and
// answers each accepted connection with one line.
type testListener struct {
	*limit.Listener
	m    *metrics.Metrics
	conf *tls.Config
}

func newTestListener(t *testing.T, cfg limit.ListenerConfig) *testListener {
	t.Helper()
	f := pkitest.New(t)
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.TLS = &tls.Config{Certificates: []tls.Certificate{f.Server(t, "localhost")}}
	cfg.Metrics = metrics.New()
	if cfg.Name == "" {
		cfg.Name = "test"
	}
	l := limit.NewListener(raw, cfg)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, "hello\n")
			_ = c.Close()
		}
	}()
	return &testListener{Listener: l, m: cfg.Metrics, conf: &tls.Config{RootCAs: f.Pool(), ServerName: "localhost"}}
}

// dialFrom opens a TCP connection from a loopback address of its own
// (127.0.0.0/8 is all loopback on Linux), so tests can play many sources.
func (l *testListener) dialFrom(t *testing.T, src string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Skipf("cannot dial from %s: %v", src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// greet completes a TLS handshake and reads the greeting.
func (l *testListener) greet(src string) error {
	d := &net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := tls.DialWithDialer(d, "tcp", l.Addr().String(), l.conf)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "hello\n" {
		return fmt.Errorf("greeting %q: %v", b, err)
	}
	return nil
}

// closedByServer reports whether the server closed c (EOF or reset)
// within the wait: a shed connection is closed at once.
func closedByServer(c net.Conn, wait time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(wait))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Silent connections hold handshake slots until their deadline; beyond
// MaxHandshakes running and MaxQueued waiting, new ones are shed at once,
// and no goroutine is spent per connection beyond the running handshakes.
func TestListenerBoundsHandshakes(t *testing.T) {
	const running, queued, total = 4, 4, 40
	l := newTestListener(t, limit.ListenerConfig{MaxHandshakes: running, MaxQueued: queued, MaxPerSource: -1, Timeout: time.Minute})
	before := runtime.NumGoroutine()
	conns := make([]net.Conn, total)
	for i := range conns {
		conns[i] = l.dialFrom(t, fmt.Sprintf("127.0.1.%d", i+1))
	}
	shed := func() float64 { return value(l.m.HandshakesShed.WithLabelValues("test", "busy")) }
	eventually(t, "the surplus connections to be shed", func() bool { return shed() == total-running-queued })
	r, q := l.InFlight()
	if r != running || q != queued {
		t.Fatalf("%d handshakes running and %d queued, want %d and %d", r, q, running, queued)
	}
	if g := value(l.m.HandshakesInFlight.WithLabelValues("test")); g != running {
		t.Errorf("in-flight gauge %v, want %d", g, running)
	}
	if grown := runtime.NumGoroutine() - before; grown > running+4 {
		t.Errorf("%d goroutines more for %d connections, want about %d", grown, total, running+1)
	}
	closed := 0
	for _, c := range conns {
		if closedByServer(c, 50*time.Millisecond) {
			closed++
		}
	}
	t.Logf("%d silent connections: %d handshakes running, %d queued, %d shed (%d seen closed by the client)", total, r, q, int(shed()), closed)
	if closed < total-running-queued {
		t.Errorf("clients saw %d connections closed, want at least %d", closed, total-running-queued)
	}
	// When the silent clients give up, real clients are served again.
	for _, c := range conns {
		c.Close()
	}
	eventually(t, "the handshakes to drain", func() bool { r, q := l.InFlight(); return r == 0 && q == 0 })
	if err := l.greet("127.0.0.1"); err != nil {
		t.Fatalf("client after the flood: %v", err)
	}
}

func TestListenerCapsOneSource(t *testing.T) {
	l := newTestListener(t, limit.ListenerConfig{MaxHandshakes: 8, MaxPerSource: 2, Timeout: time.Minute})
	for range 5 {
		l.dialFrom(t, "127.0.2.1")
	}
	shed := l.m.HandshakesShed.WithLabelValues("test", "source_busy")
	eventually(t, "3 connections of one source to be shed", func() bool { return value(shed) == 3 })
	if err := l.greet("127.0.2.2"); err != nil {
		t.Fatalf("another source while one is at its cap: %v", err)
	}
}

func TestListenerConnectRate(t *testing.T) {
	l := newTestListener(t, limit.ListenerConfig{ConnectRate: limit.Rate{PerSecond: 0.001, Burst: 3}})
	ok := 0
	for range 6 {
		if l.greet("127.0.3.1") == nil {
			ok++
		}
	}
	if ok != 3 {
		t.Fatalf("%d of 6 connections served, want the burst of 3", ok)
	}
	if n := value(l.m.RateLimited.WithLabelValues("test_connect")); n != 3 {
		t.Fatalf("rate-limited counter %v, want 3", n)
	}
	if err := l.greet("127.0.3.2"); err != nil {
		t.Fatalf("another source: %v", err)
	}
}

// A handshake that cannot finish in time (a client sending its
// ClientHello one byte at a time) is cut at the deadline, counted from
// accept, however often bytes arrive.
func TestListenerDeadline(t *testing.T) {
	var failed = make(chan error, 1)
	l := newTestListener(t, limit.ListenerConfig{Timeout: 300 * time.Millisecond, OnHandshakeError: func(_ net.Addr, err error) {
		select {
		case failed <- err:
		default:
		}
	}})
	c := l.dialFrom(t, "127.0.4.1")
	hello := clientHello(t)
	sent := 0
	for ; sent < len(hello); sent++ {
		if _, err := c.Write(hello[sent : sent+1]); err != nil {
			break
		}
		if closedByServer(c, 100*time.Millisecond) {
			break
		}
	}
	if sent == len(hello) {
		t.Fatalf("a ClientHello trickled over %d reads was never cut", len(hello))
	}
	t.Logf("cut after %d of %d ClientHello bytes", sent, len(hello))
	select {
	case err := <-failed:
		t.Logf("handshake error: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the failed handshake was not reported")
	}
}

// clientHello returns the first flight of a TLS client.
func clientHello(t *testing.T) []byte {
	t.Helper()
	a, b := net.Pipe()
	go func() {
		_ = tls.Client(a, &tls.Config{ServerName: "localhost", InsecureSkipVerify: true}).Handshake()
	}()
	defer a.Close()
	defer b.Close()
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(b, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(b, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

func TestListenerClose(t *testing.T) {
	l := newTestListener(t, limit.ListenerConfig{MaxHandshakes: 2, Timeout: time.Minute})
	c := l.dialFrom(t, "127.0.5.1")
	eventually(t, "a handshake to start", func() bool { r, _ := l.InFlight(); return r == 1 })
	l.Close()
	if !closedByServer(c, 10*time.Second) {
		t.Fatal("a pending handshake survived Close")
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}

// value reads a counter or gauge.
func value(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		panic(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

func TestPacer(t *testing.T) {
	if limit.NewPacer(limit.Off) != nil || limit.NewPacer(limit.Rate{}) != nil {
		t.Fatal("a pacer for no rate")
	}
	// A slow rate: no token comes back during the test.
	p := limit.NewPacer(limit.Rate{PerSecond: 0.01, Burst: 5})
	for i := range 5 {
		if w := p.Take(); w != 0 {
			t.Fatalf("take %d within the burst waits %v", i+1, w)
		}
	}
	w1, w2 := p.Take(), p.Take()
	if w1 <= 0 || w2 <= w1 || w2-w1 < 99*time.Second || w2-w1 > 101*time.Second {
		t.Fatalf("waits beyond the burst %v then %v, want one interval (100s) apart", w1, w2)
	}
}

// Many goroutines taking at once: exactly the burst goes through without
// waiting, whatever the interleaving.
func TestPacerConcurrent(t *testing.T) {
	p := limit.NewPacer(limit.Rate{PerSecond: 0.01, Burst: 100})
	var free atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				if p.Take() == 0 {
					free.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if free.Load() != 100 {
		t.Fatalf("%d of 800 takes went through at once, want the burst of 100", free.Load())
	}
}
