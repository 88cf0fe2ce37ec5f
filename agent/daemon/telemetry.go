package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/agent/spool"
	"github.com/fleetgate/fleetgate/agent/telemetry"
	"github.com/fleetgate/fleetgate/pkg/topic"
)

// MaxPayload bounds a telemetry message. It is the gateway's default
// --mqtt-max-payload: the gateway closes the session of a device that
// publishes more, and a message it refuses would be sent again and again.
// The sources' own limits keep messages well below it.
const MaxPayload = 64 << 10

// ErrTooLarge: a message over MaxPayload, refused before it is stored.
var ErrTooLarge = errors.New("telemetry message too large")

// ackTimeout is how long the sender waits for the oldest message in flight
// to be acknowledged before it gives the session up.
const ackTimeout = 60 * time.Second

// Message is the JSON of one telemetry message. Every message, whatever
// its source, carries the device's sequence number: one series per device,
// over all its telemetry topics, strictly increasing and never reused, so a
// consumer of devices/ID/telemetry/# tells gaps from duplicates.
type Message struct {
	DeviceID string `json:"device_id"`
	Seq      uint64 `json:"seq"`
	// Time is when the message was made, not when it was sent: after an
	// outage it lags behind the arrival.
	Time time.Time `json:"time"`
	// SpoolDropped counts the messages the spool dropped over its bound
	// before this one was stored. When it grows across a gap in seq, the
	// gap was dropped on purpose (an outage longer than the spool holds).
	SpoolDropped uint64 `json:"spool_dropped"`
	// System metrics, in periodic messages (unless --system=false).
	System *telemetry.System `json:"system,omitempty"`
	// Exec is the --exec command's JSON object, ExecError why it is missing.
	Exec      json.RawMessage `json:"exec,omitempty"`
	ExecError string          `json:"exec_error,omitempty"`
	// Local is a JSON object a local program wrote to --local-socket.
	Local json.RawMessage `json:"local,omitempty"`
}

// spoolMessage puts a message in the spool, which numbers it.
func (d *Daemon) spoolMessage(sp *spool.Spool, topicName string, m Message) error {
	return d.spoolMessages(sp, []string{topicName}, []Message{m})[0]
}

// spoolMessages stores messages in one spool transaction; the error at i
// says why message i was not stored (nil: stored).
func (d *Daemon) spoolMessages(sp *spool.Spool, topics []string, ms []Message) []error {
	entries := make([]spool.Entry, len(ms))
	for i := range ms {
		m := ms[i]
		entries[i] = spool.Entry{Topic: topics[i], Build: func(seq, dropped uint64) ([]byte, error) {
			m.Seq, m.SpoolDropped = seq, dropped
			b, err := json.Marshal(m)
			if err == nil && len(b) > MaxPayload {
				return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrTooLarge, len(b), MaxPayload)
			}
			return b, err
		}}
	}
	errs := make([]error, len(ms))
	res, err := sp.AppendBatch(entries)
	if err != nil {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	var (
		dropped int
		total   uint64
	)
	for i, r := range res {
		errs[i] = r.Err
		dropped += r.Dropped
		total = max(total, r.TotalDropped)
	}
	if dropped > 0 {
		d.drops.add(d, dropped, total)
	}
	return errs
}

// sample makes a periodic message every interval until ctx ends.
func (d *Daemon) sample(ctx context.Context, sp *spool.Spool) {
	tick := time.NewTicker(d.cfg.Interval)
	defer tick.Stop()
	var execErr string
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		m := Message{DeviceID: d.cfg.DeviceID, Time: time.Now().UTC()}
		if d.cfg.System {
			s := d.sources.ReadSystem()
			m.System = &s
		}
		if d.exec != nil {
			out, err := d.exec.Run(ctx)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				m.ExecError = err.Error()
			} else {
				m.Exec = out
			}
			// Log when the outcome changes, not every interval.
			if m.ExecError != execErr {
				if m.ExecError != "" {
					d.log.Warn("exec source failed", "error", m.ExecError)
				} else {
					d.log.Info("exec source works again")
				}
				execErr = m.ExecError
			}
		}
		if m.System == nil && m.Exec == nil && m.ExecError == "" {
			continue
		}
		if err := d.spoolMessage(sp, topic.Telemetry(d.cfg.DeviceID), m); err != nil {
			d.log.Error("telemetry not stored", "error", err)
		}
	}
}

