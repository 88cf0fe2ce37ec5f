package fleet

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/mqttc"
)

// LoadOptions shapes the steady telemetry of connected devices.
type LoadOptions struct {
	// Interval between two messages of one device; devices start at a
	// random phase, so the fleet's rate is Devices/Interval, evenly spread.
	Interval time.Duration
	// QoS of telemetry (0 or 1).
	QoS byte
	// Payload size in bytes (at least MinPayload).
	Payload int
	// PublishTimeout bounds one publish (QoS 1: until its PUBACK).
	PublishTimeout time.Duration
	// Reconnect after a lost session: first after a random delay of up to
	// Jitter, then with exponential backoff (full jitter) up to MaxBackoff.
	Reconnect  bool
	Jitter     time.Duration
	MaxBackoff time.Duration
	// OnLost, when set, is told about every session that ended without
	// this side closing it, before any reconnect; returning false stops
	// that device. It runs on the device's goroutine.
	OnLost func(ctx context.Context, d *Device, c *mqttc.Conn) bool
}

func (o *LoadOptions) setDefaults() {
	if o.Interval <= 0 {
		o.Interval = time.Second
	}
	if o.PublishTimeout <= 0 {
		o.PublishTimeout = 20 * time.Second
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 5 * time.Second
	}
}

// Run runs the telemetry loop of every connected device until ctx ends
// and returns when every loop has stopped.
func (f *Fleet) Run(ctx context.Context, o LoadOptions) {
	o.setDefaults()
	var wg sync.WaitGroup
	for _, d := range f.Devices {
		if d.Conn() == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.loop(ctx, d, o)
		}()
	}
	wg.Wait()
}

func (f *Fleet) loop(ctx context.Context, d *Device, o LoadOptions) {
	timer := time.NewTimer(rand.N(o.Interval))
	defer timer.Stop()
	var payload []byte
	for {
		c := d.conn.Load()
		if c == nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-c.Done():
			kicked := d.kicked.Swap(false)
			if errors.Is(c.Err(), mqttc.ErrClosed) && !kicked {
				return // closed on purpose
			}
			if !kicked && o.OnLost != nil && !o.OnLost(ctx, d, c) {
				return
			}
			if !o.Reconnect && !kicked {
				return
			}
			if !f.reconnect(ctx, d, c, o) {
				return
			}
		case <-timer.C:
			timer.Reset(o.Interval)
			payload = f.publish(ctx, d, c, o, payload)
		}
	}
}

// publish sends one telemetry message and returns the buffer for reuse.
func (f *Fleet) publish(ctx context.Context, d *Device, c *mqttc.Conn, o LoadOptions, buf []byte) []byte {
	seq := d.seq.Add(1)
	buf = AppendPayload(buf[:0], seq, time.Now(), o.Payload)
	pctx, cancel := context.WithTimeout(ctx, o.PublishTimeout)
	err := c.Publish(pctx, d.topic, buf, o.QoS)
	cancel()
	switch {
	case err == nil:
		d.sent.Add(1)
		f.Stats.Published.Add(1)
	case ctx.Err() != nil:
	default:
		f.Stats.PubErrors.Add(1)
		f.Stats.Error("publish", err)
	}
	return buf
}

// reconnect brings a device back after a lost session. It reports whether
// the device has a session again.
func (f *Fleet) reconnect(ctx context.Context, d *Device, lost *mqttc.Conn, o LoadOptions) bool {
	lostAt := lost.ClosedAt()
	if o.Jitter > 0 && !Sleep(ctx, rand.N(o.Jitter)) {
		return false
	}
	b := newBackoff(100*time.Millisecond, o.MaxBackoff)
	for ctx.Err() == nil {
		c, err := f.Dial(ctx, d)
		if err == nil {
			f.install(d, c)
			f.Stats.Reconnects.Add(1)
			f.Stats.Reconnect.Observe(time.Since(lostAt))
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		f.Stats.Error("reconnect", err)
		if Refused(err) {
			return false
		}
		if !b.sleep(ctx) {
			return false
		}
	}
	return false
}

// Kick closes a device's session as if the network had dropped it; its
// telemetry loop reconnects (soak churn).
func (f *Fleet) Kick(d *Device) bool {
	c := d.Conn()
	if c == nil {
		return false
	}
	d.kicked.Store(true)
	_ = c.Close()
	return true
}

// backoff is exponential backoff with full jitter.
type backoff struct {
	base, cap, cur time.Duration
}

func newBackoff(base, cap time.Duration) *backoff { return &backoff{base: base, cap: cap, cur: base} }

// sleep waits a random time up to the current step and doubles the step;
// false when ctx ended.
func (b *backoff) sleep(ctx context.Context) bool {
	d := rand.N(b.cur) + time.Millisecond
	b.cur = min(b.cur*2, b.cap)
	return Sleep(ctx, d)
}

// Sleep waits d; false when ctx ended first.
func Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// PublishOne publishes one telemetry message of d on c and counts it.
func (f *Fleet) PublishOne(ctx context.Context, d *Device, c *mqttc.Conn, qos byte, size int) error {
	seq := d.seq.Add(1)
	buf := AppendPayload(nil, seq, time.Now(), size)
	if err := c.Publish(ctx, d.topic, buf, qos); err != nil {
		f.Stats.PubErrors.Add(1)
		f.Stats.Error("publish", err)
		return err
	}
	d.sent.Add(1)
	f.Stats.Published.Add(1)
	return nil
}

// BlastResult is what a throughput run sent.
type BlastResult struct {
	Sent    int64 // written (QoS 0) or acknowledged (QoS 1)
	Errors  int64
	Elapsed time.Duration
}

// Blast makes every connected device publish n messages as fast as its
// session allows: at QoS 0 back to back (TCP flow control is the only
// brake), at QoS 1 with the fleet's in-flight window. It returns when every
// device is done and every acknowledgement is in (or timeout passed).
func (f *Fleet) Blast(ctx context.Context, n int, qos byte, size int, timeout time.Duration) BlastResult {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var (
		sent, errs atomic.Int64
		wg         sync.WaitGroup
	)
	start := time.Now()
	for _, d := range f.Devices {
		c := d.Conn()
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var acks sync.WaitGroup
			buf := make([]byte, 0, size+16)
			for range n {
				seq := d.seq.Add(1)
				buf = AppendPayload(buf[:0], seq, time.Now(), size)
				var done func(error)
				if qos > 0 {
					acks.Add(1)
					done = func(err error) {
						defer acks.Done()
						if err != nil {
							errs.Add(1)
							f.Stats.Error("publish", err)
							return
						}
						sent.Add(1)
						d.sent.Add(1)
						f.Stats.Published.Add(1)
					}
				}
				if err := c.PublishAsync(ctx, d.topic, buf, qos, done); err != nil {
					if qos > 0 {
						acks.Done()
					}
					if ctx.Err() == nil {
						errs.Add(1)
						f.Stats.Error("publish", err)
					}
					return
				}
				if qos == 0 {
					sent.Add(1)
					d.sent.Add(1)
					f.Stats.Published.Add(1)
				}
			}
			all := make(chan struct{})
			go func() {
				acks.Wait()
				close(all)
			}()
			select {
			case <-all:
			case <-ctx.Done():
				// Acknowledgements overdue: give up on this session,
				// which fails whatever is still in flight.
				_ = c.Close()
				<-all
			}
		}()
	}
	wg.Wait()
	return BlastResult{Sent: sent.Load(), Errors: errs.Load(), Elapsed: time.Since(start)}
}
