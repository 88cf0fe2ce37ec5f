// Package limit holds the gateway's abuse controls that more than one
// transport uses: token buckets per source address, kept in a bounded map,
// and a TLS listener that bounds the handshakes in flight.
//
// A source is the TCP peer address: an IPv4 address, or the /64 network of
// an IPv6 address (one subscriber's network, where a client can pick any
// address it likes). Behind a TCP load balancer without the PROXY protocol
// every client shares the balancer's address.
package limit

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Rate is a token bucket: PerSecond events per second on average and up to
// Burst at once. The zero Rate stands for "the default" in configurations;
// Off turns a limit off.
type Rate struct {
	PerSecond float64
	Burst     int
}

// Off is the Rate of a limit that is turned off.
var Off = Rate{PerSecond: -1}

// IsOff reports whether r turns its limit off.
func (r Rate) IsOff() bool { return r.PerSecond < 0 }

// IsZero reports whether r is unset.
func (r Rate) IsZero() bool { return r == Rate{} }

// Or returns def for the zero Rate and r otherwise, with a missing burst
// filled in as one second's worth of events.
func (r Rate) Or(def Rate) Rate {
	if r.IsZero() {
		r = def
	}
	if !r.IsOff() && r.Burst <= 0 {
		r.Burst = max(1, int(math.Ceil(r.PerSecond)))
	}
	return r
}

// Validate checks a rate that is neither zero nor off.
func (r Rate) Validate() error {
	if r.IsZero() || r.IsOff() {
		return nil
	}
	if math.IsNaN(r.PerSecond) || math.IsInf(r.PerSecond, 0) || r.PerSecond <= 0 {
		return fmt.Errorf("rate %v must be a positive number per second", r.PerSecond)
	}
	if r.Burst < 0 || r.Burst > 1_000_000 {
		return fmt.Errorf("burst %d must be 1 to 1000000", r.Burst)
	}
	return nil
}

// String formats r as Set reads it: "RATE:BURST" or "off"; the zero Rate
// is the empty string.
func (r Rate) String() string {
	switch {
	case r.IsZero():
		return ""
	case r.IsOff():
		return "off"
	}
	return strconv.FormatFloat(r.PerSecond, 'g', -1, 64) + ":" + strconv.Itoa(r.Burst)
}

// Set parses "RATE[:BURST]" (events per second, and at once) or "off"
// (also "0"), so a Rate can be a flag.
func (r *Rate) Set(s string) error {
	s = strings.TrimSpace(s)
	if s == "off" || s == "0" {
		*r = Off
		return nil
	}
	rs, bs, hasBurst := strings.Cut(s, ":")
	v, err := strconv.ParseFloat(strings.TrimSuffix(rs, "/s"), 64)
	if err != nil {
		return fmt.Errorf("%q: want RATE[:BURST] per second, or off", s)
	}
	if !(v > 0) {
		return fmt.Errorf("%q: rate must be a positive number per second, or off", s)
	}
	out := Rate{PerSecond: v}
	if hasBurst {
		b, err := strconv.Atoi(bs)
		if err != nil || b < 1 {
			return fmt.Errorf("%q: burst must be a positive integer", s)
		}
		out.Burst = b
	}
	if err := out.Validate(); err != nil {
		return err
	}
	*r = out.Or(Rate{})
	return nil
}

// newLimiter returns a token bucket for r, full.
func (r Rate) newLimiter() *rate.Limiter {
	return rate.NewLimiter(rate.Limit(r.PerSecond), r.Burst)
}

// Key maps an address to its source: IPv4 (and IPv4-mapped) addresses
// stand alone, IPv6 addresses count by their /64.
func Key(a netip.Addr) netip.Addr {
	a = a.Unmap().WithZone("")
	if a.Is6() {
		if p, err := a.Prefix(64); err == nil {
			return p.Addr()
		}
	}
	return a
}

// SourceOf returns the source of a "host:port" remote address, or the zero
// Addr when it is not an IP address (the zero Addr is then one source).
func SourceOf(remote string) netip.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Addr{}
	}
	return Key(ap.Addr())
}

// SourceOfAddr is SourceOf for a net.Addr.
func SourceOfAddr(a net.Addr) netip.Addr {
	if t, ok := a.(*net.TCPAddr); ok {
		return Key(t.AddrPort().Addr())
	}
	if a == nil {
		return netip.Addr{}
	}
	return SourceOf(a.String())
}

