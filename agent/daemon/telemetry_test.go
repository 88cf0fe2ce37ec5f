package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/agent/config"
	"github.com/fleetgate/fleetgate/agent/spool"
	"github.com/fleetgate/fleetgate/agent/telemetry"
)

func testDaemon(t *testing.T, maxInflight int) (*Daemon, *spool.Spool) {
	t.Helper()
	sp, err := spool.Open(filepath.Join(t.TempDir(), "spool.db"), &spool.Options{MaxMessages: 50})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sp.Check(); err != nil {
			t.Errorf("spool check: %v", err)
		}
		sp.Close()
	})
	d := &Daemon{
		cfg: config.Config{DeviceID: "sensor-1", QoS: 1, MaxInflight: maxInflight, Interval: time.Second, System: true,
			SpoolMax: config.DefaultSpoolMax, SpoolMaxMessages: 50},
		log:     slog.New(slog.DiscardHandler),
		sources: telemetry.Sources{Proc: t.TempDir(), Thermal: t.TempDir()},
	}
	return d, sp
}

func TestMessageFormat(t *testing.T) {
	d, sp := testDaemon(t, 4)
	load := 0.5
	if err := d.spoolMessage(sp, "devices/sensor-1/telemetry", Message{DeviceID: "sensor-1", Time: time.Unix(1700000000, 0).UTC(), System: &telemetry.System{Load1: &load}}); err != nil {
		t.Fatal(err)
	}
	if errs := d.storeLocal(sp, []telemetry.LocalMessage{{Subtopic: "temp", Data: json.RawMessage(`{"c":21.5}`)}}); errs[0] != nil {
		t.Fatal(errs[0])
	}
	msgs, err := sp.Next(0, 10)
	if err != nil || len(msgs) != 2 {
		t.Fatalf("%d messages, %v", len(msgs), err)
	}
	if want := `{"device_id":"sensor-1","seq":1,"time":"2023-11-14T22:13:20Z","spool_dropped":0,"system":{"load1":0.5}}`; string(msgs[0].Payload) != want {
		t.Errorf("periodic message\n got %s\nwant %s", msgs[0].Payload, want)
	}
	if msgs[1].Topic != "devices/sensor-1/telemetry/temp" {
		t.Errorf("local message topic %s", msgs[1].Topic)
	}
	// Over the gateway's payload limit: refused, no number used.
	big := json.RawMessage(`{"pad":"` + strings.Repeat("x", MaxPayload) + `"}`)
	if errs := d.storeLocal(sp, []telemetry.LocalMessage{{Data: big}}); !errors.Is(errs[0], ErrTooLarge) {
		t.Errorf("oversized message: %v", errs[0])
	}
	if st, _ := sp.Stats(); st.NextSeq != 3 {
		t.Errorf("next seq %d after a refused message, want 3", st.NextSeq)
	}
	var local map[string]any
	if err := json.Unmarshal(msgs[1].Payload, &local); err != nil {
		t.Fatal(err)
	}
	if local["seq"] != 2.0 || local["device_id"] != "sensor-1" || fmt.Sprint(local["local"]) != "map[c:21.5]" || local["system"] != nil {
		t.Errorf("local message %s", msgs[1].Payload)
	}
}

func TestSampleWithExec(t *testing.T) {
	d, sp := testDaemon(t, 4)
	d.cfg.Interval = 100 * time.Millisecond
	d.exec = &telemetry.Exec{Command: `echo '{"fan":"on"}'`, Timeout: 10 * time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.sample(ctx, sp); close(done) }()
	deadline := time.Now().Add(20 * time.Second)
	var msgs []spool.Message
	for len(msgs) < 2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		msgs, _ = sp.Next(0, 10)
	}
	cancel()
	<-done
	if len(msgs) < 2 {
		t.Fatalf("%d messages", len(msgs))
	}
	var m Message
	if err := json.Unmarshal(msgs[0].Payload, &m); err != nil {
		t.Fatal(err)
	}
	if string(m.Exec) != `{"fan":"on"}` || m.System == nil || m.Seq != 1 {
		t.Fatalf("message %s", msgs[0].Payload)
	}
}

// fakeToken is a paho.Token the test completes.
type fakeToken struct {
	done chan struct{}
	err  error
}

func (t *fakeToken) Wait() bool                       { <-t.done; return true }
func (t *fakeToken) WaitTimeout(d time.Duration) bool { return true }
func (t *fakeToken) Done() <-chan struct{}            { return t.done }
func (t *fakeToken) Error() error                     { return t.err }

