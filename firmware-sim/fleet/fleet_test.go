package fleet_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/internal/gwtest"
	"github.com/fleetgate/fleetgate/firmware-sim/mqttc"
	"github.com/fleetgate/fleetgate/pkg/est"
)

func TestHistogramQuantiles(t *testing.T) {
	var h fleet.Histogram
	for i := 1; i <= 10000; i++ {
		h.Observe(time.Duration(i) * time.Microsecond)
	}
	s := h.Snapshot()
	for _, tc := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 5000 * time.Microsecond}, {0.9, 9000 * time.Microsecond}, {0.99, 9900 * time.Microsecond}, {1, 10000 * time.Microsecond}} {
		got := s.Quantile(tc.q)
		if rel := math.Abs(float64(got-tc.want)) / float64(tc.want); rel > 0.02 {
			t.Errorf("q%.2f = %v, want %v ± 2%%", tc.q, got, tc.want)
		}
	}
	if s.Max() != 10*time.Millisecond || s.Count() != 10000 {
		t.Fatalf("max %v count %d", s.Max(), s.Count())
	}
	t.Run("window of two snapshots", func(t *testing.T) {
		for range 100 {
			h.Observe(time.Second)
		}
		w := h.Snapshot().Sub(s)
		if w.Count() != 100 {
			t.Fatalf("window count %d, want 100", w.Count())
		}
		if got := w.Quantile(0.5); math.Abs(float64(got-time.Second))/float64(time.Second) > 0.02 {
			t.Fatalf("window median %v, want 1s", got)
		}
	})
	t.Run("empty", func(t *testing.T) {
		var e fleet.Histogram
		if e.Snapshot().Quantile(0.99) != 0 {
			t.Fatal("quantile of nothing is not 0")
		}
	})
}

func TestPayload(t *testing.T) {
	now := time.Now()
	for _, size := range []int{0, fleet.MinPayload, 128, 4096} {
		p := fleet.AppendPayload(nil, 42, now, size)
		if len(p) < size {
			t.Fatalf("payload %d bytes, want at least %d", len(p), size)
		}
		if !json.Valid(p) {
			t.Fatalf("payload %s is not JSON", p)
		}
		if size >= fleet.MinPayload && len(p) != size {
			t.Fatalf("payload %d bytes, want exactly %d", len(p), size)
		}
		seq, sent, ok := fleet.ParsePayload(p)
		if !ok || seq != 42 || !sent.Equal(time.Unix(0, now.UnixNano())) {
			t.Fatalf("ParsePayload(%s) = %d, %v, %v", p, seq, sent, ok)
		}
	}
	for _, bad := range []string{"", "{}", `{"seq":x,"sent_ns":1}`, `{"seq":1,"sent_ns":}`, `{"seq":1}`} {
		if _, _, ok := fleet.ParsePayload([]byte(bad)); ok {
			t.Errorf("ParsePayload(%q) accepted", bad)
		}
	}
}

func TestReceiverCountsDuplicatesAndStrangers(t *testing.T) {
	st := fleet.NewStats()
	r := fleet.NewReceiver(st, []string{"a", "b"})
	now := time.Now()
	r.Handle("devices/a/telemetry", fleet.AppendPayload(nil, 1, now, 0), 1)
	r.Handle("devices/a/telemetry", fleet.AppendPayload(nil, 1, now, 0), 1)
	r.Handle("devices/b/telemetry", fleet.AppendPayload(nil, 700, now, 0), 1)
	r.Handle("devices/zz/telemetry", fleet.AppendPayload(nil, 1, now, 0), 1)
	r.Handle("devices/a/telemetry", []byte("not ours"), 1)
	if r.Received() != 2 || r.Duplicates() != 1 || r.Unreadable() != 2 {
		t.Fatalf("received %d dups %d unreadable %d", r.Received(), r.Duplicates(), r.Unreadable())
	}
	if r.ReceivedOf("b") != 1 || st.Delivery.Snapshot().Count() != 2 {
		t.Fatalf("per-device count %d, latencies %d", r.ReceivedOf("b"), st.Delivery.Snapshot().Count())
	}
}

