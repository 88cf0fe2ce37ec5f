package e2e

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/agent/spool"
)

// consumer is a backend service that reads telemetry at QoS 1 with a
// persistent session (clean session off, fixed client ID) and records every
// sequence number it receives. Its connection dies with the gateway;
// reconnect subscribes again (the gateway keeps sessions in memory only).
type consumer struct {
	g                 *gateway
	cert              tls.Certificate
	clientID, filter  string
	mu                sync.Mutex
	client            paho.Client
	got               map[uint64][][]byte // payloads per seq
	maxSeq            uint64
	dropped           uint64
	newest            time.Time // newest "time" field seen
	firstSeen, copies int
}

func newConsumer(t *testing.T, g *gateway, certFile, keyFile, clientID, filter string) *consumer {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	c := &consumer{g: g, cert: cert, clientID: clientID, filter: filter, got: map[uint64][][]byte{}}
	c.connect(t)
	t.Cleanup(func() {
		c.mu.Lock()
		cl := c.client
		c.mu.Unlock()
		cl.Disconnect(100)
	})
	return c
}

// connect (re)connects and subscribes at QoS 1.
func (c *consumer) connect(t *testing.T) {
	t.Helper()
	opts := paho.NewClientOptions().AddBroker("ssl://" + c.g.mqttAddr()).SetClientID(c.clientID).
		SetTLSConfig(&tls.Config{RootCAs: c.g.pool(t), Certificates: []tls.Certificate{c.cert}, MinVersion: tls.VersionTLS12}).
		SetProtocolVersion(4).SetCleanSession(false).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).
		SetOrderMatters(false)
	cl := paho.NewClient(opts)
	if tok := cl.Connect(); !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
		t.Fatalf("consumer connect: %v", tok.Error())
	}
	tok := cl.Subscribe(c.filter, 1, c.record)
	if !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
		t.Fatalf("consumer subscribe: %v", tok.Error())
	}
	c.mu.Lock()
	c.client = cl
	c.mu.Unlock()
}

func (c *consumer) record(_ paho.Client, m paho.Message) {
	var msg piTelemetry
	if err := json.Unmarshal(m.Payload(), &msg); err != nil || msg.Seq == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.got[msg.Seq]) == 0 {
		c.firstSeen++
	} else {
		c.copies++
	}
	c.got[msg.Seq] = append(c.got[msg.Seq], append([]byte(nil), m.Payload()...))
	c.maxSeq = max(c.maxSeq, msg.Seq)
	c.dropped = max(c.dropped, msg.SpoolDropped)
	if msg.Time.After(c.newest) {
		c.newest = msg.Time
	}
}

// missing lists the numbers in 1..upTo not received.
func (c *consumer) missing(upTo uint64) []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []uint64
	for s := uint64(1); s <= upTo; s++ {
		if len(c.got[s]) == 0 {
			out = append(out, s)
		}
	}
	return out
}

func (c *consumer) max() (uint64, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.maxSeq, c.newest
}

