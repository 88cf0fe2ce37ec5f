package bench

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
)

// Results is everything one bench run measured (results.json).
type Results struct {
	Date    time.Time       `json:"date"`
	Smoke   bool            `json:"smoke"`
	Machine Machine         `json:"machine"`
	Params  Params          `json:"params"`
	Floors  Floors          `json:"floors"`
	Enroll  *EnrollResult   `json:"enroll,omitempty"`
	Revoke  *RevokeResult   `json:"revoke,omitempty"`
	Brokers []*BrokerResult `json:"brokers"`
	Ratios  []Ratio         `json:"ratios"`
	Notes   []string        `json:"notes,omitempty"`
	failure string
}

// Machine is where the bench ran.
type Machine struct {
	CPU         string `json:"cpu,omitempty"`
	Cores       int    `json:"cores"`
	MemoryBytes int64  `json:"memory_bytes"`
	FDLimit     int    `json:"fd_limit"`
	Kernel      string `json:"kernel,omitempty"`
	GoVersion   string `json:"go_version"`
	// Load averages at start and end: other work on the machine skews
	// wall-clock rates (not CPU per operation).
	LoadStart string `json:"loadavg_start"`
	LoadEnd   string `json:"loadavg_end"`
}

// Params are the sizes the bench ran with.
type Params struct {
	Sessions       int     `json:"sessions"`
	Enrollments    int     `json:"enrollments"`
	Publishers     int     `json:"publishers"`
	Messages       int     `json:"messages_per_publisher"`
	Payload        int     `json:"payload_bytes"`
	Inflight       int     `json:"qos1_inflight_per_publisher"`
	LatencyRate    float64 `json:"latency_rate"`
	LatencySeconds float64 `json:"latency_seconds"`
	Revoke         int     `json:"revoke"`
	Resumed        int     `json:"resumed"`
	Concurrency    int     `json:"concurrency"`
	TLSGroups      string  `json:"tls_groups"`
	Rounds         int     `json:"throughput_rounds,omitempty"`
}

// EnrollResult is the enrollment storm (fleetgate only).
type EnrollResult struct {
	Devices   int              `json:"devices"`
	Enrolled  int              `json:"enrolled"`
	Seconds   float64          `json:"seconds"`
	PerSecond float64          `json:"per_second"`
	Latency   fleet.Latency    `json:"latency"`
	ServerCPU Micros           `json:"server_cpu_us"`
	ClientCPU Micros           `json:"client_cpu_us"`
	Errors    map[string]int64 `json:"errors"`
}

// RevokeResult is revoke→disconnect with the sessions connected.
type RevokeResult struct {
	Connected int           `json:"connected"`
	Revoked   int           `json:"revoked"`
	Latency   fleet.Latency `json:"latency"`
	Refused   int           `json:"reconnects_refused"`
	// How the refused reconnects ended (TLS alert, reset before CONNACK).
	How      map[string]int `json:"refused_how,omitempty"`
	Admitted int            `json:"reconnects_admitted"`
	Failures int            `json:"failures"`
}

// BrokerResult is one broker's measurements.
type BrokerResult struct {
	Name    string        `json:"name"`
	Version string        `json:"version,omitempty"`
	Connect ConnectResult `json:"connect"`
	Idle    IdleResult    `json:"idle"`
	Resumed ResumedResult `json:"resumed"`
	QoS0    *Throughput   `json:"qos0"`
	QoS1    *Throughput   `json:"qos1"`
	Latency *Throughput   `json:"latency"`
	// GatewayDropped is fleetgate's own count of messages dropped for a
	// full subscriber queue, over the whole run.
	GatewayDropped int64            `json:"gateway_dropped,omitempty"`
	Errors         map[string]int64 `json:"errors"`
	pid            int
}

// ConnectResult is the connect storm.
type ConnectResult struct {
	Sessions  int           `json:"sessions"`
	Seconds   float64       `json:"seconds"`
	PerSecond float64       `json:"per_second"`
	Latency   fleet.Latency `json:"latency"`
	ServerCPU Micros        `json:"server_cpu_us"`
	ClientCPU Micros        `json:"client_cpu_us"`
}

