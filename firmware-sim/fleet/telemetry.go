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
	"encoding/pem"
	"errors"
	"fmt"
	"math/bits"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/mqttc"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/topic"
)

// Payload layout: valid JSON, so any subscriber can read it, written and
// parsed without reflection so the load generator stays cheap; pad fills
// the payload to the size asked for:
//
//	{"seq":42,"sent_ns":1732712345678901234,"pad":"xxxx"}
const (
	payloadHead = `{"seq":`
	payloadSent = `,"sent_ns":`
	payloadPad  = `,"pad":"`
	payloadTail = `"}`
)

// MinPayload is the size from which payloads have exactly the size asked
// for: the fields at their widest, with empty padding.
const MinPayload = len(payloadHead) + 20 + len(payloadSent) + 19 + len(payloadPad) + len(payloadTail)

// AppendPayload appends a telemetry payload of size bytes (or the
// smallest possible, when size is smaller).
func AppendPayload(b []byte, seq uint64, sent time.Time, size int) []byte {
	start := len(b)
	b = append(b, payloadHead...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, payloadSent...)
	b = strconv.AppendInt(b, sent.UnixNano(), 10)
	b = append(b, payloadPad...)
	for range size - (len(b) - start) - len(payloadTail) {
		b = append(b, 'x')
	}
	return append(b, payloadTail...)
}

// ParsePayload reads the sequence number and send time of a payload.
func ParsePayload(p []byte) (seq uint64, sent time.Time, ok bool) {
	if !bytes.HasPrefix(p, []byte(payloadHead)) {
		return 0, time.Time{}, false
	}
	rest := p[len(payloadHead):]
	i := bytes.IndexByte(rest, ',')
	if i < 0 {
		return 0, time.Time{}, false
	}
	seq, err := strconv.ParseUint(string(rest[:i]), 10, 64)
	if err != nil || !bytes.HasPrefix(rest[i:], []byte(payloadSent)) {
		return 0, time.Time{}, false
	}
	rest = rest[i+len(payloadSent):]
	j := bytes.IndexAny(rest, ",}")
	if j < 0 {
		return 0, time.Time{}, false
	}
	ns, err := strconv.ParseInt(string(rest[:j]), 10, 64)
	if err != nil {
		return 0, time.Time{}, false
	}
	return seq, time.Unix(0, ns), true
}

// bitset records which sequence numbers of a device arrived.
type bitset []uint64

func (b *bitset) testAndSet(i uint64) bool {
	w := int(i / 64)
	if w >= len(*b) {
		nb := make(bitset, max(w+1, 2*len(*b)))
		copy(nb, *b)
		*b = nb
	}
	m := uint64(1) << (i % 64)
	was := (*b)[w]&m != 0
	(*b)[w] |= m
	return was
}

func (b bitset) count() int {
	n := 0
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return n
}

// Receiver is the service subscriber's bookkeeping: which messages of
// which device arrived, how late, and how often.
type Receiver struct {
	stats    *Stats
	received atomic.Int64
	dups     atomic.Int64
	foreign  atomic.Int64 // telemetry of devices outside this fleet
	bad      atomic.Int64 // unreadable payloads

	mu    sync.Mutex
	seen  map[string]*bitset
	first time.Time
	last  time.Time
}

// NewReceiver tracks the telemetry of the given device IDs.
func NewReceiver(stats *Stats, ids []string) *Receiver {
	r := &Receiver{stats: stats, seen: make(map[string]*bitset, len(ids))}
	for _, id := range ids {
		r.seen[id] = &bitset{}
	}
	return r
}

// Handle is an mqttc OnMessage for devices/+/telemetry.
func (r *Receiver) Handle(t string, payload []byte, _ byte) {
	now := time.Now()
	id, ok := deviceOf(t)
	if !ok {
		r.foreign.Add(1)
		return
	}
	seq, sent, ok := ParsePayload(payload)
	if !ok {
		r.bad.Add(1)
		return
	}
	r.mu.Lock()
	set := r.seen[id]
	if set == nil {
		r.mu.Unlock()
		r.foreign.Add(1)
		return
	}
	dup := set.testAndSet(seq)
	if r.first.IsZero() {
		r.first = now
	}
	r.last = now
	r.mu.Unlock()
	if dup {
		r.dups.Add(1)
		return
	}
	r.received.Add(1)
	r.stats.Received.Add(1)
	r.stats.Delivery.Observe(now.Sub(sent))
}

func deviceOf(t string) (string, bool) {
	rest, ok := strings.CutPrefix(t, topic.Prefix+"/")
	if !ok {
		return "", false
	}
	id, kind, ok := strings.Cut(rest, "/")
	return id, ok && kind == topic.KindTelemetry
}

// Received is the number of distinct messages that arrived.
func (r *Receiver) Received() int64 { return r.received.Load() }

// Duplicates is the number of messages that arrived more than once.
func (r *Receiver) Duplicates() int64 { return r.dups.Load() }