// DefaultMaxSources bounds the sources a Sources tracks.
const DefaultMaxSources = 65536

// Sources keeps, for each source address, a token bucket and a count of
// its work in flight. The map is bounded: a source whose bucket is full
// again and that has nothing in flight is forgotten (it would start from a
// full bucket anyway), and when MaxSources sources are busy at once, new
// ones share one overflow entry, so an attacker with many addresses cannot
// grow it without bound. Safe for concurrent use; one mutex, meant for
// connections and HTTP requests, not per-message paths.
type Sources struct {
	rate        Rate // resolved: off or a real rate
	maxInFlight int
	maxSources  int

	mu       sync.Mutex
	m        map[netip.Addr]*source
	overflow *source
	sweptAt  time.Time
}

type source struct {
	lim      *rate.Limiter // nil when the rate is off
	inFlight int
}

// sweepEvery is how often idle sources are forgotten even when the map is
// not full, so memory returns after a burst of many sources.
const sweepEvery = time.Minute

// NewSources returns per-source limits: r per source (Off for none),
// at most maxInFlight units of work in flight per source (0 for no cap),
// and at most maxSources sources tracked (DefaultMaxSources when 0).
func NewSources(r Rate, maxInFlight, maxSources int) *Sources {
	if r.IsZero() {
		r = Off
	}
	if maxSources <= 0 {
		maxSources = DefaultMaxSources
	}
	s := &Sources{rate: r, maxInFlight: maxInFlight, maxSources: maxSources, m: make(map[netip.Addr]*source)}
	s.overflow = s.newSource()
	return s
}

func (s *Sources) newSource() *source {
	e := &source{}
	if !s.rate.IsOff() {
		e.lim = s.rate.newLimiter()
	}
	return e
}

// Rate returns the per-source rate (Off when there is none).
func (s *Sources) Rate() Rate { return s.rate }

// get returns src's entry, creating it; callers hold s.mu.
func (s *Sources) get(src netip.Addr, now time.Time) *source {
	if e, ok := s.m[src]; ok {
		return e
	}
	if (len(s.m) >= s.maxSources && now.Sub(s.sweptAt) >= time.Second) || now.Sub(s.sweptAt) >= sweepEvery {
		s.sweep(now)
	}
	if len(s.m) >= s.maxSources {
		return s.overflow
	}
	e := s.newSource()
	s.m[src] = e
	return e
}

// sweep forgets idle sources; callers hold s.mu.
func (s *Sources) sweep(now time.Time) {
	s.sweptAt = now
	for k, e := range s.m {
		if e.inFlight == 0 && (e.lim == nil || e.lim.TokensAt(now) >= float64(e.lim.Burst())) {
			delete(s.m, k)
		}
	}
}

// Allow takes one token from src's bucket at now. Without a token it
// returns false and how long until one is available.
func (s *Sources) Allow(src netip.Addr, now time.Time) (bool, time.Duration) {
	if s.rate.IsOff() {
		return true, 0
	}
	s.mu.Lock()
	e := s.get(src, now)
	r := e.lim.ReserveN(now, 1)
	var wait time.Duration
	if r.OK() {
		wait = r.DelayFrom(now)
		if wait > 0 {
			r.CancelAt(now)
		}
	} else {
		wait = time.Second
	}
	s.mu.Unlock()
	return wait == 0 && r.OK(), wait
}

// Slot is one unit of a source's work in flight; Release it when done.
type Slot struct {
	s *Sources
	e *source
}

// Acquire takes a unit of in-flight work for src, or reports false when
// src is at its cap.
func (s *Sources) Acquire(src netip.Addr, now time.Time) (Slot, bool) {
	if s.maxInFlight <= 0 {
		return Slot{}, true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.get(src, now)
	if e.inFlight >= s.maxInFlight && e != s.overflow {
		return Slot{}, false
	}
	e.inFlight++
	return Slot{s: s, e: e}, true
}

// Release returns the slot; releasing the zero Slot does nothing.
func (sl Slot) Release() {
	if sl.s == nil {
		return
	}
	sl.s.mu.Lock()
	sl.e.inFlight--
	sl.s.mu.Unlock()
}

// Len returns the number of sources tracked.
func (s *Sources) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}
