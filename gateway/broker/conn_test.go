package broker

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// tcpPair returns both ends of a loopback TCP connection, the server's
// wrapped in a batchConn.
func tcpPair(t *testing.T) (*batchConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	srv := <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	bc := newBatchConn(srv)
	if bc.raw == nil {
		t.Fatal("no raw connection for readReady")
	}
	t.Cleanup(func() { bc.Close(); peer.Close() })
	return bc, peer
}

// readWithin reads what arrives at c within d.
func readWithin(c net.Conn, d time.Duration) string {
	_ = c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 256)
	n, _ := c.Read(buf)
	return string(buf[:n])
}

// readFull reads exactly n bytes from c, or fails.
func readFull(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, n)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return string(buf)
}

func TestBatchConn(t *testing.T) {
	t.Run("a write with no input pending goes out at once", func(t *testing.T) {
		bc, peer := tcpPair(t)
		if _, err := bc.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		if got := readFull(t, peer, 5); got != "hello" {
			t.Fatalf("peer got %q", got)
		}
	})

	t.Run("writes after input wait for the next read and keep their order", func(t *testing.T) {
		bc, peer := tcpPair(t)
		if _, err := peer.Write([]byte("q")); err != nil {
			t.Fatal(err)
		}
		if _, err := bc.Read(make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{"a1", "b2", "c3"} {
			if _, err := bc.Write([]byte(s)); err != nil {
				t.Fatal(err)
			}
		}
		if got := readWithin(peer, 100*time.Millisecond); got != "" {
			t.Fatalf("peer got %q while the session still worked on its input", got)
		}
		done := make(chan error, 1)
		go func() {
			_, err := bc.Read(make([]byte, 1)) // flushes, then waits for input
			done <- err
		}()
		if got := readFull(t, peer, 6); got != "a1b2c3" {
			t.Fatalf("peer got %q, want a1b2c3", got)
		}
		// Waiting for input, the session writes at once again.
		if _, err := bc.Write([]byte("now")); err != nil {
			t.Fatal(err)
		}
		if got := readFull(t, peer, 3); got != "now" {
			t.Fatalf("peer got %q", got)
		}
		_, _ = peer.Write([]byte("x"))
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a read that finds more input waiting keeps the batch", func(t *testing.T) {
		bc, peer := tcpPair(t)
		_, _ = peer.Write([]byte("qr"))
		buf := make([]byte, 1)
		if _, err := io.ReadFull(bc, buf); err != nil || buf[0] != 'q' {
			t.Fatalf("read %q, %v", buf, err)
		}
		_, _ = bc.Write([]byte("a1"))
		if _, err := bc.Read(buf); err != nil || buf[0] != 'r' {
			t.Fatalf("read %q, %v", buf, err)
		}
		if got := readWithin(peer, 100*time.Millisecond); got != "" {
			t.Fatalf("peer got %q while input was still waiting", got)
		}
		_, _ = bc.Write([]byte("b2"))
		go func() { _, _ = bc.Read(buf) }() // nothing waiting: flushes, then blocks
		if got := readFull(t, peer, 4); got != "a1b2" {
			t.Fatalf("peer got %q, want a1b2", got)
		}
		_, _ = peer.Write([]byte("x"))
	})

	t.Run("Flush writes the batch", func(t *testing.T) {
		bc, peer := tcpPair(t)
		_, _ = peer.Write([]byte("q"))
		_, _ = bc.Read(make([]byte, 1))
		_, _ = bc.Write([]byte("ack"))
		if err := bc.Flush(); err != nil {
			t.Fatal(err)
		}
		if got := readFull(t, peer, 3); got != "ack" {
			t.Fatalf("peer got %q", got)
		}
	})

	t.Run("Close writes the batch first", func(t *testing.T) {
		bc, peer := tcpPair(t)
		_, _ = peer.Write([]byte("q"))
		_, _ = bc.Read(make([]byte, 1))
		_, _ = bc.Write([]byte("bye"))
		if err := bc.Close(); err != nil {
			t.Fatal(err)
		}
		_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(peer)
		if err != nil || string(got) != "bye" {
			t.Fatalf("peer got %q, %v; want \"bye\" then EOF", got, err)
		}
	})

	t.Run("a batch past maxBatch goes out without waiting", func(t *testing.T) {
		bc, peer := tcpPair(t)
		_, _ = peer.Write([]byte("q"))
		_, _ = bc.Read(make([]byte, 1))
		chunk := make([]byte, 1024)
		go func() {
			for range maxBatch / len(chunk) {
				_, _ = bc.Write(chunk)
			}
		}()
		readFull(t, peer, maxBatch)
	})

	t.Run("a write error is returned by every later write", func(t *testing.T) {
		bc, peer := tcpPair(t)
		_ = bc.Conn.Close()
		_, err1 := bc.Write([]byte("x"))
		_, err2 := bc.Write([]byte("y"))
		if err1 == nil || !errors.Is(err2, err1) {
			t.Fatalf("writes on a closed connection: %v, then %v", err1, err2)
		}
		_ = peer
	})

	t.Run("concurrent writers and a reader: every writer's bytes arrive in order", func(t *testing.T) {
		bc, peer := tcpPair(t)
		const writers, frames = 4, 2000
		// The session's reader: reads input and writes an answer per byte,
		// as mochi answers publishes.
		readerDone := make(chan struct{})
		go func() {
			defer close(readerDone)
			buf := make([]byte, 64)
			for {
				n, err := bc.Read(buf)
				for range n {
					_, _ = bc.Write([]byte{255, 0, 0, 0, 0})
				}
				if err != nil {
					return
				}
			}
		}()
		// Other goroutines deliver messages, as mochi's write loop does.
		var wg sync.WaitGroup
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range frames {
					f := []byte{byte(w), 0, 0, 0, 0}
					binary.BigEndian.PutUint32(f[1:], uint32(i))
					if _, err := bc.Write(f); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		// The peer keeps sending input meanwhile.
		stopInput := make(chan struct{})
		go func() {
			for {
				select {
				case <-stopInput:
					return
				default:
				}
				if _, err := peer.Write([]byte("p")); err != nil {
					return
				}
				time.Sleep(100 * time.Microsecond)
			}
		}()
		next := make([]uint32, writers)
		r := bufio.NewReader(peer)
		_ = peer.SetReadDeadline(time.Now().Add(20 * time.Second))
		for got := 0; got < writers*frames; {
			f := make([]byte, 5)
			if _, err := io.ReadFull(r, f); err != nil {
				t.Fatalf("after %d frames: %v", got, err)
			}
			if f[0] == 255 {
				continue
			}
			w, i := f[0], binary.BigEndian.Uint32(f[1:])
			if int(w) >= writers || i != next[w] {
				t.Fatalf("writer %d: frame %d arrived, want %d", w, i, next[w])
			}
			next[w]++
			got++
		}
		close(stopInput)
		wg.Wait()
		bc.Close()
		<-readerDone
	})
}

// brokerEnv is a broker on loopback with a CA for its clients.
type brokerEnv struct {
	b    *Broker
	fix  *pkitest.Fixture
	addr string
}

func newBrokerEnv(t *testing.T, mod func(*Config)) *brokerEnv {
	t.Helper()
	fix := pkitest.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Listener:    ln,
		TrustDomain: pkitest.TrustDomain,
		TLS: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    fix.Pool(),
			Certificates: []tls.Certificate{fix.Server(t, "localhost", "127.0.0.1")},
		},
	}
	if mod != nil {
		mod(&cfg)
	}
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return &brokerEnv{b: b, fix: fix, addr: ln.Addr().String()}
}

