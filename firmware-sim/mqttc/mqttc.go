// Package mqttc is a small MQTT 3.1.1 client for simulated devices: tens of
// thousands of connections in one process, each costing one reader
// goroutine, a few small buffers and an idle timer.
//
// It speaks CONNECT/CONNACK, PUBLISH at QoS 0 and 1 (PUBACKs matched by
// packet ID, with a bounded in-flight window), SUBSCRIBE/SUBACK, PINGREQ
// keepalive and DISCONNECT. Packets are encoded and decoded with mochi-mqtt's
// packets package. Writers share the connection under a mutex (no writer
// goroutine); the reader batches the PUBACKs it owes for incoming QoS 1
// messages and flushes them when its buffer runs dry.
//
// It has no reconnect logic, no persistence and no QoS 2: callers (the
// fleet) decide what a device does when its connection ends.
package mqttc

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Defaults for Options.
const (
	DefaultKeepalive      = 60 * time.Second
	DefaultConnectTimeout = 10 * time.Second
	DefaultWriteTimeout   = 10 * time.Second
	DefaultMaxInflight    = 32
	DefaultReadBufferSize = 1024
	DefaultMaxPacketSize  = 1 << 20
)

// protocolVersion is MQTT 3.1.1.
const protocolVersion = 4

// Errors.
var (
	// ErrClosed: the connection was closed by this side.
	ErrClosed = errors.New("mqtt connection closed")
	// ErrKeepalive: the server answered no PINGREQ within the keepalive.
	ErrKeepalive = errors.New("mqtt keepalive timeout")
	// ErrProtocol: the server sent something MQTT 3.1.1 does not allow.
	ErrProtocol = errors.New("mqtt protocol violation")
	// ErrNoConnack: the server ended the connection after the TLS
	// handshake without answering CONNECT. A TLS 1.3 server that rejects
	// the client certificate does so after the client has finished its
	// side of the handshake and sent CONNECT, so the client often sees a
	// reset instead of the alert.
	ErrNoConnack = errors.New("connection closed before CONNACK")
)

// ConnackError is a CONNECT refused by the server with a CONNACK return code.
type ConnackError struct{ Code byte }

// Error names the refusal.
func (e *ConnackError) Error() string {
	names := map[byte]string{
		1: "unacceptable protocol version",
		2: "identifier rejected",
		3: "server unavailable",
		4: "bad user name or password",
		5: "not authorized",
	}
	if n, ok := names[e.Code]; ok {
		return fmt.Sprintf("connection refused: %s (CONNACK 0x%02x)", n, e.Code)
	}
	return fmt.Sprintf("connection refused: CONNACK 0x%02x", e.Code)
}

// Options configures a connection.
type Options struct {
	// Addr is the server's host:port.
	Addr string
	// TLS configures the TLS client; nil dials plain TCP.
	TLS *tls.Config
	// LocalAddr is the source address to dial from (e.g. 127.0.0.7:0), so
	// many connections spread over many source addresses and do not run
	// out of ephemeral ports. Nil lets the kernel choose.
	LocalAddr *net.TCPAddr
	// ClientID of the session.
	ClientID string
	// KeepSession asks the server to keep the session after disconnect
	// (clean session off). The default is a clean session.
	KeepSession bool
	// Keepalive is the MQTT keepalive; PINGREQ goes out when nothing else
	// was written for half of it. Default DefaultKeepalive.
	Keepalive time.Duration
	// ConnectTimeout bounds dial, TLS handshake and CONNACK.
	ConnectTimeout time.Duration
	// WriteTimeout bounds every write.
	WriteTimeout time.Duration
	// MaxInflight bounds QoS 1 publishes and subscribes awaiting their
	// acknowledgement; further ones wait.
	MaxInflight int
	// ReadBufferSize of the reader; raise it for a connection that
	// receives much (a subscriber).
	ReadBufferSize int
	// MaxPacketSize bounds incoming packets.
	MaxPacketSize int
	// OnMessage receives every PUBLISH from the server on the reader
	// goroutine. It must not block and must not keep payload.
	OnMessage func(topic string, payload []byte, qos byte)
}