func TestReason(t *testing.T) {
	cases := []struct {
		err  error
		want string
	}{
		{&mqttc.ConnackError{Code: 5}, "CONNACK 0x05"},
		{fmt.Errorf("enroll: %w", &est.Error{Op: "simpleenroll", StatusCode: 429}), "EST 429"},
		{context.DeadlineExceeded, "timeout"},
		{fmt.Errorf("dial: %w", &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}), "connection refused"},
		{fmt.Errorf("dial: %w", syscall.EMFILE), "out of file descriptors"},
		{errors.New("remote error: tls: bad certificate"), "TLS alert: bad certificate"},
		{fmt.Errorf("%w: %w", mqttc.ErrNoConnack, syscall.ECONNRESET), "reset before CONNACK"},
		{io.EOF, "closed by server"},
	}
	for _, tc := range cases {
		if got := fleet.Reason(tc.err); got != tc.want {
			t.Errorf("Reason(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
	if !fleet.Denied(fmt.Errorf("%w: %w", mqttc.ErrNoConnack, io.EOF)) || fleet.Refused(io.EOF) || !fleet.Refused(&mqttc.ConnackError{Code: 5}) {
		t.Fatal("Denied/Refused misclassify")
	}
}

func TestFormatNumber(t *testing.T) {
	for in, want := range map[float64]string{0: "0", 999.999: "1,000", 1234567: "1,234,567", 12.5: "12.5", -1500: "-1,500", 0.126: "0.13"} {
		if got := fleet.FormatNumber(in); got != want {
			t.Errorf("FormatNumber(%v) = %q, want %q", in, got, want)
		}
	}
}

func TestTargetIsLoopbackOnly(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []fleet.Target{
		{ESTURL: "https://192.0.2.1:8443", AdminURL: "https://127.0.0.1:9443", MQTTAddr: "127.0.0.1:8883", DataDir: dir},
		{ESTURL: "https://127.0.0.1:8443", AdminURL: "https://127.0.0.1:9443", MQTTAddr: "10.0.0.1:8883", DataDir: dir},
		{ESTURL: "http://127.0.0.1:8443", AdminURL: "https://127.0.0.1:9443", MQTTAddr: "127.0.0.1:8883", DataDir: dir},
	} {
		if err := tc.Validate(); err == nil {
			t.Errorf("Validate(%+v) accepted a target off loopback or without https", tc)
		}
	}
	ok := fleet.Target{ESTURL: "https://localhost:8443", AdminURL: "https://127.0.0.1:9443", MQTTAddr: "127.0.0.5:8883", DataDir: dir}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(ok.CAFile, "ca.pem") {
		t.Fatalf("default CA file %q", ok.CAFile)
	}
}

// TestFleet drives a handful of devices through the whole life: tokens,
// EST, sessions from their own source addresses, telemetry at both QoS,
// revocation.
func TestFleet(t *testing.T) {
	g := gwtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f, err := fleet.New(fleet.Config{Target: g.Target(), Devices: 4, Prefix: "t-", Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.MintTokens(ctx, time.Hour); err != nil {
		t.Fatal(err)
	}
	if n, err := f.Enroll(ctx, fleet.EnrollOptions{Concurrency: 2}); err != nil || n != 4 {
		t.Fatalf("enrolled %d, %v; errors %v", n, err, f.Stats.Errors())
	}
	cert, err := f.ServiceCertificate(ctx, "fleet-test")
	if err != nil {
		t.Fatal(err)
	}
	sub, err := f.Subscribe(ctx, fleet.SubscribeOptions{Cert: cert, QoS: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if n, err := f.Connect(ctx, fleet.ConnectOptions{Concurrency: 2}); err != nil || n != 4 {
		t.Fatalf("connected %d, %v; errors %v", n, err, f.Stats.Errors())
	}
	for i, d := range f.Devices {
		want := net.IPv4(127, 0, 0, byte(2+i))
		if ip := d.Conn().LocalAddr().(*net.TCPAddr).IP; !ip.Equal(want) {
			t.Errorf("%s connects from %v, want %v", d.ID, ip, want)
		}
	}

	for _, qos := range []byte{0, 1} {
		res := f.Blast(ctx, 10, qos, 64, 30*time.Second)
		if res.Sent != 40 || res.Errors != 0 {
			t.Fatalf("QoS %d: sent %d errors %d", qos, res.Sent, res.Errors)
		}
	}
	if got := sub.R.WaitQuiet(ctx, 80, 5*time.Second); got != 80 {
		t.Fatalf("received %d of 80", got)
	}

	t.Run("steady telemetry", func(t *testing.T) {
		lctx, lcancel := context.WithTimeout(ctx, 600*time.Millisecond)
		f.Run(lctx, fleet.LoadOptions{Interval: 100 * time.Millisecond, QoS: 1, Payload: 100})
		lcancel()
		// Every acknowledged message arrives. A publish cut off by the end
		// of the load may have been delivered before its acknowledgement
		// came back (a device session's acknowledgement leaves after the message went to the subscribers): at most
		// one per device, each publishing one at a time.
		want := f.Stats.Published.Load()
		got := sub.R.WaitQuiet(ctx, want, 5*time.Second)
		if got < want || got > want+int64(len(f.Devices)) || want <= 80 {
			t.Fatalf("received %d of %d acknowledged (%d devices)", got, want, len(f.Devices))
		}
	})

	t.Run("revoked device is cut off and refused", func(t *testing.T) {
		d := f.Devices[0]
		lat, err := f.Revoke(ctx, d, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if lat <= 0 {
			t.Fatalf("revoke latency %v", lat)
		}
		c, err := f.Dial(ctx, d)
		if err == nil {
			c.Close()
			t.Fatal("revoked device connected again")
		}
		if !fleet.Denied(err) {
			t.Fatalf("reconnect error %v is not a refusal", err)
		}
	})

	t.Run("resumed reconnect", func(t *testing.T) {
		d := f.Devices[1]
		f.DisconnectAll(ctx)
		c, err := f.Dial(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if !c.ConnectionState().DidResume {
			t.Fatal("reconnect did not resume the TLS session")
		}
	})
}