// connect connects a paho client with a certificate for id.
func (e *brokerEnv) connect(t *testing.T, id identity.Identity, clientID string) paho.Client {
	t.Helper()
	cert, key := e.fix.Identity(t, id, time.Hour)
	c := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + e.addr).SetClientID(clientID).
		SetTLSConfig(&tls.Config{RootCAs: e.fix.Pool(), ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.fix.Issuing.Cert)}}).
		SetProtocolVersion(4).SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

// writeQueue is the capacity of mochi's write queue for a client (an
// unexported channel: reflection may read its capacity).
func writeQueue(t *testing.T, b *Broker, clientID string) int {
	t.Helper()
	cl, ok := b.srv.Clients.Get(clientID)
	if !ok {
		t.Fatalf("no client %q", clientID)
	}
	f := reflect.ValueOf(&cl.State).Elem().FieldByName("outbound")
	if !f.IsValid() || f.Kind() != reflect.Chan {
		t.Fatal("mochi's client has no outbound channel any more: revisit sessionListener")
	}
	return f.Cap()
}

func TestWriteQueueSizedByRole(t *testing.T) {
	e := newBrokerEnv(t, func(c *Config) { c.DeviceWriteQueue = 32; c.ServiceWriteQueue = 4096 })
	// Connect several of each at once: the queue size must follow each
	// connection's own role however their establishment interleaves.
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			e.connect(t, identity.Device(pkitest.TrustDomain, fmt.Sprintf("dev-%d", i)), fmt.Sprintf("dev-%d", i))
		}()
		go func() {
			defer wg.Done()
			e.connect(t, identity.Service(pkitest.TrustDomain, "ingest"), fmt.Sprintf("worker-%d", i))
		}()
	}
	wg.Wait()
	for i := range 6 {
		if n := writeQueue(t, e.b, fmt.Sprintf("dev-%d", i)); n != 32 {
			t.Errorf("device write queue %d, want 32", n)
		}
		if n := writeQueue(t, e.b, fmt.Sprintf("service:ingest:worker-%d", i)); n != 4096 {
			t.Errorf("service write queue %d, want 4096", n)
		}
		// Deliveries to a service are never held behind its input.
		if batches(t, e.b, fmt.Sprintf("dev-%d", i)) != true || batches(t, e.b, fmt.Sprintf("service:ingest:worker-%d", i)) != false {
			t.Errorf("device %d batches %v, service batches %v; want true, false", i,
				batches(t, e.b, fmt.Sprintf("dev-%d", i)), batches(t, e.b, fmt.Sprintf("service:ingest:worker-%d", i)))
		}
	}
}