func (o *Options) setDefaults() {
	if o.Keepalive <= 0 {
		o.Keepalive = DefaultKeepalive
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = DefaultConnectTimeout
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = DefaultWriteTimeout
	}
	if o.MaxInflight <= 0 {
		o.MaxInflight = DefaultMaxInflight
	}
	if o.MaxInflight > 65535 {
		o.MaxInflight = 65535
	}
	if o.ReadBufferSize <= 0 {
		o.ReadBufferSize = DefaultReadBufferSize
	}
	if o.MaxPacketSize <= 0 {
		o.MaxPacketSize = DefaultMaxPacketSize
	}
}

// pending is a request awaiting its acknowledgement.
type pending struct {
	kind byte // packets.Puback or packets.Suback
	done func(codes []byte, err error)
}

// Conn is an open MQTT session.
type Conn struct {
	opts Options
	conn net.Conn
	tls  *tls.Conn // nil for plain TCP

	wmu  sync.Mutex
	wbuf bytes.Buffer

	// slots is the in-flight window: a token per acknowledged request.
	slots chan struct{}
	mu    sync.Mutex
	ids   map[uint16]pending
	next  uint16
	shut  bool // no more requests: the connection has ended

	lastWrite atomic.Int64 // unix nanos
	lastRead  atomic.Int64
	pingSent  atomic.Int64 // unix nanos of an unanswered PINGREQ, 0 when none
	timer     *time.Timer

	closing   atomic.Bool
	closeOnce sync.Once
	done      chan struct{}
	err       error     // set before done closes
	closedAt  time.Time // set before done closes
}

// Dial connects, completes the TLS handshake and the CONNECT/CONNACK
// exchange, and starts the reader. A refusal is a *ConnackError or, for a
// certificate the server rejects in the handshake, the TLS alert the server
// sent.
func Dial(ctx context.Context, o Options) (*Conn, error) {
	o.setDefaults()
	ctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	d := net.Dialer{}
	if o.LocalAddr != nil {
		d.LocalAddr = o.LocalAddr
	}
	raw, err := d.DialContext(ctx, "tcp", o.Addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", o.Addr, err)
	}
	c := &Conn{opts: o, conn: raw, slots: make(chan struct{}, o.MaxInflight), done: make(chan struct{})}
	if o.TLS != nil {
		c.tls = tls.Client(raw, o.TLS)
		if err := c.tls.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, fmt.Errorf("tls handshake with %s: %w", o.Addr, err)
		}
		c.conn = c.tls
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Now()) })
	br := bufio.NewReaderSize(c.conn, o.ReadBufferSize)
	err = c.connect(br)
	stop()
	if err != nil {
		c.conn.Close()
		if ctx.Err() != nil && !errors.As(err, new(*ConnackError)) {
			return nil, fmt.Errorf("mqtt connect to %s: %w", o.Addr, ctx.Err())
		}
		return nil, fmt.Errorf("mqtt connect to %s: %w", o.Addr, err)
	}
	_ = c.conn.SetDeadline(time.Time{})
	now := time.Now().UnixNano()
	c.lastRead.Store(now)
	c.lastWrite.Store(now)
	c.timer = time.AfterFunc(o.Keepalive/2, c.keepalive)
	go c.readLoop(br)
	return c, nil
}