// IdleResult is the memory of idle sessions.
type IdleResult struct {
	Sessions  int   `json:"sessions"`
	RSSBefore int64 `json:"rss_before_bytes"`
	RSSAfter  int64 `json:"rss_after_bytes"`
	// PerSession is the RSS delta per session 5 s after the storm.
	PerSession float64 `json:"rss_per_session_bytes"`
	// After the Go runtime's next garbage collection (fleetgate, full
	// bench): RSS, RSS delta and Go heap in use per session.
	RSSAfterGC        int64   `json:"rss_after_gc_bytes,omitempty"`
	PerSessionAfterGC float64 `json:"rss_per_session_after_gc_bytes,omitempty"`
	HeapPerSession    float64 `json:"heap_inuse_per_session_after_gc_bytes,omitempty"`
}

// steady is the best estimate of memory per idle session: after GC when
// measured.
func (i IdleResult) steady() float64 {
	if i.PerSessionAfterGC > 0 {
		return i.PerSessionAfterGC
	}
	return i.PerSession
}

// ResumedResult is reconnects with TLS session resumption.
type ResumedResult struct {
	Connects  int     `json:"connects"`
	Resumed   int     `json:"resumed"`
	PerSecond float64 `json:"per_second"`
	ServerCPU Micros  `json:"server_cpu_us"`
}

// Throughput is one telemetry run.
type Throughput struct {
	QoS           byte          `json:"qos"`
	Publishers    int           `json:"publishers"`
	Sent          int64         `json:"sent"`
	Received      int64         `json:"received"`
	Duplicates    int64         `json:"duplicates"`
	Dropped       int64         `json:"dropped"`
	PublishErrors int64         `json:"publish_errors"`
	DeliveredPct  float64       `json:"delivered_pct"`
	SendSeconds   float64       `json:"send_seconds,omitempty"`
	Seconds       float64       `json:"seconds"`
	PerSecond     float64       `json:"per_second"`
	SendPerSecond float64       `json:"send_per_second"`
	Latency       fleet.Latency `json:"latency"`
	ServerCPU     float64       `json:"server_cpu_s,omitempty"`
	// Rounds lists every round when the run was repeated; the fields
	// above are the median round's.
	Rounds []Round `json:"rounds,omitempty"`
}

// Round is one round of a repeated throughput run.
type Round struct {
	PerSecond    float64 `json:"per_second"`
	DeliveredPct float64 `json:"delivered_pct"`
	Dropped      int64   `json:"dropped"`
	Seconds      float64 `json:"seconds"`
	ServerCPU    float64 `json:"server_cpu_s,omitempty"`
}

// worstDelivered is the lowest delivered share of any round.
func (t *Throughput) worstDelivered() float64 {
	worst := t.DeliveredPct
	for _, r := range t.Rounds {
		worst = min(worst, r.DeliveredPct)
	}
	return worst
}

// Ratio is one comparison against a target.
type Ratio struct {
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit"`
	Target string  `json:"target"`
	Met    *bool   `json:"met,omitempty"`
}

// OK reports whether the bench itself worked (missed targets are results,
// not failures).
func (r *Results) OK() bool { return r.failure == "" }

// Failure says why the bench failed.
func (r *Results) Failure() string { return r.failure }

func (r *Results) broker(name string) *BrokerResult {
	for _, b := range r.Brokers {
		if b.Name == name {
			return b
		}
	}
	return nil
}

func (r *Results) addRatio(name string, v float64, unit, target string, met *bool) {
	r.Ratios = append(r.Ratios, Ratio{Name: name, Value: round3(v), Unit: unit, Target: target, Met: met})
}

func round3(v float64) float64 { return float64(int64(v*1000+0.5)) / 1000 }

func ptr(b bool) *bool { return &b }

