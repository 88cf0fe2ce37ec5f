package mqttc_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/firmware-sim/internal/gwtest"
	"github.com/fleetgate/fleetgate/firmware-sim/mqttc"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// inbox collects messages a subscriber receives.
type inbox struct {
	mu   sync.Mutex
	msgs []string
	wake chan struct{}
}

func newInbox() *inbox { return &inbox{wake: make(chan struct{}, 1)} }

func (b *inbox) handle(topic string, payload []byte, _ byte) {
	b.mu.Lock()
	b.msgs = append(b.msgs, topic+" "+string(payload))
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// wait returns once n messages arrived (or fails after 10 s).
func (b *inbox) wait(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		b.mu.Lock()
		got := append([]string(nil), b.msgs...)
		b.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-b.wake:
		case <-deadline:
			t.Fatalf("got %d messages, want %d: %q", len(got), n, got)
		}
	}
}

func dial(t *testing.T, o mqttc.Options) *mqttc.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := mqttc.Dial(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestAgainstGateway(t *testing.T) {
	g := gwtest.Start(t)
	ctx := context.Background()
	box := newInbox()
	svc := dial(t, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleService, "backend")), ClientID: "sub", OnMessage: box.handle})
	if q, err := svc.Subscribe(ctx, "devices/+/telemetry", 1); err != nil || q != 1 {
		t.Fatalf("subscribe = %d, %v; want QoS 1 granted", q, err)
	}

	t.Run("QoS 0 and 1 reach the subscriber, PUBACKs matched", func(t *testing.T) {
		dev := dial(t, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleDevice, "dev-1")), ClientID: "dev-1"})
		if err := dev.Publish(ctx, "devices/dev-1/telemetry", []byte("zero"), 0); err != nil {
			t.Fatal(err)
		}
		if err := dev.Publish(ctx, "devices/dev-1/telemetry", []byte("one"), 1); err != nil {
			t.Fatal(err)
		}
		got := box.wait(t, 2)
		if got[0] != "devices/dev-1/telemetry zero" || got[1] != "devices/dev-1/telemetry one" {
			t.Fatalf("received %q", got)
		}
	})

	t.Run("a window of asynchronous QoS 1 publishes is acknowledged in full", func(t *testing.T) {
		box.mu.Lock()
		box.msgs = nil
		box.mu.Unlock()
		dev := dial(t, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleDevice, "dev-2")), ClientID: "dev-2", MaxInflight: 4})
		const n = 50
		var wg sync.WaitGroup
		var mu sync.Mutex
		var errs []error
		for i := range n {
			wg.Add(1)
			err := dev.PublishAsync(ctx, "devices/dev-2/telemetry", []byte(fmt.Sprint(i)), 1, func(err error) {
				defer wg.Done()
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		wg.Wait()
		if len(errs) > 0 {
			t.Fatalf("%d publishes failed: %v", len(errs), errs[0])
		}
		if got := box.wait(t, n); len(got) != n {
			t.Fatalf("received %d, want %d", len(got), n)
		}
	})

	t.Run("client ID of another device is refused with CONNACK 2", func(t *testing.T) {
		_, err := mqttc.Dial(ctx, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleDevice, "dev-3")), ClientID: "dev-1"})
		var ce *mqttc.ConnackError
		if !errors.As(err, &ce) || ce.Code != 2 {
			t.Fatalf("Dial = %v, want CONNACK 0x02", err)
		}
	})

	t.Run("certificate of a foreign CA is refused in the handshake", func(t *testing.T) {
		foreign := pkitest.New(t)
		cert, key := foreign.Device(t, "dev-4")
		conf := g.ClientTLS(pkitest.TLSCert(cert, key, foreign.Issuing.Cert))
		_, err := mqttc.Dial(ctx, mqttc.Options{Addr: g.MQTTAddr(), TLS: conf, ClientID: "dev-4"})
		if err == nil {
			t.Fatal("Dial succeeded with a foreign certificate")
		}
	})

	t.Run("server-side close is seen with its time", func(t *testing.T) {
		dev := dial(t, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleDevice, "dev-5")), ClientID: "dev-5"})
		// The broker registers a session just after it sends CONNACK.
		for i := 0; !g.Server().Broker().Connected("dev-5"); i++ {
			if i == 500 {
				t.Fatal("broker never listed the session")
			}
			time.Sleep(10 * time.Millisecond)
		}
		before := time.Now()
		if !g.Server().Broker().Disconnect("dev-5") {
			t.Fatal("broker found no session")
		}
		select {
		case <-dev.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("close not seen")
		}
		if !errors.Is(dev.Err(), io.EOF) {
			t.Fatalf("Err = %v, want EOF", dev.Err())
		}
		if at := dev.ClosedAt(); at.Before(before) {
			t.Fatalf("ClosedAt %v before the disconnect at %v", at, before)
		}
		if err := dev.Publish(ctx, "devices/dev-5/telemetry", []byte("x"), 1); err == nil {
			t.Fatal("publish on a closed session succeeded")
		}
	})

	t.Run("publish outside the ACL ends the session", func(t *testing.T) {
		dev := dial(t, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleDevice, "dev-6")), ClientID: "dev-6"})
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := dev.Publish(pctx, "devices/dev-1/telemetry", []byte("spoof"), 1); err == nil {
			t.Fatal("publish to another device's topic was acknowledged")
		}
	})

	t.Run("dials from the given source address", func(t *testing.T) {
		dev := dial(t, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleDevice, "dev-7")), ClientID: "dev-7",
			LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 3, 9)}})
		if ip := dev.LocalAddr().(*net.TCPAddr).IP; !ip.Equal(net.IPv4(127, 0, 3, 9)) {
			t.Fatalf("source %v, want 127.0.3.9", ip)
		}
		if !dev.ConnectionState().HandshakeComplete {
			t.Fatal("no TLS state")
		}
	})

	t.Run("local Disconnect ends with ErrClosed", func(t *testing.T) {
		dev := dial(t, mqttc.Options{Addr: g.MQTTAddr(), TLS: g.ClientTLS(g.Cert(identity.RoleDevice, "dev-8")), ClientID: "dev-8"})
		if err := dev.Disconnect(); err != nil {
			t.Fatal(err)
		}
		<-dev.Done()
		if !errors.Is(dev.Err(), mqttc.ErrClosed) {
			t.Fatalf("Err = %v, want ErrClosed", dev.Err())
		}
	})
}

