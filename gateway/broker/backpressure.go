package broker

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/gateway/limit"
)

// deviceSession is the broker's state for one live device session.
type deviceSession struct {
	pacer *limit.Pacer // nil without publish pacing
	// admitted: the session's current QoS 1/2 publish holds a place at
	// the gate (see gate); a session's reader handles one publish at a
	// time, so it holds at most one.
	admitted atomic.Bool
}

// maxBackpressure bounds how long one publish waits for a congested
// subscriber, so a service that stops acknowledging cannot stall devices
// forever; past it the publish goes on and mochi may drop it for that
// subscriber (counted in fleetgate_mqtt_inflight_dropped_total).
const maxBackpressure = 5 * time.Second

// gateRecheck bounds one wait at the gate: a missed wake-up costs at most
// this much.
const gateRecheck = 50 * time.Millisecond

// gate holds devices' QoS 1/2 publishes while a service subscriber is
// congested. mochi acknowledges a publish to the device before delivering
// it and drops it for a subscriber whose in-flight store or write queue is
// full; waiting here, before the acknowledgement, turns that loss into a
// delay the device absorbs (its agent spools), exactly like publish
// pacing.
//
// Admission is exact: a publish reserves its place (pending) before it
// compares the fullest service's in-flight store plus all reservations
// with the high-water mark, and gives the place back once mochi delivered
// it (OnPublished). So however many devices publish at once, no service
// gets more than high unacknowledged messages from them. Waiting
// publishes sleep on a channel that is closed when the subscriber's
// acknowledgements bring the level down to low: one wake-up per
// high-low acknowledgements, not a poll per publish.
type gate struct {
	high, low int64
	// stuckAfter: a service whose store is full and that acknowledged
	// nothing for this long no longer holds devices back (see level).
	stuckAfter time.Duration
	onStuck    func(cl *mqtt.Client) // called once per stall (logging)
	services   sync.Map              // live service sessions: *mqtt.Client -> *serviceState
	nservices  atomic.Int32
	pending    atomic.Int64 // admitted publishes not yet delivered
	waiters    atomic.Int32

	mu   sync.Mutex
	wake chan struct{} // closed and replaced to wake every waiter
}

// serviceState is what the gate knows of one service session.
type serviceState struct {
	lastAck atomic.Int64 // unix nanoseconds of its last acknowledgement (or of its start)
	stuck   atomic.Bool  // reported as stuck; cleared by its next acknowledgement
}

func newGate(high int) *gate {
	high = max(high, 2)
	return &gate{high: int64(high), low: int64(high) * 3 / 4, stuckAfter: maxBackpressure, wake: make(chan struct{})}
}

func (g *gate) addService(cl *mqtt.Client) {
	st := &serviceState{}
	st.lastAck.Store(time.Now().UnixNano())
	if _, loaded := g.services.LoadOrStore(cl, st); !loaded {
		g.nservices.Add(1)
	}
}

// acked records a service's acknowledgement.
func (g *gate) acked(cl *mqtt.Client) {
	if v, ok := g.services.Load(cl); ok {
		st := v.(*serviceState)
		st.lastAck.Store(time.Now().UnixNano())
		st.stuck.Store(false)
	}
}

// removeService forgets a service session; whoever waited on it goes on.
func (g *gate) removeService(cl *mqtt.Client) {
	if _, ok := g.services.LoadAndDelete(cl); ok {
		g.nservices.Add(-1)
		g.maybeWake()
	}
}

// level is the fullest service's in-flight store plus the reservations.
// A service at the mark that has acknowledged nothing for stuckAfter is
// left out: it has stopped reading (hung, not slow), and holding every
// device's publishes for it until its keepalive expires would stall the
// fleet; mochi drops for it instead, counted in
// fleetgate_mqtt_inflight_dropped_total.
func (g *gate) level() int64 {
	var most int
	var now int64
	g.services.Range(func(k, v any) bool {
		cl, st := k.(*mqtt.Client), v.(*serviceState)
		n := cl.State.Inflight.Len()
		if int64(n) >= g.high {
			if now == 0 {
				now = time.Now().UnixNano()
			}
			if time.Duration(now-st.lastAck.Load()) > g.stuckAfter {
				if !st.stuck.Swap(true) && g.onStuck != nil {
					g.onStuck(cl)
				}
				return true
			}
		}
		most = max(most, n)
		return true
	})
	return int64(most) + g.pending.Load()
}

// tryAdmit reserves a place, and keeps it if the level allows.
func (g *gate) tryAdmit(s *deviceSession) bool {
	g.reserve(s)
	if g.level() > g.high {
		g.release(s)
		return false
	}
	return true
}

// reserve takes a place for the session's publish.
func (g *gate) reserve(s *deviceSession) {
	s.admitted.Store(true)
	g.pending.Add(1)
}

// release gives back the session's place, if it holds one.
func (g *gate) release(s *deviceSession) {
	if s.admitted.CompareAndSwap(true, false) {
		g.pending.Add(-1)
	}
}

// maybeWake wakes the waiters once the level is down to low.
func (g *gate) maybeWake() {
	if g.waiters.Load() == 0 || g.level() > g.low {
		return
	}
	g.mu.Lock()
	close(g.wake)
	g.wake = make(chan struct{})
	g.mu.Unlock()
}

func (g *gate) wakeChan() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.wake
}

// admit lets a device's QoS 1/2 publish through the gate, waiting while
// a service is congested. A wait is usually short (the service catching
// up); the session's batched acknowledgements go out once it has waited
// gateRecheck, so none is held longer than that.
func (h *hook) admit(cl *mqtt.Client, s *deviceSession) error {
	g := h.gate
	g.release(s) // a place left by a publish mochi dropped after OnPublish
	if g.nservices.Load() == 0 || g.tryAdmit(s) {
		return nil
	}
	h.m.PublishesBackpressured.Inc()
	deadline := time.Now().Add(maxBackpressure)
	t := time.NewTimer(gateRecheck)
	defer t.Stop()
	for {
		g.waiters.Add(1)
		wake := g.wakeChan()
		if g.tryAdmit(s) { // after registering: no wake-up is missed
			g.waiters.Add(-1)
			return nil
		}
		t.Reset(gateRecheck)
		select {
		case <-wake:
		case <-t.C:
			flush(cl)
		}
		g.waiters.Add(-1)
		if cl.Closed() {
			return packets.ErrRejectPacket
		}
		if !time.Now().Before(deadline) {
			g.reserve(s)
			return nil
		}
	}
}

// OnQosComplete wakes waiting publishes when a service's acknowledgements
// make room.
func (h *hook) OnQosComplete(cl *mqtt.Client, _ packets.Packet) {
	if strings.HasPrefix(cl.ID, servicePrefix) {
		h.gate.acked(cl)
		h.gate.maybeWake()
	}
}