func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// compare computes the ratios against the targets.
func (r *Results) compare() {
	ours, theirs := r.broker("fleetgate"), r.broker("mosquitto")
	if ours == nil {
		return
	}
	if theirs != nil {
		x := div(ours.Connect.PerSecond, theirs.Connect.PerSecond)
		r.addRatio("mTLS connects/s, fleetgate ÷ mosquitto", x, "×", "≥ 2", ptr(x >= 2))
		r.addRatio("server CPU per full connect, fleetgate ÷ mosquitto", div(float64(ours.Connect.ServerCPU), float64(theirs.Connect.ServerCPU)), "×", "", nil)
	}
	x := div(float64(ours.Connect.ServerCPU), float64(r.Floors.HandshakeCPU))
	r.addRatio("fleetgate server CPU per full connect ÷ mTLS handshake floor", x, "×", "≤ 1.5", ptr(x <= 1.5))
	r.addRatio("fleetgate RSS per idle session", ours.Idle.steady()/1024, "KiB", "≤ 32 KiB (at 50,000 sessions; measured at the fd-limited count)", ptr(ours.Idle.steady() <= 32*1024))
	if theirs != nil && ours.QoS0 != nil && theirs.QoS0 != nil {
		x := div(ours.QoS0.PerSecond, theirs.QoS0.PerSecond)
		r.addRatio("QoS 0 msgs/s, fleetgate ÷ mosquitto", x, "×", "≥ 1", ptr(x >= 1))
	}
	if ours.QoS1 != nil {
		// Every round must deliver everything, not only the median one.
		worst := ours.QoS1.worstDelivered()
		all := worst >= 100
		if theirs != nil && theirs.QoS1 != nil {
			x := div(ours.QoS1.PerSecond, theirs.QoS1.PerSecond)
			r.addRatio("QoS 1 msgs/s, fleetgate ÷ mosquitto (fleetgate 100% delivered)", x, "×", "≥ 1.2 and 100%", ptr(x >= 1.2 && all))
		} else {
			r.addRatio("QoS 1 delivered, fleetgate", worst, "%", "100%", ptr(all))
		}
	}
	if theirs != nil && ours.Latency != nil && theirs.Latency != nil {
		r.addRatio("publish→receive p99, fleetgate ÷ mosquitto", div(ours.Latency.Latency.P99, theirs.Latency.Latency.P99), "×", "", nil)
	}
	if e := r.Enroll; e != nil {
		r.addRatio("enrollments/s (durable commits)", e.PerSecond, "1/s", "≥ 1500", ptr(e.PerSecond >= 1500))
		r.addRatio("enrollment p99", e.Latency.P99, "ms", "< 250 ms", ptr(e.Latency.P99 < 250))
		r.addRatio("enrollments/s ÷ crypto floor on all cores", div(e.PerSecond, r.Floors.EnrollRate()), "×", "", nil)
		r.addRatio("gateway CPU per enrollment ÷ crypto+TLS floor", div(float64(e.ServerCPU), float64(r.Floors.EnrollCPU+r.Floors.ESTHandshakeCPU)), "×", "", nil)
		// The load generator shares the cores: what the gateway's own CPU
		// per enrollment allows with every core to itself (a projection
		// from measured CPU time, not a measured rate).
		r.addRatio("enrollments/s the gateway's CPU allows on all cores", perSecond(e.ServerCPU, r.Floors.Cores), "1/s", "", nil)
		r.addRatio("enrollments/s gateway + load generator CPU allow", perSecond(e.ServerCPU+e.ClientCPU, r.Floors.Cores), "1/s", "", nil)
	}
	if v := r.Revoke; v != nil {
		r.addRatio(fmt.Sprintf("revoke→disconnect p99 with %d sessions", v.Connected), v.Latency.P99, "ms", "< 50 ms (10,000 sessions)", ptr(v.Latency.P99 < 50 && v.Admitted == 0))
	}
}

