package broker

import (
	"crypto/tls"
	"net"
	"sync"
	"syscall"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/fleetgate/fleetgate/pkg/identity"
)

// Write queues. mochi gives every client one buffered channel of pending
// writes, sized by one server-wide capability, MaximumClientWritesPending
// (8,192 slots, 64 KiB, by default). A device receives only its own
// commands, so a short queue serves it; a service subscriber receives the
// whole fleet's telemetry and gets a longer one than mochi's default, so a
// burst of QoS 0 telemetry waits instead of being dropped (256 KiB per
// service session; services are few). With 10,000 idle devices mochi's
// default queue alone was 72 % of the gateway's heap.
const (
	DefaultDeviceWriteQueue  = 256
	DefaultServiceWriteQueue = 32768
)

// sessionListener is mochi's TCP listener with two additions per
// connection: the client's identity is read from its certificate once,
// for every hook to use (sessionConn), and the write queue mochi creates
// for the client is sized for its role.
//
// mochi reads MaximumClientWritesPending only when it creates a client,
// which happens at the start of EstablishConnection, before the first read
// of the connection. So each connection sets the capability under qmu and
// releases qmu at its first Read: the one client created meanwhile is its
// own, and no other goroutine reads the field concurrently.
type sessionListener struct {
	*listeners.Net
	caps           *mqtt.Capabilities
	td             string
	device, server int32

	qmu sync.Mutex
}

// Serve accepts clients like listeners.Net, wrapping each connection.
func (l *sessionListener) Serve(establish listeners.EstablishFn) {
	l.Net.Serve(func(id string, c net.Conn) error {
		tc, ok := c.(*tls.Conn)
		if !ok {
			return establish(id, c)
		}
		sc := &sessionConn{Conn: tc, peer: identify(tc, l.td)}
		queue := l.device
		if sc.peer.err == nil && sc.peer.id.Role == identity.RoleService {
			queue = l.server
			// A service's input is acknowledgements of its deliveries:
			// holding deliveries until it has read them all would add
			// latency for nothing.
			if bc, ok := tc.NetConn().(*batchConn); ok {
				bc.writeThrough()
			}
		}
		l.qmu.Lock()
		l.caps.MaximumClientWritesPending = queue
		sc.created = l.qmu.Unlock
		defer sc.clientCreated()
		return establish(id, sc)
	})
}

// sessionConn is a client's TLS connection as mochi sees it: it carries
// the client's identity, releases the listener's queue-size lock at the
// first read and coalesces keepalive deadlines.
type sessionConn struct {
	*tls.Conn
	peer peer
	// created releases the listener's queue-size lock; called once, by
	// the first Read or when establishing ended without one.
	created func()

	dmu      sync.Mutex
	deadline time.Time // the deadline set on Conn; zero: none
}

// maxDeadlineSlack bounds how much later than asked a keepalive deadline
// may fall.
const maxDeadlineSlack = time.Second

// SetDeadline sets the connection's deadline no earlier than t and at
// most a little later. mochi moves it to now + 1.5 × keepalive after every
// packet it reads; re-arming the runtime's timers for each was 4 % of the
// gateway's CPU under QoS 1 load. A deadline already set that is not
// earlier than t and not later than t + slack is kept, so the timers move
// at most once per slack. The slack is 1/16 of the time left until t, at
// most maxDeadlineSlack: a client with a 30 s keepalive is disconnected
// between 45 and 46 s after its last packet instead of at 45 s.
func (c *sessionConn) SetDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if t.IsZero() {
		c.deadline = time.Time{}
		return c.Conn.SetDeadline(t)
	}
	slack := min(time.Until(t)/16, maxDeadlineSlack)
	if !c.deadline.IsZero() && !c.deadline.Before(t) && c.deadline.Sub(t) <= slack {
		return nil
	}
	if slack > 0 {
		t = t.Add(slack)
	}
	c.deadline = t
	return c.Conn.SetDeadline(t)
}

func (c *sessionConn) clientCreated() {
	if f := c.created; f != nil {
		c.created = nil
		f()
	}
}

func (c *sessionConn) Read(p []byte) (int, error) {
	c.clientCreated()
	return c.Conn.Read(p)
}

// maxBatch bounds the bytes a batchConn holds back.
const maxBatch = 32 << 10