// fakeClient records publishes; the test acknowledges them.
type fakeClient struct {
	paho.Client
	mu        sync.Mutex
	published []*published
	notify    chan struct{}
}

type published struct {
	topic   string
	payload []byte
	tok     *fakeToken
}

func (c *fakeClient) Publish(topic string, qos byte, retained bool, payload any) paho.Token {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := &published{topic: topic, payload: payload.([]byte), tok: &fakeToken{done: make(chan struct{})}}
	c.published = append(c.published, p)
	select {
	case c.notify <- struct{}{}:
	default:
	}
	return p.tok
}

func (c *fakeClient) snapshot() []*published {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*published(nil), c.published...)
}

// waitPublished waits until n messages were handed to the client.
func (c *fakeClient) waitPublished(t *testing.T, n int) []*published {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		if p := c.snapshot(); len(p) >= n {
			return p
		}
		select {
		case <-c.notify:
		case <-deadline:
			t.Fatalf("%d messages published, want %d", len(c.snapshot()), n)
		}
	}
}

func seqOf(t *testing.T, p *published) uint64 {
	t.Helper()
	var m Message
	if err := json.Unmarshal(p.payload, &m); err != nil {
		t.Fatal(err)
	}
	return m.Seq
}

func pending(t *testing.T, sp *spool.Spool) []uint64 {
	t.Helper()
	msgs, err := sp.Next(0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var out []uint64
	for _, m := range msgs {
		out = append(out, m.Seq)
	}
	return out
}

func waitPending(t *testing.T, sp *spool.Spool, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for fmt.Sprint(pending(t, sp)) != want {
		if time.Now().After(deadline) {
			t.Fatalf("pending %v, want %s", pending(t, sp), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDrain(t *testing.T) {
	d, sp := testDaemon(t, 3)
	for range 5 {
		if errs := d.storeLocal(sp, []telemetry.LocalMessage{{Data: json.RawMessage(`{}`)}}); errs[0] != nil {
			t.Fatal(errs[0])
		}
	}
	c := &fakeClient{notify: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	result := make(chan error, 1)
	go func() { result <- d.drain(ctx, c, sp) }()

	// Oldest first, no more than MaxInflight unacknowledged.
	p := c.waitPublished(t, 3)
	time.Sleep(100 * time.Millisecond)
	if n := len(c.snapshot()); n != 3 {
		t.Fatalf("%d in flight, MaxInflight is 3", n)
	}
	for i, want := range []uint64{1, 2, 3} {
		if got := seqOf(t, p[i]); got != want {
			t.Fatalf("publish %d carried seq %d, want %d", i, got, want)
		}
	}
	// An acknowledgement removes the message and opens the window.
	close(p[0].tok.done)
	p = c.waitPublished(t, 4)
	if seqOf(t, p[3]) != 4 {
		t.Fatalf("fourth publish is seq %d", seqOf(t, p[3]))
	}
	waitPending(t, sp, "[2 3 4 5]")
	// Out-of-order acknowledgements wait for the oldest.
	close(p[2].tok.done)
	time.Sleep(50 * time.Millisecond)
	waitPending(t, sp, "[2 3 4 5]")
	close(p[1].tok.done)
	waitPending(t, sp, "[4 5]")

	// New messages are sent as they arrive.
	p = c.waitPublished(t, 5)
	close(p[3].tok.done)
	close(p[4].tok.done)
	waitPending(t, sp, "[]")
	d.storeLocal(sp, []telemetry.LocalMessage{{Data: json.RawMessage(`{}`)}})
	p = c.waitPublished(t, 6)
	if seqOf(t, p[5]) != 6 {
		t.Fatalf("sixth publish is seq %d", seqOf(t, p[5]))
	}

	// A failed publish (the session broke) ends drain; the message stays.
	p[5].tok.err = errors.New("connection lost before Publish completed")
	close(p[5].tok.done)
	select {
	case err := <-result:
		if err == nil {
			t.Fatal("drain returned nil after a failed publish")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("drain did not return after a failed publish")
	}
	waitPending(t, sp, "[6]")

	// The next session starts over from the oldest message kept.
	c2 := &fakeClient{notify: make(chan struct{}, 1)}
	go func() { result <- d.drain(ctx, c2, sp) }()
	if seqOf(t, c2.waitPublished(t, 1)[0]) != 6 {
		t.Fatal("next session did not resend seq 6")
	}
	cancel()
	if err := <-result; err != nil {
		t.Fatalf("drain after cancel: %v", err)
	}
	waitPending(t, sp, "[6]")
}
