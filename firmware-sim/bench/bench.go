// Package bench is `firmware-sim bench`: fleetgate's gateway and Debian's
// Mosquitto under the same simulated fleet, one after the other, on this
// machine, with the physical floors (crypto, disk) measured in the same
// run. It writes results.json and chart.svg and prints the ratios against
// the project's targets.
//
// What it measures, per broker:
//   - a connect storm of mutual-TLS MQTT sessions that stay open: connects/s,
//     server CPU per full connect (utime+stime from /proc), and memory per
//     idle session (RSS delta / sessions once settled);
//   - resumed connects (TLS 1.3 tickets), as a bonus;
//   - telemetry throughput at QoS 0 and QoS 1: every publisher sends its
//     messages as fast as its session allows to one service subscriber
//     (delivered %, dropped, duplicates);
//   - publish→receive latency at a fixed moderate rate (QoS 1).
//
// And for fleetgate alone: an enrollment storm (EST, durable registry
// commits) against the crypto and fsync floors, and revoke→disconnect with
// the sessions connected.
package bench

import (
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/procstat"
	"github.com/fleetgate/fleetgate/firmware-sim/spawn"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Config sizes the bench.
type Config struct {
	// Smoke is the short CI version.
	Smoke bool
	// GatewayBin is the gateway binary to start.
	GatewayBin string
	// Mosquitto is the mosquitto binary ("" to find it, "none" to skip).
	Mosquitto string
	// OutDir receives results.json and chart.svg.
	OutDir string

	Sessions    int
	Enrollments int
	Publishers  int
	Messages    int
	Payload     int
	Inflight    int
	LatencyRate float64
	LatencyTime time.Duration
	Revoke      int
	Resumed     int
	Concurrency int
	Groups      string
	// Rounds is how many times each throughput run is repeated; the
	// median round is reported (default 3; smoke 1).
	Rounds int

	// Timeout bounds the whole run (default 45 min; smoke 5 min).
	Timeout time.Duration

	GatewayLogLevel string
	// GatewayArgs are extra flags of the gateway.
	GatewayArgs    []string
	Quiet          bool
	Stdout, Stderr io.Writer
}

func (c *Config) setDefaults() {
	def := func(v *int, full, smoke int) {
		if *v <= 0 {
			*v = full
			if c.Smoke {
				*v = smoke
			}
		}
	}
	// The target's 50,000 sessions, or as many as the open-file limit
	// allows (Run caps and says so).
	def(&c.Sessions, 50000, 300)
	def(&c.Publishers, 1000, 100)
	def(&c.Messages, 200, 20)
	def(&c.Payload, 128, 128)
	def(&c.Inflight, 8, 8)
	def(&c.Revoke, 100, 5)
	def(&c.Resumed, 2000, 100)
	def(&c.Concurrency, fleet.DefaultConcurrency, 32)
	def(&c.Rounds, 3, 1)
	if c.Enrollments <= 0 {
		c.Enrollments = c.Sessions
	}
	if c.LatencyRate <= 0 {
		c.LatencyRate = 5000
		if c.Smoke {
			c.LatencyRate = 1000
		}
	}
	if c.LatencyTime <= 0 {
		c.LatencyTime = 10 * time.Second
		if c.Smoke {
			c.LatencyTime = 2 * time.Second
		}
	}
	if c.Groups == "" {
		c.Groups = "x25519"
	}
	if c.Timeout <= 0 {
		c.Timeout = 45 * time.Minute
		if c.Smoke {
			c.Timeout = 5 * time.Minute
		}
	}
	if c.OutDir == "" {
		c.OutDir = "firmware-sim/bench-results"
		if c.Smoke {
			// The smoke run must not overwrite the full run's results.
			c.OutDir = filepath.Join(os.TempDir(), "fleetgate-bench-smoke")
		}
	}
	if c.Stdout == nil {
		c.Stdout = io.Discard
	}
	if c.Stderr == nil {
		c.Stderr = io.Discard
	}
}

// fdReserve is kept free of device sessions in each process: the
// subscriber, EST connections in flight, the registry, logs.
const fdReserve = 500

// Run runs the bench and writes its results.
func Run(ctx context.Context, cfg Config) (*Results, error) {
	cfg.setDefaults()
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	groups, err := fleet.Groups(cfg.Groups)
	if err != nil {
		return nil, err
	}
	lim, err := procstat.RaiseFileLimit(uint64(cfg.Sessions + cfg.Concurrency + fdReserve))
	if err != nil {
		return nil, err
	}
	b := &bench{cfg: cfg, res: &Results{Date: time.Now().UTC(), Smoke: cfg.Smoke}}
	b.res.Machine = machine(lim)
	capN := int(lim) - cfg.Concurrency - fdReserve
	if cfg.Sessions > capN {
		b.note("sessions capped at %d (asked %d): every process here may open at most %d files (its hard limit, which could not be raised here), and each session is one file in the broker and one in the load generator",
			capN, cfg.Sessions, lim)
		cfg.Sessions = capN
	}
	b.cfg = cfg
	b.res.Params = Params{
		Sessions: cfg.Sessions, Enrollments: cfg.Enrollments, Publishers: cfg.Publishers, Messages: cfg.Messages,
		Payload: cfg.Payload, Inflight: cfg.Inflight, LatencyRate: cfg.LatencyRate, LatencySeconds: cfg.LatencyTime.Seconds(),
		Revoke: cfg.Revoke, Resumed: cfg.Resumed, Concurrency: cfg.Concurrency, TLSGroups: cfg.Groups,
		Rounds: cfg.Rounds,
	}
	if !cfg.Quiet {
		b.out = cfg.Stderr
	}

	// Mosquitto is looked for first, so a missing one is said at once.
	mosqPath := ""
	if cfg.Mosquitto != "none" {
		if mosqPath, err = spawn.FindMosquitto(cfg.Mosquitto); err != nil {
			if cfg.Mosquitto != "" || !cfg.Smoke {
				return nil, fmt.Errorf("%w; or pass --mosquitto none to measure fleetgate alone", err)
			}
			b.note("Mosquitto is not installed: fleetgate measured alone, no comparison (apt-get install -y mosquitto)")
		}
	} else {
		b.note("Mosquitto skipped (--mosquitto none): fleetgate measured alone, no comparison")
	}

	work, err := os.MkdirTemp("", "firmware-sim-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)

	b.say("starting the gateway (%s)", cfg.GatewayBin)
	gw, err := spawn.StartGateway(ctx, spawn.GatewayConfig{Path: cfg.GatewayBin, DataDir: filepath.Join(work, "gateway"), LogLevel: cfg.GatewayLogLevel, Args: cfg.GatewayArgs})
	if err != nil {
		return nil, err
	}
	defer gw.Stop(30 * time.Second)
	b.gw = gw
	layout := pki.Layout{Dir: gw.DataDir()}

	b.say("measuring the floors in-process (crypto, fsync)")
	b.reps = 400
	if cfg.Smoke {
		b.reps = 100
	}
	if b.res.Floors, err = MeasureFloors(layout, groups, cfg.Groups, b.reps); err != nil {
		return nil, err
	}

	fleetSize := max(cfg.Sessions, cfg.Enrollments, cfg.Publishers, cfg.Resumed)
	f, err := fleet.New(fleet.Config{
		Target:      gw.Target(),
		Devices:     fleetSize,
		Prefix:      "bench-",
		Groups:      groups,
		Resume:      true,
		MaxInflight: cfg.Inflight,
		Keepalive:   5 * time.Minute,
	})
	if err != nil {
		return nil, err
	}
	b.f = f
	b.prog = fleet.StartProgress(b.out, f.Stats, fleetSize)
	defer b.prog.Stop()
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		f.DisconnectAll(dctx)
	}()

	if err := b.enroll(ctx); err != nil {
		return nil, err
	}
	b.svc, err = f.ServiceCertificate(ctx, "bench-subscriber")
	if err != nil {
		return nil, err
	}

	ours := &BrokerResult{Name: "fleetgate"}
	b.res.Brokers = append(b.res.Brokers, ours)
	if err := b.broker(ctx, ours, gw.MQTT, gw.PID, true); err != nil {
		return nil, fmt.Errorf("fleetgate: %w", err)
	}
	if m, err := gw.Metric(ctx, "fleetgate_mqtt_messages_dropped_total"); err == nil {
		ours.GatewayDropped = int64(m)
	}
	_ = gw.Stop(30 * time.Second)

	if mosqPath != "" {
		b.say("starting Mosquitto (%s)", mosqPath)
		// Its own directory: the work directory is private (0700) and
		// Mosquitto runs as the mosquitto user.
		mdir, err := os.MkdirTemp("", "firmware-sim-mosquitto-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(mdir)
		m, err := spawn.StartMosquitto(ctx, spawn.MosquittoConfig{Path: mosqPath, Gateway: layout, Dir: mdir})
		if err != nil {
			return nil, err
		}
		defer m.Stop()
		theirs := &BrokerResult{Name: "mosquitto", Version: m.Version}
		b.res.Brokers = append(b.res.Brokers, theirs)
		if err := b.broker(ctx, theirs, m.Addr, m.PID, false); err != nil {
			return nil, fmt.Errorf("mosquitto: %w", err)
		}
		_ = m.Stop()
	}
	b.prog.Stop()
	b.res.Machine.LoadEnd = loadAverage()
	b.res.compare()
	if err := b.write(); err != nil {
		return nil, err
	}
	b.res.WriteTable(cfg.Stdout)
	fmt.Fprintf(cfg.Stdout, "\nwritten: %s, %s\n", filepath.Join(cfg.OutDir, "results.json"), filepath.Join(cfg.OutDir, "chart.svg"))
	return b.res, nil
}

type bench struct {
	cfg  Config
	reps int // repetitions of floor measurements
	res  *Results
	out  io.Writer
	gw   *spawn.Gateway
	f    *fleet.Fleet
	prog *fleet.Progress
	svc  tls.Certificate
}

func (b *bench) say(format string, args ...any) {
	if b.prog != nil {
		b.prog.Phase(fmt.Sprintf(format, args...))
		return
	}
	if b.out != nil {
		fmt.Fprintf(b.out, "bench: "+format+"\n", args...)
	}
}

func (b *bench) note(format string, args ...any) {
	n := fmt.Sprintf(format, args...)
	b.res.Notes = append(b.res.Notes, n)
	if b.out != nil {
		fmt.Fprintf(b.out, "bench: note: %s\n", n)
	}
}

// sample reads a process; a failure leaves a zero sample.
func sample(pid int) procstat.Sample {
	s, _ := procstat.Read(pid)
	return s
}

// enroll runs the enrollment storm against the gateway.
func (b *bench) enroll(ctx context.Context) error {
	f := b.f
	b.say("keys and CSRs for %d devices", len(f.Devices))
	if err := f.Prepare(ctx); err != nil {
		return err
	}
	b.say("minting %d tokens", len(f.Devices))
	if err := f.MintTokens(ctx, 24*time.Hour); err != nil {
		return err
	}
	b.say("enrollment storm: %d devices, %d in flight", len(f.Devices), b.cfg.Concurrency)
	g0, s0 := sample(b.gw.PID()), sample(os.Getpid())
	t0 := time.Now()
	ectx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	n, err := f.Enroll(ectx, fleet.EnrollOptions{Concurrency: b.cfg.Concurrency})
	cancel()
	if err != nil {
		return err
	}
	el := time.Since(t0)
	g1, s1 := sample(b.gw.PID()), sample(os.Getpid())
	snap := f.Stats.Enroll.Snapshot()
	e := &EnrollResult{
		Devices: len(f.Devices), Enrolled: n, Seconds: el.Seconds(), PerSecond: float64(n) / el.Seconds(),
		Latency: snap.Summary("enroll"), Errors: f.Stats.Errors(),
	}
	if n > 0 {
		e.ServerCPU = micros((g1.CPU - g0.CPU) / time.Duration(n))
		e.ClientCPU = micros((s1.CPU - s0.CPU) / time.Duration(n))
	}
	b.res.Enroll = e
	if n < len(f.Devices) {
		return fmt.Errorf("enrollment storm: %d of %d devices enrolled (%v)", n, len(f.Devices), e.Errors)
	}
	return nil
}

// broker runs the per-broker phases against the MQTT server at addr.
func (b *bench) broker(ctx context.Context, r *BrokerResult, addr string, pid func() int, ours bool) error {
	f := b.f
	f.ResetSessions()
	errs0 := f.Stats.Errors()
	if ours {
		// A fresh process: the enrollment storm's garbage would otherwise
		// sit in the baseline of the memory measurement and its GC debt in
		// the connect storm's CPU.
		b.say("fleetgate: restarting the gateway for a fresh baseline")
		if _, _, err := b.gw.Restart(ctx); err != nil {
			return err
		}
	}
	r.pid = pid()

	if ours {
		b.say("fleetgate: measuring the mTLS handshake floor again")
		if err := b.res.Floors.RemeasureHandshake(b.reps / 2); err != nil {
			return err
		}
	}

	// 1. Connect storm: sessions that stay open.
	b.say("%s: connect storm, %d mutual-TLS sessions", r.Name, b.cfg.Sessions)
	runtime.GC()
	time.Sleep(2 * time.Second)
	before := sample(pid())
	var heap0 float64
	if ours {
		heap0, _ = b.gw.Metric(ctx, "go_memstats_heap_inuse_bytes")
	}
	self0 := sample(os.Getpid())
	connect0 := f.Stats.Connect.Snapshot()
	t0 := time.Now()
	n, err := f.Connect(ctx, fleet.ConnectOptions{Addr: addr, Concurrency: b.cfg.Concurrency, Count: b.cfg.Sessions})
	if err != nil {
		return err
	}
	el := time.Since(t0)
	after := sample(pid())
	self1 := sample(os.Getpid())
	if n == 0 {
		return fmt.Errorf("no session connected: %v", diffErrors(errs0, f.Stats.Errors()))
	}
	r.Connect = ConnectResult{
		Sessions: n, Seconds: el.Seconds(), PerSecond: float64(n) / el.Seconds(),
		Latency:   f.Stats.Connect.Snapshot().Sub(connect0).Summary("connect"),
		ServerCPU: micros((after.CPU - before.CPU) / time.Duration(n)),
		ClientCPU: micros((self1.CPU - self0.CPU) / time.Duration(n)),
	}
	// 2. Idle sessions: let the server settle, then read its memory.
	b.say("%s: %d idle sessions settling", r.Name, n)
	time.Sleep(5 * time.Second)
	idle := sample(pid())
	r.Idle = IdleResult{Sessions: int(f.Stats.Connected.Load()), RSSBefore: before.RSS, RSSAfter: idle.RSS}
	if r.Idle.Sessions > 0 {
		r.Idle.PerSession = float64(idle.RSS-before.RSS) / float64(r.Idle.Sessions)
	}
	if ours && !b.cfg.Smoke && r.Idle.Sessions > 0 {
		// The connect storm's garbage is still in the heap: the Go runtime
		// collects an idle process every two minutes. Wait for that GC and
		// measure again: the steady state of idle sessions.
		b.say("fleetgate: %d idle sessions, waiting for the runtime's periodic GC (up to 150 s)", n)
		if heap1, ok := b.waitGC(ctx, 150*time.Second); ok {
			if heap0 > 0 && heap1 > 0 {
				r.Idle.HeapPerSession = (heap1 - heap0) / float64(r.Idle.Sessions)
			}
			time.Sleep(5 * time.Second) // let the scavenger return some pages
			gc := sample(pid())
			r.Idle.RSSAfterGC = gc.RSS
			r.Idle.PerSessionAfterGC = float64(gc.RSS-before.RSS) / float64(r.Idle.Sessions)
		} else {
			b.note("no garbage collection in the gateway within 150 s of the connect storm: memory per idle session includes the storm's garbage")
		}
	}

	// 3. Revocation with the sessions connected (fleetgate only).
	if ours {
		if err := b.revoke(ctx, n); err != nil {
			return err
		}
	}
	b.say("%s: disconnecting", r.Name)
	f.DisconnectAll(ctx)

	// 4. Resumed connects.
	if err := b.resumed(ctx, r, addr, pid); err != nil {
		return err
	}

	// 5. Latency at a fixed moderate rate, then throughput at QoS 0 and
	// 1 (after which a broker may hold backlog).
	first := 0
	if ours {
		first = b.cfg.Revoke // revoked devices sit at the front
	}
	lat, err := b.latency(ctx, r, addr, first)
	if err != nil {
		return err
	}
	r.Latency = lat
	for _, qos := range []byte{0, 1} {
		t, err := b.rounds(ctx, r, addr, qos, first)
		if err != nil {
			return err
		}
		if qos == 0 {
			r.QoS0 = t
		} else {
			r.QoS1 = t
		}
	}
	r.Errors = diffErrors(errs0, f.Stats.Errors())
	return nil
}

// waitGC waits until the gateway has completed one more garbage
// collection (go_gc_duration_seconds_count grows) and returns its Go heap
// in use right after it.
func (b *bench) waitGC(ctx context.Context, limit time.Duration) (float64, bool) {
	n0, err := b.gw.Metric(ctx, "go_gc_duration_seconds_count")
	if err != nil {
		return 0, false
	}
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if !fleet.Sleep(ctx, 500*time.Millisecond) {
			return 0, false
		}
		if n, err := b.gw.Metric(ctx, "go_gc_duration_seconds_count"); err == nil && n > n0 {
			heap, _ := b.gw.Metric(ctx, "go_memstats_heap_inuse_bytes")
			return heap, true
		}
	}
	return 0, false
}

// revoke revokes devices at the front of the fleet while every session is
// connected and checks their reconnects are refused.
func (b *bench) revoke(ctx context.Context, connected int) error {
	f := b.f
	k := min(b.cfg.Revoke, connected)
	b.say("fleetgate: revoking %d of %d connected devices", k, connected)
	res := &RevokeResult{Connected: connected, Revoked: k}
	before := f.Stats.Revoke.Snapshot()
	for _, d := range f.Devices[:k] {
		if _, err := f.Revoke(ctx, d, 10*time.Second); err != nil {
			res.Failures++
			f.Stats.Error("revoke", err)
			continue
		}
		c, err := f.Dial(ctx, d)
		switch {
		case err == nil:
			res.Admitted++
			_ = c.Close()
		case fleet.Denied(err):
			res.Refused++
			if res.How == nil {
				res.How = map[string]int{}
			}
			res.How[fleet.Reason(err)]++
		default:
			res.Failures++
			f.Stats.Error("reconnect after revoke", err)
		}
	}
	res.Latency = f.Stats.Revoke.Snapshot().Sub(before).Summary("revoke → disconnect")
	b.res.Revoke = res
	if res.Admitted > 0 {
		return fmt.Errorf("%d revoked devices were admitted again", res.Admitted)
	}
	return nil
}

// resumed measures reconnects that resume their TLS session.
func (b *bench) resumed(ctx context.Context, r *BrokerResult, addr string, pid func() int) error {
	f := b.f
	first := 0
	if r.Name == "fleetgate" {
		first = b.cfg.Revoke
	}
	devs := f.Devices[first:min(first+b.cfg.Resumed, len(f.Devices))]
	b.say("%s: %d connects to collect session tickets", r.Name, len(devs))
	if err := b.connectSet(ctx, devs, addr); err != nil {
		return err
	}
	f.DisconnectAll(ctx)
	b.say("%s: %d resumed connects", r.Name, len(devs))
	g0 := sample(pid())
	t0 := time.Now()
	var resumed, connects atomic.Int64
	err := b.forEach(ctx, devs, func(ctx context.Context, d *fleet.Device) error {
		c, err := f.DialTo(ctx, d, addr)
		if err != nil {
			f.Stats.Error("resumed connect", err)
			return nil
		}
		if c.ConnectionState().DidResume {
			resumed.Add(1)
		}
		connects.Add(1)
		_ = c.Disconnect()
		return nil
	})
	if err != nil {
		return err
	}
	el := time.Since(t0)
	g1 := sample(pid())
	n := int(connects.Load())
	if n == 0 {
		return errors.New("no resumed connect succeeded")
	}
	r.Resumed = ResumedResult{
		Connects: n, Resumed: int(resumed.Load()), PerSecond: float64(n) / el.Seconds(),
		ServerCPU: micros((g1.CPU - g0.CPU) / time.Duration(n)),
	}
	return nil
}

// connectSet connects the given devices to addr.
func (b *bench) connectSet(ctx context.Context, devs []*fleet.Device, addr string) error {
	return b.forEach(ctx, devs, func(ctx context.Context, d *fleet.Device) error {
		c, err := b.f.DialTo(ctx, d, addr)
		if err != nil {
			b.f.Stats.Error("connect", err)
			return nil
		}
		b.f.Adopt(d, c)
		return nil
	})
}

// rounds runs a throughput run cfg.Rounds times and returns the median
// round (by delivered msgs/s) with every round listed: on a shared host
// one run's rate moves by a quarter either way.
func (b *bench) rounds(ctx context.Context, r *BrokerResult, addr string, qos byte, first int) (*Throughput, error) {
	var runs []*Throughput
	for i := range b.cfg.Rounds {
		t, err := b.throughput(ctx, r, addr, qos, first, i+1)
		if err != nil {
			return nil, err
		}
		runs = append(runs, t)
	}
	return median(runs), nil
}

// median is the median of runs by delivered msgs/s, listing them all when
// there are several.
func median(runs []*Throughput) *Throughput {
	if len(runs) == 1 {
		return runs[0]
	}
	all := make([]Round, len(runs))
	for i, t := range runs {
		all[i] = Round{PerSecond: t.PerSecond, DeliveredPct: t.DeliveredPct, Dropped: t.Dropped, ServerCPU: t.ServerCPU, Seconds: t.Seconds}
	}
	sorted := slices.Clone(runs)
	slices.SortStableFunc(sorted, func(a, b *Throughput) int { return cmp.Compare(a.PerSecond, b.PerSecond) })
	m := *sorted[len(sorted)/2]
	m.Rounds = all
	return &m
}

// throughput: every publisher sends its messages as fast as it may.
func (b *bench) throughput(ctx context.Context, r *BrokerResult, addr string, qos byte, first, round int) (*Throughput, error) {
	f := b.f
	devs := f.Devices[first:min(first+b.cfg.Publishers, len(f.Devices))]
	if b.cfg.Rounds > 1 {
		b.say("%s: QoS %d throughput, %d publishers × %d messages, round %d of %d", r.Name, qos, len(devs), b.cfg.Messages, round, b.cfg.Rounds)
	} else {
		b.say("%s: QoS %d throughput, %d publishers × %d messages", r.Name, qos, len(devs), b.cfg.Messages)
	}
	sub, err := f.Subscribe(ctx, fleet.SubscribeOptions{Cert: b.svc, QoS: qos, Addr: addr})
	if err != nil {
		return nil, err
	}
	defer sub.Close()
	if err := b.connectSet(ctx, devs, addr); err != nil {
		return nil, err
	}
	defer f.DisconnectAll(ctx)
	recv0 := sub.R.Received()
	delivery0 := f.Stats.Delivery.Snapshot()
	g0 := sample(r.pid)
	res := f.Blast(ctx, b.cfg.Messages, qos, b.cfg.Payload, 5*time.Minute)
	got := sub.R.WaitQuiet(ctx, recv0+res.Sent, 3*time.Second) - recv0
	g1 := sample(r.pid)
	firstAt, lastAt := sub.R.Window()
	window := lastAt.Sub(firstAt)
	if window <= 0 {
		window = res.Elapsed
	}
	t := &Throughput{
		QoS: qos, Publishers: len(devs), Sent: res.Sent, Received: got, Duplicates: sub.R.Duplicates(),
		PublishErrors: res.Errors, SendSeconds: res.Elapsed.Seconds(), Seconds: window.Seconds(),
		PerSecond: float64(got) / window.Seconds(), SendPerSecond: float64(res.Sent) / res.Elapsed.Seconds(),
		Latency:   f.Stats.Delivery.Snapshot().Sub(delivery0).Summary("publish → receive"),
		ServerCPU: (g1.CPU - g0.CPU).Seconds(),
	}
	if res.Sent > 0 {
		t.DeliveredPct = 100 * float64(min(got, res.Sent)) / float64(res.Sent)
	}
	t.Dropped = max(res.Sent-got, 0)
	return t, nil
}

// latency: QoS 1 telemetry at a fixed moderate rate.
func (b *bench) latency(ctx context.Context, r *BrokerResult, addr string, first int) (*Throughput, error) {
	f := b.f
	devs := f.Devices[first:min(first+b.cfg.Publishers, len(f.Devices))]
	b.say("%s: latency at %.0f msgs/s (QoS 1) for %v", r.Name, b.cfg.LatencyRate, b.cfg.LatencyTime)
	sub, err := f.Subscribe(ctx, fleet.SubscribeOptions{Cert: b.svc, QoS: 1, Addr: addr})
	if err != nil {
		return nil, err
	}
	defer sub.Close()
	if err := b.connectSet(ctx, devs, addr); err != nil {
		return nil, err
	}
	defer f.DisconnectAll(ctx)
	pub0, recv0 := f.Stats.Published.Load(), sub.R.Received()
	delivery0 := f.Stats.Delivery.Snapshot()
	interval := time.Duration(float64(len(devs)) / b.cfg.LatencyRate * float64(time.Second))
	lctx, cancel := context.WithTimeout(ctx, b.cfg.LatencyTime)
	g0 := sample(r.pid)
	t0 := time.Now()
	f.Run(lctx, fleet.LoadOptions{Interval: interval, QoS: 1, Payload: b.cfg.Payload})
	cancel()
	el := time.Since(t0)
	g1 := sample(r.pid)
	sent := f.Stats.Published.Load() - pub0
	got := sub.R.WaitQuiet(ctx, recv0+sent, 3*time.Second) - recv0
	t := &Throughput{
		QoS: 1, Publishers: len(devs), Sent: sent, Received: got, Seconds: el.Seconds(),
		PerSecond: float64(got) / el.Seconds(), SendPerSecond: float64(sent) / el.Seconds(),
		Latency:   f.Stats.Delivery.Snapshot().Sub(delivery0).Summary("publish → receive"),
		ServerCPU: (g1.CPU - g0.CPU).Seconds(),
	}
	if sent > 0 {
		t.DeliveredPct = 100 * float64(min(got, sent)) / float64(sent)
	}
	t.Dropped = max(sent-got, 0)
	return t, nil
}

// forEach runs fn for each device with the configured concurrency.
func (b *bench) forEach(ctx context.Context, devs []*fleet.Device, fn func(context.Context, *fleet.Device) error) error {
	idx := make(map[*fleet.Device]bool, len(devs))
	for _, d := range devs {
		idx[d] = true
	}
	return b.f.Each(ctx, b.cfg.Concurrency, func(ctx context.Context, d *fleet.Device) error {
		if !idx[d] {
			return nil
		}
		return fn(ctx, d)
	})
}

func diffErrors(before, after map[string]int64) map[string]int64 {
	out := map[string]int64{}
	for k, v := range after {
		if d := v - before[k]; d > 0 {
			out[k] = d
		}
	}
	return out
}

// write stores results.json and chart.svg.
func (b *bench) write() error {
	if err := os.MkdirAll(b.cfg.OutDir, 0o755); err != nil {
		return fmt.Errorf("results dir: %w", err)
	}
	data, err := json.MarshalIndent(b.res, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(b.cfg.OutDir, "results.json"), append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(b.cfg.OutDir, "chart.svg"), []byte(Chart(b.res)), 0o644); err != nil {
		return fmt.Errorf("write chart: %w", err)
	}
	return nil
}

// machine describes where the bench ran.
func machine(fdLimit uint64) Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), FDLimit: int(fdLimit), LoadStart: loadAverage()}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(line, "MemTotal:") {
				var kb int64
				fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(line, "MemTotal:")), "%d", &kb)
				m.MemoryBytes = kb * 1024
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(line, "model name") {
				if _, v, ok := strings.Cut(line, ":"); ok {
					m.CPU = strings.TrimSpace(v)
				}
				break
			}
		}
	}
	return m
}

func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