// TestOutageLosesNoTelemetry: an agent publishes every 100 ms; the
// gateway goes away for 20 s and comes back on the same ports and data;
// meanwhile the agent is killed with SIGKILL and started again. The
// consumer must receive every sequence number the agent ever assigned
// (duplicates are allowed and must be identical copies).
//
// Where messages could be lost, and why they are not:
//   - while the gateway is down the agent spools (bbolt, fsync) and keeps
//     every message until a PUBACK;
//   - SIGKILL: a message is on disk before it is sent; numbers come from
//     the spool, so the restarted agent goes on without reuse;
//   - the consumer is offline with the gateway, and the restarted gateway
//     has no session for it: the consumer must subscribe again before the
//     agent drains. The test orders that by freezing the agent (SIGSTOP)
//     across the gateway's start and the consumer's resubscription.
//   - the gateway PUBACKs a message before it hands it to subscribers, so
//     a message in that window when the gateway stops is the gateway's to
//     lose; the test stops the gateway between publishes, where the window
//     is microseconds wide.
func TestOutageLosesNoTelemetry(t *testing.T) {
	if testing.Short() {
		t.Skip("takes about a minute")
	}
	testStart := time.Now()
	g := newGateway(t)
	g.start(t)
	svcDir := t.TempDir()
	g.prov(t, "cert", "issue", "--role", "service", "--name", "ingest", "--out", svcDir)
	const id = "sensor-outage"
	cons := newConsumer(t, g, filepath.Join(svcDir, "ingest.crt"), filepath.Join(svcDir, "ingest.key"), "ingest-1", "devices/"+id+"/telemetry")

	token := lastLine(g.prov(t, "token", "create", "--device-id", id))
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "state")
	args := append([]string{"run", "--token-file", tokenFile, "--interval", "100ms"}, g.agentArgs(id, state)...)
	agent := start(t, "agent", args...)

	waitFor(t, 60*time.Second, "20 messages before the outage", func() bool { n, _ := cons.max(); return n >= 20 })
	before, _ := cons.max()

	// Outage.
	down := time.Now()
	g.proc.stop(10 * time.Second)
	if code := g.proc.wait(t, time.Second); code != 0 {
		t.Fatalf("gateway exit code %d", code)
	}
	time.Sleep(7 * time.Second)
	if err := agent.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	agent.wait(t, 10*time.Second)
	agent = start(t, "agent", args...)
	time.Sleep(time.Until(down.Add(20 * time.Second)))

	// Back: freeze the agent, start the gateway, resubscribe, thaw.
	if err := agent.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	g.start(t)
	cons.connect(t)
	resumed := time.Now()
	if err := agent.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}

	// Drained: no number below the newest is missing (the spool drains
	// oldest first) and the newest is fresh, so the backlog (which also
	// holds what was made after the thaw, until the agent's reconnect
	// backoff let it in) is through. Freshness here decides only when to
	// stop waiting; what counts is checked against the spool below.
	waitFor(t, 90*time.Second, "the backlog, then live telemetry", func() bool {
		n, newest := cons.max()
		return newest.After(resumed) && time.Since(newest) < time.Second && len(cons.missing(n)) == 0
	})
	drained := time.Since(resumed)

	// Stop the agent and compare with every number it assigned: each was
	// received or is still in its spool (made after the last receipt).
	agent.stop(10 * time.Second)
	if code := agent.wait(t, time.Second); code != 0 {
		t.Fatalf("agent exit code %d after SIGTERM", code)
	}
	st, kept, err := spool.ReadStats(filepath.Join(state, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	inSpool := map[uint64]bool{}
	for _, s := range kept {
		inSpool[s] = true
	}
	var lost []uint64
	for _, s := range cons.missing(st.NextSeq - 1) {
		if !inSpool[s] {
			lost = append(lost, s)
		}
	}
	if len(lost) > 0 {
		t.Fatalf("lost %d of %d messages: %v", len(lost), st.NextSeq-1, lost)
	}
	// Left in the spool: what was made or in flight in the last moments.
	if len(kept) > 100 {
		t.Errorf("%d messages still in the spool at stop: the backlog did not drain", len(kept))
	}
	cons.mu.Lock()
	defer cons.mu.Unlock()
	for seq, copies := range cons.got {
		for _, p := range copies[1:] {
			if !bytes.Equal(p, copies[0]) {
				t.Errorf("seq %d arrived with different contents: a number was reused\n%s\n%s", seq, copies[0], p)
			}
		}
	}
	if cons.dropped != 0 {
		t.Errorf("spool_dropped %d: the spool should hold a 20 s outage", cons.dropped)
	}
	t.Logf("%d messages assigned (%d before the outage), %d received once, %d duplicate copies, %d unsent at stop; "+
		"backlog drained %v after the thaw; test took %v",
		st.NextSeq-1, before, cons.firstSeen, cons.copies, len(kept), drained.Round(10*time.Millisecond), time.Since(testStart).Round(time.Second))
}

// TestAgentFloodThroughput measures the end-to-end telemetry rate one
// agent sustains; it runs only when FLEETGATE_FLOOD=N asks for N messages:
//
//	FLEETGATE_FLOOD=20000 go test -run TestAgentFloodThroughput -v ./gateway/e2e/
//
// A local program writes N lines into the agent's local socket as fast as
// the agent takes them; each is spooled with fsync, published at QoS 1
// with up to --max-inflight unacknowledged, and deleted on PUBACK; the
// clock stops when a service subscriber has received all N. The gateway's
// per-session publish rate limit is turned off where the gateway has one,
// so the agent's own limit shows. (A measurement, not a pass/fail check.)
func TestAgentFloodThroughput(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("FLEETGATE_FLOOD"))
	if n <= 0 {
		t.Skip("set FLEETGATE_FLOOD=N to measure with N messages")
	}
	var extra []string
	if out, errOut, _ := runCode(t, "gateway", "--help"); strings.Contains(out+errOut, "mqtt-publish-rate") {
		extra = append(extra, "--mqtt-publish-rate", "off")
	}
	g := newGateway(t, extra...)
	g.start(t)
	svcDir := t.TempDir()
	g.prov(t, "cert", "issue", "--role", "service", "--name", "bench", "--out", svcDir)
	const id = "sensor-flood"
	token := lastLine(g.prov(t, "token", "create", "--device-id", id))

	cert, err := tls.LoadX509KeyPair(filepath.Join(svcDir, "bench.crt"), filepath.Join(svcDir, "bench.key"))
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu       sync.Mutex
		received = map[uint64]bool{}
		done     = make(chan struct{})
	)
	cl := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + g.mqttAddr()).SetClientID("bench").
		SetTLSConfig(&tls.Config{RootCAs: g.pool(t), Certificates: []tls.Certificate{cert}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetOrderMatters(false))
	if tok := cl.Connect(); !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	defer cl.Disconnect(100)
	tok := cl.Subscribe("devices/"+id+"/telemetry/#", 1, func(_ paho.Client, m paho.Message) {
		var msg piTelemetry
		if json.Unmarshal(m.Payload(), &msg) != nil || msg.Local == nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if !received[msg.Seq] {
			received[msg.Seq] = true
			if len(received) == n {
				close(done)
			}
		}
	})
	if !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}

	sockDir, err := os.MkdirTemp("", "fg-flood")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "t.sock")
	state := filepath.Join(t.TempDir(), "state")
	// A long interval keeps the periodic messages out of the way.
	agent := start(t, "agent", append([]string{"run", "--token", token, "--interval", "1h", "--local-socket", sock,
		"--spool-max-messages", "1000000", "--spool-max", "256MiB"}, g.agentArgs(id, state)...)...)
	waitFor(t, 60*time.Second, "enrollment", func() bool {
		_, err := os.Stat(filepath.Join(state, "device.crt"))
		return err == nil
	})
	waitFor(t, 30*time.Second, "the local socket", func() bool { _, err := os.Stat(sock); return err == nil })
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	line := []byte(`{"temp_c":21.5,"humidity":0.43,"sensor":"bme280"}` + "\n")

	began := time.Now()
	for range n {
		if _, err := c.Write(line); err != nil {
			t.Fatal(err)
		}
	}
	written := time.Since(began)
	select {
	case <-done:
	case <-time.After(10 * time.Minute):
		mu.Lock()
		t.Fatalf("received %d of %d", len(received), n)
	}
	elapsed := time.Since(began)
	agent.stop(10 * time.Second)
	st, _, err := spool.ReadStats(filepath.Join(state, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d messages end to end in %v: %.0f msgs/s (the socket took them at %.0f lines/s); gateway args %v; spool after stop: %d pending, %d dropped",
		n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), float64(n)/written.Seconds(), extra, st.Pending, st.Dropped)
}