// WriteTable prints the results for a human.
func (r *Results) WriteTable(w io.Writer) {
	m := r.Machine
	kind := "full"
	if r.Smoke {
		kind = "smoke"
	}
	fmt.Fprintf(w, "\nfleetgate bench (%s) — %s\n", kind, r.Date.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(w, "machine: %d cores %s, %s RAM, open-file limit %d, %s, load average %s at start, %s at end\n",
		m.Cores, paren(m.CPU), fleet.FormatBytes(m.MemoryBytes), m.FDLimit, m.GoVersion, m.LoadStart, m.LoadEnd)
	p := r.Params
	fmt.Fprintf(w, "sizes: %s sessions, %s publishers × %d messages of %d B (QoS 1 window %d), latency run %s msgs/s for %.0fs, TLS key exchange %s",
		n(float64(p.Sessions)), n(float64(p.Publishers)), p.Messages, p.Payload, p.Inflight, n(p.LatencyRate), p.LatencySeconds, p.TLSGroups)
	if p.Rounds > 1 {
		fmt.Fprintf(w, ", throughput runs: median of %d rounds", p.Rounds)
	}
	fmt.Fprintln(w)

	fl := r.Floors
	fmt.Fprintf(w, "\nfloors (in-process, CPU per operation on one core):\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  mutual TLS 1.3 handshake, server side (%s)\t%.0f µs\tright before fleetgate's connect storm (%.0f µs at start)\n", fl.Groups, fl.HandshakeCPU, fl.HandshakeAtStart)
	fmt.Fprintf(tw, "  … with X25519MLKEM768 (Go's default)\t%.0f µs\t\n", fl.HandshakeHybridCPU)
	fmt.Fprintf(tw, "  … resumed (TLS 1.3 ticket)\t%.0f µs\t\n", fl.ResumedCPU)
	fmt.Fprintf(tw, "  enrollment crypto (CSR verify + issue)\t%.0f µs\t→ %s/s on %d cores\n", fl.EnrollCPU, n(fl.EnrollRate()), fl.Cores)
	fmt.Fprintf(tw, "  … plus EST TLS handshake (server auth)\t%.0f µs\t→ %s/s on %d cores\n", fl.EnrollCPU+fl.ESTHandshakeCPU, n(fl.EnrollRateWithTLS()), fl.Cores)
	fmt.Fprintf(tw, "  fsync (4 KiB write + fdatasync)\t%.0f µs\t→ %s serial bbolt commits/s (2 fsyncs each)\n", fl.Fsync, n(fl.CommitRate()))
	tw.Flush()

	ours, theirs := r.broker("fleetgate"), r.broker("mosquitto")
	if ours != nil {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		head := "\tfleetgate\t"
		if theirs != nil {
			head += "mosquitto\tratio\t"
		}
		fmt.Fprintln(tw, head)
		row := func(name string, a, b float64, format string) {
			line := name + "\t" + fmt.Sprintf(format, a) + "\t"
			if theirs != nil {
				line += fmt.Sprintf(format, b) + "\t" + fmt.Sprintf("%.2f×", div(a, b)) + "\t"
			}
			fmt.Fprintln(tw, line)
		}
		rowOurs := func(name string, a float64, format string) {
			line := name + "\t" + fmt.Sprintf(format, a) + "\t"
			if theirs != nil {
				line += "–\t\t"
			}
			fmt.Fprintln(tw, line)
		}
		nf := func(v float64) string { return n(v) }
		rowN := func(name string, a, b float64) {
			line := name + "\t" + nf(a) + "\t"
			if theirs != nil {
				line += nf(b) + "\t" + fmt.Sprintf("%.2f×", div(a, b)) + "\t"
			}
			fmt.Fprintln(tw, line)
		}
		t := theirs
		if t == nil {
			t = &BrokerResult{}
		}
		rowN("mTLS connects/s", ours.Connect.PerSecond, t.Connect.PerSecond)
		row("server CPU per full connect (µs)", float64(ours.Connect.ServerCPU), float64(t.Connect.ServerCPU), "%.0f")
		row("load generator CPU per connect (µs)", float64(ours.Connect.ClientCPU), float64(t.Connect.ClientCPU), "%.0f")
		row("connect p99 (ms)", ours.Connect.Latency.P99, t.Connect.Latency.P99, "%.1f")
		rowN("idle sessions held", float64(ours.Idle.Sessions), float64(t.Idle.Sessions))
		row("RSS per idle session, 5 s after (KiB)", ours.Idle.PerSession/1024, t.Idle.PerSession/1024, "%.1f")
		if ours.Idle.PerSessionAfterGC > 0 {
			rowOurs("  … after the gateway's next GC (KiB)", ours.Idle.PerSessionAfterGC/1024, "%.1f")
			rowOurs("  Go heap in use per session after GC (KiB)", ours.Idle.HeapPerSession/1024, "%.1f")
		}
		rowN("resumed connects/s", ours.Resumed.PerSecond, t.Resumed.PerSecond)
		row("server CPU per resumed connect (µs)", float64(ours.Resumed.ServerCPU), float64(t.Resumed.ServerCPU), "%.0f")
		row("  resumed (%)", pct(ours.Resumed.Resumed, ours.Resumed.Connects), pct(t.Resumed.Resumed, t.Resumed.Connects), "%.0f")
		for _, q := range []struct {
			name string
			a, b *Throughput
		}{{"QoS 0", ours.QoS0, t.QoS0}, {"QoS 1", ours.QoS1, t.QoS1}} {
			if q.a == nil {
				continue
			}
			bb := q.b
			if bb == nil {
				bb = &Throughput{}
			}
			rowN(q.name+" msgs/s delivered", q.a.PerSecond, bb.PerSecond)
			row("  delivered (%)", q.a.DeliveredPct, bb.DeliveredPct, "%.2f")
			rowN("  dropped", float64(q.a.Dropped), float64(bb.Dropped))
			row("  publish→receive p99 (ms)", q.a.Latency.P99, bb.Latency.P99, "%.1f")
			row("  server CPU (cores busy)", div(q.a.ServerCPU, q.a.Seconds), div(bb.ServerCPU, bb.Seconds), "%.2f")
		}
		if ours.Latency != nil {
			lb := t.Latency
			if lb == nil {
				lb = &Throughput{}
			}
			row(fmt.Sprintf("publish→receive p50 at %s msgs/s, QoS 1 (ms)", n(r.Params.LatencyRate)), ours.Latency.Latency.P50, lb.Latency.P50, "%.2f")
			row("publish→receive p99 (ms)", ours.Latency.Latency.P99, lb.Latency.P99, "%.2f")
			row("  delivered (%)", ours.Latency.DeliveredPct, lb.DeliveredPct, "%.2f")
			row("  server CPU (cores busy)", div(ours.Latency.ServerCPU, ours.Latency.Seconds), div(lb.ServerCPU, lb.Seconds), "%.2f")
		}
		tw.Flush()
		writeRounds(w, ours, theirs)
		if ours.GatewayDropped > 0 {
			fmt.Fprintf(w, "fleetgate counted %s messages dropped for a full subscriber queue (fleetgate_mqtt_messages_dropped_total)\n", n(float64(ours.GatewayDropped)))
		}
	}
	if e := r.Enroll; e != nil {
		fmt.Fprintf(w, "\nenrollment storm (fleetgate, EST + durable registry commits): %s of %s in %.1fs = %s/s; latency p50 %.1f ms, p99 %.1f ms, max %.1f ms\n",
			n(float64(e.Enrolled)), n(float64(e.Devices)), e.Seconds, n(e.PerSecond), e.Latency.P50, e.Latency.P99, e.Latency.Max)
		fmt.Fprintf(w, "  gateway CPU %.0f µs per enrollment (floor %.0f µs crypto + %.0f µs TLS), load generator %.0f µs\n",
			e.ServerCPU, fl.EnrollCPU, fl.ESTHandshakeCPU, e.ClientCPU)
	}
	if v := r.Revoke; v != nil {
		var how []string
		for k, c := range v.How {
			how = append(how, fmt.Sprintf("%d %s", c, k))
		}
		sort.Strings(how)
		fmt.Fprintf(w, "revoke→disconnect (fleetgate, %s sessions connected): %d revoked, p50 %.1f ms, p99 %.1f ms, max %.1f ms; reconnects refused %d/%d (%s)\n",
			n(float64(v.Connected)), v.Revoked, v.Latency.P50, v.Latency.P99, v.Latency.Max, v.Refused, v.Revoked, strings.Join(how, ", "))
	}
	if len(r.Ratios) > 0 {
		fmt.Fprintf(w, "\ntargets:\n")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, x := range r.Ratios {
			verdict := ""
			if x.Met != nil {
				verdict = "MISSED"
				if *x.Met {
					verdict = "met"
				}
			}
			fmt.Fprintf(tw, "  %s\t%s %s\t%s\t%s\n", x.Name, n(x.Value), x.Unit, x.Target, verdict)
		}
		tw.Flush()
	}
	for _, b := range r.Brokers {
		if len(b.Errors) > 0 {
			var parts []string
			for k, v := range b.Errors {
				parts = append(parts, fmt.Sprintf("%s ×%d", k, v))
			}
			fmt.Fprintf(w, "%s errors: %s\n", b.Name, strings.Join(parts, ", "))
		}
	}
	for _, note := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", note)
	}
}

func n(v float64) string { return fleet.FormatNumber(v) }

func pct(a, b int) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}

func paren(s string) string {
	if s == "" {
		return ""
	}
	return "(" + s + ")"
}

// writeRounds lists the rounds of repeated throughput runs.
func writeRounds(w io.Writer, brokers ...*BrokerResult) {
	for _, q := range []struct {
		name string
		get  func(*BrokerResult) *Throughput
	}{{"QoS 0", func(b *BrokerResult) *Throughput { return b.QoS0 }}, {"QoS 1", func(b *BrokerResult) *Throughput { return b.QoS1 }}} {
		var parts []string
		for _, b := range brokers {
			if b == nil || q.get(b) == nil || len(q.get(b).Rounds) < 2 {
				continue
			}
			t := q.get(b)
			rates := make([]string, len(t.Rounds))
			for i, r := range t.Rounds {
				rates[i] = n(r.PerSecond)
			}
			parts = append(parts, fmt.Sprintf("%s %s (lowest delivered %.2f %%)", b.Name, strings.Join(rates, " / "), t.worstDelivered()))
		}
		if len(parts) > 0 {
			fmt.Fprintf(w, "%s rounds, msgs/s: %s\n", q.name, strings.Join(parts, "; "))
		}
	}
}
