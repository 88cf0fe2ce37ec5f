package broker

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	dto "github.com/prometheus/client_model/go"

	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/metrics"
)

func testHook(r limit.Rate) *hook {
	return &hook{
		srv:         mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)}),
		log:         slog.New(slog.DiscardHandler),
		m:           metrics.New(),
		current:     map[string]*mqtt.Client{},
		maxPayload:  DefaultMaxPayload,
		publishRate: r.Or(DefaultPublishRate),
		gate:        newGate(DefaultServiceWriteQueue / 2),
	}
}

// session registers a device session's bucket as OnSessionEstablished does.
func (h *hook) session(id string) *mqtt.Client {
	a, _ := net.Pipe()
	cl := h.srv.NewClient(a, "test", id, false)
	h.devices.Store(cl, &deviceSession{pacer: limit.NewPacer(h.publishRate)})
	return cl
}

func counter(h *hook) float64 {
	var d dto.Metric
	_ = h.m.PublishesThrottled.Write(&d)
	return d.Counter.GetValue()
}

func TestOnPublishPaces(t *testing.T) {
	pk := packets.Packet{TopicName: "devices/dev-1/telemetry", Payload: []byte("{}")}

	t.Run("a publish over the rate waits for its token and goes on", func(t *testing.T) {
		h := testHook(limit.Rate{PerSecond: 2, Burst: 1})
		cl := h.session("dev-1")
		for i := range 2 {
			if _, err := h.OnPublish(cl, pk); err != nil {
				t.Fatalf("publish %d: %v (a paced publish is delayed, never refused)", i+1, err)
			}
		}
		if n := counter(h); n != 1 {
			t.Fatalf("%v publishes paced, want 1", n)
		}
	})
	t.Run("every publish beyond the burst is paced; a closed session's are dropped", func(t *testing.T) {
		// One token per 100 s: none comes back during the test, however
		// slow the machine, and the session is closed so no one waits.
		h := testHook(limit.Rate{PerSecond: 0.01, Burst: 3})
		cl := h.session("dev-1")
		for i := range 3 {
			if _, err := h.OnPublish(cl, pk); err != nil {
				t.Fatalf("publish %d within the burst: %v", i+1, err)
			}
		}
		cl.Stop(nil)
		for i := range 7 {
			if _, err := h.OnPublish(cl, pk); !errors.Is(err, packets.ErrRejectPacket) {
				t.Fatalf("publish %d beyond the burst of a closed session: %v", i+4, err)
			}
		}
		if n := counter(h); n != 7 {
			t.Fatalf("%v publishes paced, want 7", n)
		}
	})
	t.Run("services are not paced", func(t *testing.T) {
		h := testHook(limit.Rate{PerSecond: 0.01, Burst: 1})
		svc := h.session(servicePrefix + "backend:1")
		for range 10 {
			if _, err := h.OnPublish(svc, pk); err != nil {
				t.Fatal(err)
			}
		}
		if n := counter(h); n != 0 {
			t.Fatalf("a service was paced %v times", n)
		}
	})
}

// BenchmarkPublishHook measures the per-PUBLISH work of the hooks: the ACL
// check alone (the reference), and the publish hook with and without the
// rate limit, on one client and on many clients at once (no shared lock:
// the parallel case should scale).
func BenchmarkPublishHook(b *testing.B) {
	pk := packets.Packet{TopicName: "devices/dev-1/telemetry", Payload: make([]byte, 64)}
	b.Run("acl check", func(b *testing.B) {
		h := testHook(limit.Off)
		cl := h.session("dev-1")
		b.ReportAllocs()
		for b.Loop() {
			h.OnACLCheck(cl, pk.TopicName, true)
		}
	})
	for _, tc := range []struct {
		name string
		rate limit.Rate
	}{
		{"publish hook, rate limit off", limit.Off},
		// Never exhausted: the cost of the check, not of pacing.
		{"publish hook, rate limit on", limit.Rate{PerSecond: 1e12, Burst: 1 << 30}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			h := testHook(tc.rate)
			cl := h.session("dev-1")
			b.ReportAllocs()
			for b.Loop() {
				if _, err := h.OnPublish(cl, pk); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(tc.name+", parallel clients", func(b *testing.B) {
			h := testHook(tc.rate)
			var n atomic.Int64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				cl := h.session(fmt.Sprintf("dev-%d", n.Add(1)))
				p := pk
				for pb.Next() {
					if _, err := h.OnPublish(cl, p); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