// batchConn is a client's TCP connection under TLS. It batches the
// writes made while the session works through input it has already
// received: a device publishing QoS 1 messages in a window gets its
// PUBACKs in one write system call instead of one each (those system
// calls were a quarter of the gateway's CPU per message). The batch goes
// out when TLS next reads from the network (it has no buffered record
// left), when the session's reader is about to wait (publish pacing,
// backpressure: see Flush), when it grows past maxBatch and when the
// connection closes. Writes made while the reader waits for input
// (deliveries to a subscriber that is not talking) go straight out.
//
// Ordering: every write takes wmu, then mu, and either joins the batch or,
// with the batch empty, is written under wmu; a flush takes the batch
// under both. So bytes reach the network in the order they were written.
// The reader never waits on wmu except to flush a batch, which it would
// otherwise have written itself.
type batchConn struct {
	net.Conn
	raw syscall.RawConn // for readReady; nil when Conn has no file descriptor

	wmu sync.Mutex // serializes writes to Conn

	mu       sync.Mutex // guards the fields below
	batching bool       // input arrived; the session is working on it
	through  bool       // never batch (service sessions)
	batch    []byte
	err      error // first write error; later writes fail with it
}

func newBatchConn(c net.Conn) *batchConn {
	bc := &batchConn{Conn: c}
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			bc.raw = raw
		}
	}
	return bc
}

// Read flushes the batch, then reads; with input, writes batch until the
// next Read.
func (c *batchConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	pending := len(c.batch) > 0 && c.err == nil
	c.mu.Unlock()
	if pending {
		// More input already waiting (a device's next publishes of its
		// window): the session goes on working and the batch grows. One
		// non-blocking read decides; under load it saves a write per
		// packet, idle it costs one read that finds nothing.
		if n, ok := readReady(c.raw, p); ok {
			return n, nil
		}
	}
	c.mu.Lock()
	c.batching = false
	c.mu.Unlock()
	if err := c.Flush(); err != nil {
		return 0, err
	}
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.mu.Lock()
		c.batching = !c.through
		c.mu.Unlock()
	}
	return n, err
}

// writeThrough turns batching off for good; what is batched goes out at
// the next read.
func (c *batchConn) writeThrough() {
	c.mu.Lock()
	c.through = true
	c.mu.Unlock()
}

// Write joins the batch while the session works on input, and is written
// at once otherwise.
func (c *batchConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	// A batch left while not batching is about to be flushed (Read waits
	// for wmu): join it, so the order holds.
	if c.batching || len(c.batch) > 0 {
		c.batch = append(c.batch, p...)
		full := len(c.batch) >= maxBatch
		c.mu.Unlock()
		if full {
			return len(p), c.flushLocked()
		}
		return len(p), nil
	}
	c.mu.Unlock()
	n, err := c.Conn.Write(p)
	if err != nil {
		c.fail(err)
	}
	return n, err
}

// Flush writes the batch. The broker's hooks call it before they hold a
// session's reader (pacing, backpressure), so acknowledgements already
// due are not held too.
func (c *batchConn) Flush() error {
	c.mu.Lock()
	empty := len(c.batch) == 0
	err := c.err
	c.mu.Unlock()
	if empty || err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.flushLocked()
}

// flushLocked writes the batch; the caller holds wmu.
func (c *batchConn) flushLocked() error {
	c.mu.Lock()
	b, err := c.batch, c.err
	c.batch = nil
	c.mu.Unlock()
	if len(b) == 0 || err != nil {
		return err
	}
	if _, err := c.Conn.Write(b); err != nil {
		c.fail(err)
		return err
	}
	// Keep a small buffer for the next batch; give big ones back. Appends
	// happen under wmu, which the caller holds: c.batch is still nil.
	if cap(b) <= 256 {
		c.mu.Lock()
		c.batch = b[:0]
		c.mu.Unlock()
	}
	return nil
}

func (c *batchConn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

// closeFlushTimeout bounds the last flush when a connection closes (a TLS
// alert, a DISCONNECT with its reason, acknowledgements).
const closeFlushTimeout = time.Second

// Close writes what is batched, unless a write is stuck (closing is what
// unblocks it), and closes the connection.
func (c *batchConn) Close() error {
	if c.wmu.TryLock() {
		c.mu.Lock()
		pending := len(c.batch) > 0 && c.err == nil
		c.mu.Unlock()
		if pending {
			_ = c.Conn.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
			_ = c.flushLocked()
		}
		c.wmu.Unlock()
	}
	return c.Conn.Close()
}

// flush writes a client's batched writes.
func flush(cl *mqtt.Client) {
	var c net.Conn = cl.Net.Conn
	if sc, ok := c.(*sessionConn); ok {
		c = sc.Conn.NetConn()
	}
	if bc, ok := c.(*batchConn); ok {
		_ = bc.Flush()
	}
}