// Unreadable counts payloads that were not firmware-sim's and telemetry of
// devices outside the fleet.
func (r *Receiver) Unreadable() int64 { return r.bad.Load() + r.foreign.Load() }

// Window is the time between the first and the last message.
func (r *Receiver) Window() (time.Time, time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.first, r.last
}

// ResetWindow forgets the first and last arrival times (between phases).
func (r *Receiver) ResetWindow() {
	r.mu.Lock()
	r.first, r.last = time.Time{}, time.Time{}
	r.mu.Unlock()
}

// ReceivedOf counts distinct messages of one device.
func (r *Receiver) ReceivedOf(id string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s := r.seen[id]; s != nil {
		return s.count()
	}
	return 0
}

// WaitQuiet waits until want messages arrived, or nothing arrived for
// quiet, or ctx ends. It returns the distinct count.
func (r *Receiver) WaitQuiet(ctx context.Context, want int64, quiet time.Duration) int64 {
	last, lastChange := r.Received(), time.Now()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		n := r.Received()
		if n >= want {
			return n
		}
		if n != last {
			last, lastChange = n, time.Now()
		} else if time.Since(lastChange) >= quiet {
			return n
		}
		select {
		case <-ctx.Done():
			return r.Received()
		case <-t.C:
		}
	}
}

// Subscriber is the backend service reading every device's telemetry.
type Subscriber struct {
	f      *Fleet
	R      *Receiver
	cert   tls.Certificate
	qos    byte
	addr   string
	mu     sync.Mutex
	conn   *mqttc.Conn
	cancel context.CancelFunc
	done   chan struct{}
}

// ServiceCertificate asks the admin API for a service certificate named
// name, with a key made here.
func (f *Fleet) ServiceCertificate(ctx context.Context, name string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("service CSR: %w", err)
	}
	resp, err := f.admin.IssueCertificate(ctx, adminapi.CertificateRequest{
		Role: "service", Name: name, TTL: "24h",
		CSR: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr})),
	})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue service certificate %s: %w", name, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	cert, err := tls.X509KeyPair([]byte(resp.Chain), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("service certificate: %w", err)
	}
	return cert, nil
}

// SubscribeOptions configures the subscriber.
type SubscribeOptions struct {
	// Cert is the service certificate (see ServiceCertificate).
	Cert tls.Certificate
	QoS  byte
	// Addr overrides the MQTT server (bench: the peer broker).
	Addr string
	// Reconnect keeps the subscriber connected across a gateway restart.
	Reconnect bool
	// Receiver reuses bookkeeping across brokers; a new one when nil.
	Receiver *Receiver
}

// Subscribe connects the service subscriber to devices/+/telemetry.
func (f *Fleet) Subscribe(ctx context.Context, o SubscribeOptions) (*Subscriber, error) {
	ids := make([]string, len(f.Devices))
	for i, d := range f.Devices {
		ids[i] = d.ID
	}
	s := &Subscriber{f: f, R: o.Receiver, cert: o.Cert, qos: o.QoS, addr: o.Addr, done: make(chan struct{})}
	if s.R == nil {
		s.R = NewReceiver(f.Stats, ids)
	}
	if s.addr == "" {
		s.addr = f.mqttAddr
	}
	if err := s.connect(ctx); err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go s.supervise(sctx, o.Reconnect)
	return s, nil
}

func (s *Subscriber) connect(ctx context.Context) error {
	conf := s.f.baseTLS.Clone()
	conf.Certificates = []tls.Certificate{s.cert}
	c, err := mqttc.Dial(ctx, mqttc.Options{
		Addr:           s.addr,
		TLS:            conf,
		ClientID:       "firmware-sim-subscriber",
		Keepalive:      30 * time.Second,
		ConnectTimeout: 20 * time.Second,
		ReadBufferSize: 64 << 10,
		OnMessage:      s.R.Handle,
	})
	if err != nil {
		return fmt.Errorf("subscriber connect: %w", err)
	}
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := c.Subscribe(sctx, topic.Prefix+"/+/"+topic.KindTelemetry, s.qos); err != nil {
		c.Close()
		return fmt.Errorf("subscriber: %w", err)
	}
	s.mu.Lock()
	s.conn = c
	s.mu.Unlock()
	return nil
}

// supervise reconnects the subscriber when its session is lost.
func (s *Subscriber) supervise(ctx context.Context, reconnect bool) {
	defer close(s.done)
	for {
		s.mu.Lock()
		c := s.conn
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-c.Done():
		}
		if !reconnect {
			if !errors.Is(c.Err(), mqttc.ErrClosed) {
				s.f.Stats.Error("subscriber", c.Err())
			}
			return
		}
		b := newBackoff(50*time.Millisecond, 2*time.Second)
		for ctx.Err() == nil {
			if err := s.connect(ctx); err == nil {
				break
			}
			if !b.sleep(ctx) {
				return
			}
		}
	}
}

// Close disconnects the subscriber.
func (s *Subscriber) Close() {
	s.cancel()
	<-s.done
	s.mu.Lock()
	c := s.conn
	s.mu.Unlock()
	_ = c.Disconnect()
}
