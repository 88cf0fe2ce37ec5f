package bench

import (
	"bytes"
	"crypto/tls"
	"encoding/xml"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// sample is a plausible result of a run with both brokers.
func sampleResults() *Results {
	r := &Results{
		Date:    time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC),
		Machine: Machine{Cores: 2, MemoryBytes: 24 << 30, FDLimit: 20000, GoVersion: "go1.26"},
		Params:  Params{Sessions: 10000, Publishers: 1000, Messages: 200, Payload: 128, Inflight: 8, LatencyRate: 5000, LatencySeconds: 10, TLSGroups: "x25519"},
		Floors:  Floors{EnrollCPU: 180, ESTHandshakeCPU: 120, HandshakeCPU: 280, HandshakeHybridCPU: 390, ResumedCPU: 170, Fsync: 100, Cores: 2, Groups: "x25519"},
		Enroll:  &EnrollResult{Devices: 10000, Enrolled: 10000, Seconds: 5, PerSecond: 2000, Latency: fleet.Latency{P50: 20, P99: 90}, ServerCPU: 400},
		Revoke:  &RevokeResult{Connected: 10000, Revoked: 100, Refused: 100, Latency: fleet.Latency{P99: 6}, How: map[string]int{"TLS alert: bad certificate": 100}},
	}
	ours := &BrokerResult{Name: "fleetgate",
		Connect: ConnectResult{Sessions: 10000, PerSecond: 2500, ServerCPU: 400},
		Idle:    IdleResult{Sessions: 10000, PerSession: 40 << 10},
		QoS0:    &Throughput{PerSecond: 120000, DeliveredPct: 100},
		QoS1:    &Throughput{PerSecond: 60000, DeliveredPct: 100},
		Latency: &Throughput{Latency: fleet.Latency{P99: 3}},
	}
	theirs := &BrokerResult{Name: "mosquitto",
		Connect: ConnectResult{Sessions: 10000, PerSecond: 1000, ServerCPU: 850},
		Idle:    IdleResult{Sessions: 10000, PerSession: 12 << 10},
		QoS0:    &Throughput{PerSecond: 100000, DeliveredPct: 100},
		QoS1:    &Throughput{PerSecond: 55000, DeliveredPct: 100},
		Latency: &Throughput{Latency: fleet.Latency{P99: 2}},
	}
	r.Brokers = []*BrokerResult{ours, theirs}
	return r
}

func TestCompare(t *testing.T) {
	r := sampleResults()
	r.compare()
	met := map[string]bool{}
	for _, x := range r.Ratios {
		if x.Met != nil {
			met[x.Name] = *x.Met
		}
	}
	for name, want := range map[string]bool{
		"mTLS connects/s, fleetgate ÷ mosquitto":                         true,  // 2.5×
		"fleetgate server CPU per full connect ÷ mTLS handshake floor":   true,  // 400/280 = 1.43
		"fleetgate RSS per idle session":                                 false, // 40 KiB
		"QoS 0 msgs/s, fleetgate ÷ mosquitto":                            true,
		"QoS 1 msgs/s, fleetgate ÷ mosquitto (fleetgate 100% delivered)": false, // 1.09×
		"enrollments/s (durable commits)":                                true,
		"enrollment p99":                                                 true,
		"revoke→disconnect p99 with 10000 sessions":                      true,
	} {
		got, ok := met[name]
		if !ok {
			t.Errorf("no verdict for %q", name)
			continue
		}
		if got != want {
			t.Errorf("%q met = %v, want %v", name, got, want)
		}
	}
}

func TestChartIsSVG(t *testing.T) {
	for _, r := range []*Results{sampleResults(), {Brokers: []*BrokerResult{{Name: "fleetgate"}}}} {
		r.compare()
		svg := Chart(r)
		dec := xml.NewDecoder(strings.NewReader(svg))
		rects := 0
		for {
			tok, err := dec.Token()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("chart is not well-formed XML: %v\n%s", err, svg)
			}
			if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
				rects++
			}
		}
		if rects < 2 {
			t.Fatalf("chart has %d rects", rects)
		}
	}
	svg := Chart(sampleResults())
	for _, want := range []string{"mTLS connects/s", "QoS 1 msgs/s delivered", "TLS floor", "mosquitto"} {
		if !strings.Contains(svg, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
}

func TestTableMentionsEveryHeadline(t *testing.T) {
	r := sampleResults()
	r.compare()
	var b bytes.Buffer
	r.WriteTable(&b)
	for _, want := range []string{"mTLS connects/s", "RSS per idle session", "QoS 0 msgs/s", "QoS 1 msgs/s", "enrollment storm", "revoke→disconnect", "floors", "MISSED", "met"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

func TestFloors(t *testing.T) {
	l := pki.Layout{Dir: t.TempDir()}
	if err := pki.Init(l, pki.InitOptions{Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	fl, err := MeasureFloors(l, []tls.CurveID{tls.X25519}, "x25519", 6)
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]Micros{"enroll": fl.EnrollCPU, "est": fl.ESTHandshakeCPU, "mtls": fl.HandshakeCPU, "hybrid": fl.HandshakeHybridCPU, "resumed": fl.ResumedCPU, "fsync": fl.Fsync} {
		if v <= 0 {
			t.Errorf("%s floor %v", name, v)
		}
	}
	if fl.EnrollRate() <= 0 || fl.CommitRate() <= 0 {
		t.Fatalf("rates %v %v", fl.EnrollRate(), fl.CommitRate())
	}
}

// A repeated run reports its median round, lists every round, and the
// QoS 1 verdict needs every round to deliver everything.
func TestRoundsMedian(t *testing.T) {
	m := median([]*Throughput{
		{PerSecond: 70000, DeliveredPct: 100},
		{PerSecond: 50000, DeliveredPct: 99.5, Dropped: 10},
		{PerSecond: 66000, DeliveredPct: 100},
	})
	if m.PerSecond != 66000 || len(m.Rounds) != 3 || m.Rounds[1].PerSecond != 50000 {
		t.Fatalf("median %v with rounds %+v, want 66000 and the three rounds in order", m.PerSecond, m.Rounds)
	}
	if w := m.worstDelivered(); w != 99.5 {
		t.Fatalf("worst delivered %v, want 99.5", w)
	}
	r := sampleResults()
	r.Params.Rounds = 3
	ours := r.broker("fleetgate")
	ours.QoS1 = m
	r.broker("mosquitto").QoS1 = &Throughput{PerSecond: 40000, DeliveredPct: 100}
	r.compare()
	for _, x := range r.Ratios {
		if x.Name == "QoS 1 msgs/s, fleetgate ÷ mosquitto (fleetgate 100% delivered)" && (x.Met == nil || *x.Met) {
			t.Fatalf("QoS 1 verdict met with a round that lost messages: %+v", x)
		}
	}
	var b bytes.Buffer
	r.WriteTable(&b)
	for _, want := range []string{"median of 3 rounds", "QoS 1 rounds, msgs/s: fleetgate 70,000 / 50,000 / 66,000 (lowest delivered 99.50 %)"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}