// batches reports whether a client's connection batches its writes.
func batches(t *testing.T, b *Broker, clientID string) bool {
	t.Helper()
	cl, ok := b.srv.Clients.Get(clientID)
	if !ok {
		t.Fatalf("no client %q", clientID)
	}
	sc, ok := cl.Net.Conn.(*sessionConn)
	if !ok {
		t.Fatalf("client %q: connection %T, want *sessionConn", clientID, cl.Net.Conn)
	}
	bc, ok := sc.Conn.NetConn().(*batchConn)
	if !ok {
		t.Fatalf("client %q: TLS over %T, want *batchConn", clientID, sc.Conn.NetConn())
	}
	bc.mu.Lock()
	defer bc.mu.Unlock()
	return !bc.through
}

func TestGate(t *testing.T) {
	newService := func(h *hook, inflight int) *mqtt.Client {
		a, _ := net.Pipe()
		svc := h.srv.NewClient(a, "test", servicePrefix+"ingest:1", false)
		for i := range inflight {
			svc.State.Inflight.Set(packets.Packet{PacketID: uint16(i + 1)})
		}
		h.gate.addService(svc)
		return svc
	}

	t.Run("concurrent publishes never take more places than the high-water mark leaves", func(t *testing.T) {
		h := testHook(DefaultPublishRate)
		h.gate = newGate(10)
		newService(h, 6)
		var wg sync.WaitGroup
		var mu sync.Mutex
		admitted := 0
		for range 50 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if h.gate.tryAdmit(&deviceSession{}) {
					mu.Lock()
					admitted++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		// Optimistic reservations may turn a publish away that would have
		// fit, never let one past the mark.
		if admitted > 4 || admitted < 1 {
			t.Fatalf("%d publishes admitted with 6 of 10 places taken, want at most 4", admitted)
		}
		if p := h.gate.pending.Load(); p != int64(admitted) {
			t.Fatalf("pending %d, want %d", p, admitted)
		}
	})

	t.Run("a waiting publish goes on when the service's acknowledgements make room", func(t *testing.T) {
		h := testHook(DefaultPublishRate)
		h.gate = newGate(10)
		svc := newService(h, 10)
		cl := h.session("dev-1")
		ds := func() *deviceSession { v, _ := h.devices.Load(cl); return v.(*deviceSession) }()
		done := make(chan error, 1)
		go func() { done <- h.admit(cl, ds) }()
		select {
		case err := <-done:
			t.Fatalf("publish admitted at once with the service full: %v", err)
		case <-time.After(200 * time.Millisecond):
		}
		for i := range 4 { // down to 6, under low (7)
			svc.State.Inflight.Delete(uint16(i + 1))
			h.OnQosComplete(svc, packets.Packet{})
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(maxBackpressure / 2):
			t.Fatal("publish still held after the service made room")
		}
		if !ds.admitted.Load() || h.gate.pending.Load() != 1 {
			t.Fatalf("admitted %v, pending %d; want true, 1", ds.admitted.Load(), h.gate.pending.Load())
		}
		h.OnPublished(cl, packets.Packet{FixedHeader: packets.FixedHeader{Qos: 1}})
		if h.gate.pending.Load() != 0 {
			t.Fatalf("pending %d after delivery, want 0", h.gate.pending.Load())
		}
	})

	t.Run("a full service that stopped acknowledging no longer holds devices back", func(t *testing.T) {
		h := testHook(DefaultPublishRate)
		h.gate = newGate(10)
		h.gate.stuckAfter = 100 * time.Millisecond
		stalls := 0
		h.gate.onStuck = func(*mqtt.Client) { stalls++ }
		svc := newService(h, 10)
		if h.gate.tryAdmit(&deviceSession{}) {
			t.Fatal("admitted past a full service that acknowledged just now")
		}
		v, _ := h.gate.services.Load(svc)
		v.(*serviceState).lastAck.Store(time.Now().Add(-time.Second).UnixNano())
		for range 3 {
			if !h.gate.tryAdmit(&deviceSession{}) {
				t.Fatal("a service silent for a second still holds publishes")
			}
		}
		if stalls != 1 {
			t.Fatalf("stall reported %d times, want once", stalls)
		}
		// It acknowledges again: it counts again (and a new stall would be
		// reported again).
		h.OnQosComplete(svc, packets.Packet{})
		if h.gate.tryAdmit(&deviceSession{}) {
			t.Fatal("admitted past a full service that acknowledges again")
		}
	})

	t.Run("a session's place is given back on disconnect", func(t *testing.T) {
		h := testHook(DefaultPublishRate)
		h.gate = newGate(10)
		newService(h, 0)
		cl := h.session("dev-2")
		if _, err := h.OnPublish(cl, packets.Packet{FixedHeader: packets.FixedHeader{Qos: 1}, TopicName: "devices/dev-2/telemetry"}); err != nil {
			t.Fatal(err)
		}
		if h.gate.pending.Load() != 1 {
			t.Fatalf("pending %d, want 1", h.gate.pending.Load())
		}
		h.OnDisconnect(cl, nil, false)
		if h.gate.pending.Load() != 0 {
			t.Fatalf("pending %d after disconnect, want 0", h.gate.pending.Load())
		}
	})
}

// A session whose client falls silent is cut off once its keepalive runs
// out and never before: the deadline sessionConn coalesces may fall a
// little later than mochi asks, not earlier, and it still moves while the
// client talks.
func TestKeepaliveDeadline(t *testing.T) {
	e := newBrokerEnv(t, nil)
	id := identity.Device(pkitest.TrustDomain, "dev-ka")
	cert, key := e.fix.Identity(t, id, time.Hour)
	c, err := tls.Dial("tcp", e.addr, &tls.Config{RootCAs: e.fix.Pool(), ServerName: "localhost",
		Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.fix.Issuing.Cert)}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Keepalive 1 s: mochi's deadline is 1 s (1.5 × 1, rounded down)
	// after each packet it reads.
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect:         packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "dev-ka", Keepalive: 1, Clean: true},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	exchange := func(out []byte, want byte) {
		t.Helper()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(out); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 2)
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("waiting for packet type %d: %v", want, err)
		}
		if got[0]>>4 != want {
			t.Fatalf("packet type %d, want %d", got[0]>>4, want)
		}
		if _, err := io.ReadFull(c, make([]byte, got[1])); err != nil {
			t.Fatal(err)
		}
	}
	exchange(buf.Bytes(), packets.Connack)
	// Pings 300 ms apart for 2.4 s, more than twice the deadline: the
	// session stays.
	var last time.Time
	for range 8 {
		time.Sleep(300 * time.Millisecond)
		last = time.Now()
		exchange([]byte{packets.Pingreq << 4, 0}, packets.Pingresp)
	}
	// Silent from here: the gateway closes the connection, no sooner than
	// 1 s after it read the last ping.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	gone := time.Since(last)
	var ne net.Error
	switch {
	case err == nil:
		t.Fatal("the gateway sent a packet to a silent client")
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatalf("session still open %v after the client fell silent with keepalive 1 s", gone)
	case gone < time.Second:
		t.Fatalf("session cut off %v after the last ping, before its keepalive ran out (1 s)", gone)
	}
}