func (c *Conn) connect(br *bufio.Reader) error {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: protocolVersion,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			ClientIdentifier: c.opts.ClientID,
			Keepalive:        uint16(min(c.opts.Keepalive/time.Second, 65535)),
			Clean:            !c.opts.KeepSession,
		},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		return fmt.Errorf("encode CONNECT: %w", err)
	}
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		if timeout(err) {
			return fmt.Errorf("send CONNECT: %w", err)
		}
		// The server may have refused the certificate and closed: its
		// alert can still be waiting to be read, and says more.
		_ = c.conn.SetReadDeadline(time.Now().Add(time.Second))
		if _, rerr := br.ReadByte(); rerr != nil && strings.Contains(rerr.Error(), "remote error") {
			err = rerr
		}
		return fmt.Errorf("%w: send CONNECT: %w", ErrNoConnack, err)
	}
	fh, body, err := readPacket(br, nil, c.opts.MaxPacketSize)
	if err != nil {
		if timeout(err) || errors.Is(err, ErrProtocol) {
			return fmt.Errorf("read CONNACK: %w", err)
		}
		return fmt.Errorf("%w: %w", ErrNoConnack, err)
	}
	if fh.Type != packets.Connack {
		return fmt.Errorf("%w: first packet is %s, want CONNACK", ErrProtocol, packets.PacketNames[fh.Type])
	}
	ack := packets.Packet{FixedHeader: fh, ProtocolVersion: protocolVersion}
	if err := ack.ConnackDecode(body); err != nil {
		return fmt.Errorf("%w: CONNACK: %v", ErrProtocol, err)
	}
	if ack.ReasonCode != 0 {
		return &ConnackError{Code: ack.ReasonCode}
	}
	return nil
}

func timeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// readPacket reads one packet into buf (grown as needed) and returns its
// fixed header and body.
func readPacket(br *bufio.Reader, buf []byte, maxSize int) (packets.FixedHeader, []byte, error) {
	var fh packets.FixedHeader
	hb, err := br.ReadByte()
	if err != nil {
		return fh, nil, err
	}
	if err := fh.Decode(hb); err != nil {
		return fh, nil, fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	n, _, err := packets.DecodeLength(br)
	if err != nil {
		return fh, nil, fmt.Errorf("%w: remaining length: %v", ErrProtocol, err)
	}
	if n > maxSize {
		return fh, nil, fmt.Errorf("%w: packet of %d bytes exceeds %d", ErrProtocol, n, maxSize)
	}
	fh.Remaining = n
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(br, buf); err != nil {
		return fh, nil, err
	}
	return fh, buf, nil
}

func (c *Conn) readLoop(br *bufio.Reader) {
	var (
		buf  []byte
		acks []byte // PUBACKs owed, flushed when the read buffer is empty
		err  error
	)
	for {
		var (
			fh   packets.FixedHeader
			body []byte
		)
		fh, body, err = readPacket(br, buf, c.opts.MaxPacketSize)
		if err != nil {
			break
		}
		if cap(body) > cap(buf) {
			buf = body[:0]
		}
		c.lastRead.Store(time.Now().UnixNano())
		pk := packets.Packet{FixedHeader: fh, ProtocolVersion: protocolVersion}
		switch fh.Type {
		case packets.Publish:
			if err = pk.PublishDecode(body); err != nil {
				err = fmt.Errorf("%w: PUBLISH: %v", ErrProtocol, err)
				break
			}
			if c.opts.OnMessage != nil {
				c.opts.OnMessage(pk.TopicName, pk.Payload, fh.Qos)
			}
			if fh.Qos > 0 {
				acks = append(acks, packets.Puback<<4, 2, byte(pk.PacketID>>8), byte(pk.PacketID))
			}
		case packets.Puback:
			if err = pk.PubackDecode(body); err != nil {
				err = fmt.Errorf("%w: PUBACK: %v", ErrProtocol, err)
				break
			}
			c.complete(pk.PacketID, packets.Puback, nil)
		case packets.Suback:
			if err = pk.SubackDecode(body); err != nil {
				err = fmt.Errorf("%w: SUBACK: %v", ErrProtocol, err)
				break
			}
			c.complete(pk.PacketID, packets.Suback, bytes.Clone(pk.ReasonCodes))
		case packets.Pingresp:
			c.pingSent.Store(0)
		case packets.Disconnect:
			err = io.EOF // MQTT 5 servers may say goodbye; 3.1.1 ones just close
		default:
			err = fmt.Errorf("%w: unexpected %s", ErrProtocol, packets.PacketNames[fh.Type])
		}
		if err != nil {
			break
		}
		if len(acks) > 0 && br.Buffered() == 0 {
			if err = c.write(acks); err != nil {
				break
			}
			acks = acks[:0]
		}
	}
	c.shutdown(err)
}

// shutdown records why and when the connection ended, closes it and fails
// every request still waiting.
func (c *Conn) shutdown(cause error) {
	c.closeOnce.Do(func() {
		c.closedAt = time.Now()
		if c.closing.Load() {
			cause = ErrClosed
		} else if cause == nil {
			cause = io.EOF
		}
		c.err = cause
		if c.timer != nil {
			c.timer.Stop()
		}
		_ = c.conn.Close()
		c.mu.Lock()
		waiting := c.ids
		c.ids = nil
		c.shut = true
		c.mu.Unlock()
		for _, p := range waiting {
			p.done(nil, cause)
		}
		close(c.done)
	})
}

// complete finishes the request with packet ID id.
func (c *Conn) complete(id uint16, kind byte, codes []byte) {
	c.mu.Lock()
	p, ok := c.ids[id]
	if ok && p.kind == kind {
		delete(c.ids, id)
	}
	c.mu.Unlock()
	if ok && p.kind == kind {
		<-c.slots
		p.done(codes, nil)
	}
}

// register reserves an in-flight slot and a packet ID for a request.
func (c *Conn) register(ctx context.Context, kind byte, done func([]byte, error)) (uint16, error) {
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-c.done:
		return 0, c.err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.shut {
		<-c.slots
		return 0, c.closeErr()
	}
	if c.ids == nil {
		c.ids = make(map[uint16]pending, min(c.opts.MaxInflight, 64))
	}
	for {
		c.next++
		if c.next == 0 {
			c.next = 1
		}
		if _, used := c.ids[c.next]; !used {
			break
		}
	}
	c.ids[c.next] = pending{kind: kind, done: done}
	return c.next, nil
}

// forget drops a registered request whose packet never went out.
func (c *Conn) forget(id uint16) {
	c.mu.Lock()
	_, ok := c.ids[id]
	delete(c.ids, id)
	c.mu.Unlock()
	if ok {
		<-c.slots
	}
}

// write sends raw bytes under the write lock.
func (c *Conn) write(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked(b)
}

func (c *Conn) writeLocked(b []byte) error {
	_ = c.conn.SetWriteDeadline(time.Now().Add(c.opts.WriteTimeout))
	if _, err := c.conn.Write(b); err != nil {
		c.shutdown(err)
		return c.closeErr()
	}
	c.lastWrite.Store(time.Now().UnixNano())
	return nil
}

// encodeAndWrite encodes pk into the shared write buffer and sends it.
func (c *Conn) encodeAndWrite(encode func(*bytes.Buffer) error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf.Reset()
	if err := encode(&c.wbuf); err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	err := c.writeLocked(c.wbuf.Bytes())
	if c.wbuf.Cap() > 64<<10 {
		c.wbuf = bytes.Buffer{} // do not keep a large payload's buffer per idle device
	}
	return err
}

// Publish sends a message. At QoS 0 it returns once the packet is written;
// at QoS 1 once the server's PUBACK arrives (or ctx ends, or the connection
// does).
func (c *Conn) Publish(ctx context.Context, topic string, payload []byte, qos byte) error {
	if qos == 0 {
		return c.PublishAsync(ctx, topic, payload, 0, nil)
	}
	res := make(chan error, 1)
	if err := c.PublishAsync(ctx, topic, payload, qos, func(err error) { res <- err }); err != nil {
		return err
	}
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// PublishAsync writes a message and returns; at QoS 1, done runs (on the
// reader goroutine, so it must not block) when the PUBACK arrives or the
// connection ends. It waits for a free in-flight slot first. When it
// returns an error, done is not called.
func (c *Conn) PublishAsync(ctx context.Context, topic string, payload []byte, qos byte, done func(error)) error {
	if qos > 1 {
		return fmt.Errorf("publish: QoS %d not supported", qos)
	}
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: qos},
		ProtocolVersion: protocolVersion,
		TopicName:       topic,
		Payload:         payload,
	}
	if qos == 1 {
		id, err := c.register(ctx, packets.Puback, func(_ []byte, err error) {
			if done != nil {
				done(err)
			}
		})
		if err != nil {
			return err
		}
		pk.PacketID = id
		if err := c.encodeAndWrite(pk.PublishEncode); err != nil {
			c.forget(id)
			return fmt.Errorf("publish %s: %w", topic, err)
		}
		return nil
	}
	if err := c.encodeAndWrite(pk.PublishEncode); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// Subscribe subscribes to filter at qos and returns the granted QoS (0x80
// for a refusal, which is also returned as an error).
func (c *Conn) Subscribe(ctx context.Context, filter string, qos byte) (byte, error) {
	res := make(chan []byte, 1)
	errc := make(chan error, 1)
	id, err := c.register(ctx, packets.Suback, func(codes []byte, err error) {
		if err != nil {
			errc <- err
			return
		}
		res <- codes
	})
	if err != nil {
		return 0, err
	}
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		ProtocolVersion: protocolVersion,
		PacketID:        id,
		Filters:         packets.Subscriptions{{Filter: filter, Qos: qos}},
	}
	if err := c.encodeAndWrite(pk.SubscribeEncode); err != nil {
		c.forget(id)
		return 0, fmt.Errorf("subscribe %s: %w", filter, err)
	}
	select {
	case codes := <-res:
		if len(codes) != 1 {
			return 0, fmt.Errorf("subscribe %s: %w: SUBACK with %d codes", filter, ErrProtocol, len(codes))
		}
		if codes[0] >= 0x80 {
			return codes[0], fmt.Errorf("subscribe %s: refused (SUBACK 0x%02x)", filter, codes[0])
		}
		return codes[0], nil
	case err := <-errc:
		return 0, fmt.Errorf("subscribe %s: %w", filter, err)
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// keepalive runs on a timer: it sends PINGREQ when nothing was written for
// half the keepalive and closes the connection when a PINGREQ stays
// unanswered for a whole keepalive.
func (c *Conn) keepalive() {
	select {
	case <-c.done:
		return
	default:
	}
	now := time.Now()
	half := c.opts.Keepalive / 2
	if sent := c.pingSent.Load(); sent != 0 && now.Sub(time.Unix(0, sent)) >= c.opts.Keepalive {
		c.shutdown(ErrKeepalive)
		return
	}
	if now.Sub(time.Unix(0, c.lastWrite.Load())) >= half && c.pingSent.Load() == 0 {
		c.pingSent.Store(now.UnixNano())
		if err := c.write([]byte{packets.Pingreq << 4, 0}); err != nil {
			return
		}
	}
	c.timer.Reset(half)
}

// Disconnect sends DISCONNECT and closes the connection.
func (c *Conn) Disconnect() error {
	select {
	case <-c.done:
		return nil
	default:
	}
	c.closing.Store(true)
	err := c.write([]byte{packets.Disconnect << 4, 0})
	c.shutdown(ErrClosed)
	return err
}

// Close closes the connection without DISCONNECT (the server sees a lost
// connection).
func (c *Conn) Close() error {
	c.closing.Store(true)
	c.shutdown(ErrClosed)
	return nil
}

// closeErr waits for the end of a shutdown in progress and returns its
// cause.
func (c *Conn) closeErr() error {
	<-c.done
	return c.err
}

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is why the connection ended: ErrClosed when this side closed it,
// io.EOF when the server closed it; nil while it is open.
func (c *Conn) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// ClosedAt is when the connection was seen to end (zero while open). For a
// server-side close it is the moment the reader saw it.
func (c *Conn) ClosedAt() time.Time {
	select {
	case <-c.done:
		return c.closedAt
	default:
		return time.Time{}
	}
}

// ConnectionState returns the TLS state (zero for plain TCP).
func (c *Conn) ConnectionState() tls.ConnectionState {
	if c.tls == nil {
		return tls.ConnectionState{}
	}
	return c.tls.ConnectionState()
}

// LocalAddr is the connection's source address.
func (c *Conn) LocalAddr() net.Addr { return c.conn.LocalAddr() }