// storeLocal stores lines from the local socket.
func (d *Daemon) storeLocal(sp *spool.Spool, lms []telemetry.LocalMessage) []error {
	now := time.Now().UTC()
	topics := make([]string, len(lms))
	ms := make([]Message, len(lms))
	for i, lm := range lms {
		topics[i] = topic.Telemetry(d.cfg.DeviceID)
		if lm.Subtopic != "" {
			topics[i] += "/" + lm.Subtopic
		}
		ms[i] = Message{DeviceID: d.cfg.DeviceID, Time: now, Local: lm.Data}
	}
	return d.spoolMessages(sp, topics, ms)
}

// inflight is a message handed to paho and not yet acknowledged.
type inflight struct {
	seq uint64
	tok paho.Token
	at  time.Time
}

// drain publishes the spool's messages oldest first, at most MaxInflight
// unacknowledged at a time, and removes each from the spool once the
// broker acknowledged it (PUBACK at QoS 1; written to the socket at QoS 0).
// Messages still in flight when the session ends stay in the spool and go
// again on the next session: the consumer may see them twice, never zero
// times. drain returns nil when ctx ends, or why the session is no good.
func (d *Daemon) drain(ctx context.Context, c paho.Client, sp *spool.Spool) error {
	var (
		queue []inflight
		// last is the newest message handed to paho in this session.
		last    uint64
		timeout = time.NewTimer(ackTimeout)
	)
	defer timeout.Stop()
	for {
		if room := d.cfg.MaxInflight - len(queue); room > 0 {
			msgs, err := sp.Next(last, room)
			if err != nil {
				return err
			}
			for _, m := range msgs {
				queue = append(queue, inflight{seq: m.Seq, tok: c.Publish(m.Topic, byte(d.cfg.QoS), false, m.Payload), at: time.Now()})
				last = m.Seq
			}
		}
		var (
			head   <-chan struct{}
			notify <-chan struct{}
		)
		if len(queue) > 0 {
			head = queue[0].tok.Done()
			timeout.Reset(time.Until(queue[0].at.Add(ackTimeout)))
		}
		if len(queue) < d.cfg.MaxInflight {
			notify = sp.Notify()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-notify:
			continue
		case <-timeout.C:
			if len(queue) == 0 {
				continue
			}
			return fmt.Errorf("seq %d: no acknowledgement within %v", queue[0].seq, ackTimeout)
		case <-head:
		}
		// Acknowledge the finished prefix of the queue in one transaction.
		var acked []uint64
		for len(queue) > 0 && done(queue[0].tok) {
			if err := queue[0].tok.Error(); err != nil {
				return fmt.Errorf("seq %d: %w", queue[0].seq, err)
			}
			acked = append(acked, queue[0].seq)
			queue = queue[1:]
		}
		if err := sp.Ack(acked...); err != nil {
			return err
		}
		d.log.Debug("telemetry delivered", "seq_from", acked[0], "seq_to", acked[len(acked)-1])
	}
}

func done(t paho.Token) bool {
	select {
	case <-t.Done():
		return true
	default:
		return false
	}
}

// dropLog reports spool drops at most once a minute, with totals.
type dropLog struct {
	mu      sync.Mutex
	last    time.Time
	pending int
}

func (l *dropLog) add(d *Daemon, dropped int, total uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pending += dropped
	if time.Since(l.last) < time.Minute {
		return
	}
	d.log.Warn("spool full: dropped the oldest messages", "dropped", l.pending, "dropped_total", total,
		"spool_max", d.cfg.SpoolMax.String(), "spool_max_messages", d.cfg.SpoolMaxMessages)
	l.last, l.pending = time.Now(), 0
}