// fakeBroker accepts one plain-TCP connection, answers CONNECT with code
// and then runs script.
func fakeBroker(t *testing.T, code byte, script func(net.Conn, *bufio.Reader)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		if _, err := readPacket(r); err != nil {
			return
		}
		ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ReasonCode: code}
		var buf bytes.Buffer
		_ = ack.ConnackEncode(&buf)
		_, _ = c.Write(buf.Bytes())
		if script != nil {
			script(c, r)
		}
		_, _ = io.Copy(io.Discard, r)
	}()
	return l.Addr().String()
}

// readPacket reads one raw packet.
func readPacket(r *bufio.Reader) ([]byte, error) {
	hb, err := r.ReadByte()
	if err != nil {
		return nil, err
	}
	n, _, err := packets.DecodeLength(r)
	if err != nil {
		return nil, err
	}
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	return append([]byte{hb}, body...), err
}

func TestProtocol(t *testing.T) {
	ctx := context.Background()
	t.Run("CONNACK refusal is a ConnackError", func(t *testing.T) {
		addr := fakeBroker(t, 5, nil)
		_, err := mqttc.Dial(ctx, mqttc.Options{Addr: addr, ClientID: "x"})
		var ce *mqttc.ConnackError
		if !errors.As(err, &ce) || ce.Code != 5 {
			t.Fatalf("Dial = %v, want CONNACK 0x05", err)
		}
	})
	t.Run("unexpected packet is a protocol error", func(t *testing.T) {
		addr := fakeBroker(t, 0, func(c net.Conn, _ *bufio.Reader) {
			_, _ = c.Write([]byte{packets.Connect << 4, 0})
		})
		c := dial(t, mqttc.Options{Addr: addr, ClientID: "x"})
		<-c.Done()
		if !errors.Is(c.Err(), mqttc.ErrProtocol) {
			t.Fatalf("Err = %v, want ErrProtocol", c.Err())
		}
	})
	t.Run("keepalive sends PINGREQ and gives up without PINGRESP", func(t *testing.T) {
		pinged := make(chan struct{}, 1)
		addr := fakeBroker(t, 0, func(_ net.Conn, r *bufio.Reader) {
			if p, err := readPacket(r); err == nil && p[0] == packets.Pingreq<<4 {
				pinged <- struct{}{}
			}
		})
		c := dial(t, mqttc.Options{Addr: addr, ClientID: "x", Keepalive: time.Second})
		select {
		case <-pinged:
		case <-time.After(10 * time.Second):
			t.Fatal("no PINGREQ")
		}
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("unanswered PINGREQ did not end the session")
		}
		if !errors.Is(c.Err(), mqttc.ErrKeepalive) {
			t.Fatalf("Err = %v, want ErrKeepalive", c.Err())
		}
	})
	t.Run("QoS 1 publish fails when the connection drops before PUBACK", func(t *testing.T) {
		addr := fakeBroker(t, 0, func(c net.Conn, r *bufio.Reader) {
			_, _ = readPacket(r)
			c.Close()
		})
		c := dial(t, mqttc.Options{Addr: addr, ClientID: "x"})
		if err := c.Publish(ctx, "t", []byte("p"), 1); err == nil {
			t.Fatal("publish succeeded without PUBACK")
		}
	})
	t.Run("incoming QoS 1 message is acknowledged", func(t *testing.T) {
		acked := make(chan []byte, 1)
		addr := fakeBroker(t, 0, func(c net.Conn, r *bufio.Reader) {
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "a/b", PacketID: 7, Payload: []byte("hi"), ProtocolVersion: 4}
			var buf bytes.Buffer
			_ = pk.PublishEncode(&buf)
			_, _ = c.Write(buf.Bytes())
			if p, err := readPacket(r); err == nil {
				acked <- p
			}
		})
		box := newInbox()
		dial(t, mqttc.Options{Addr: addr, ClientID: "x", OnMessage: box.handle})
		if got := box.wait(t, 1); got[0] != "a/b hi" {
			t.Fatalf("received %q", got)
		}
		select {
		case p := <-acked:
			if !bytes.Equal(p, []byte{packets.Puback << 4, 0, 7}) { // type, packet ID (length consumed)
				t.Fatalf("ack % x, want PUBACK for packet 7", p)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no PUBACK")
		}
	})
	t.Run("tls handshake failure is reported", func(t *testing.T) {
		addr := fakeBroker(t, 0, nil)
		_, err := mqttc.Dial(ctx, mqttc.Options{Addr: addr, ClientID: "x", TLS: &tls.Config{ServerName: "localhost"}, ConnectTimeout: 2 * time.Second})
		if err == nil {
			t.Fatal("TLS to a plain-TCP server succeeded")
		}
	})
}
