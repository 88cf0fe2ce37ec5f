// Package scenario runs firmware-sim's load scenarios against a gateway:
// an enrollment storm, steady telemetry, a revocation drill, a gateway
// restart under load and a soak. Each builds a fleet (package fleet), runs
// bounded in count and time, and returns a report whose checks say
// whether the gateway behaved.
package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/procstat"
)

// Names of the scenarios.
const (
	Enroll      = "enroll"
	Telemetry   = "telemetry"
	RevokeDrill = "revoke-drill"
	Restart     = "restart"
	Soak        = "soak"
)

// Names lists the scenarios in the order help shows them.
var Names = []string{Enroll, Telemetry, RevokeDrill, Restart, Soak}

// Gateway is the gateway under test as a scenario sees it.
type Gateway interface {
	// Target is where devices find it.
	Target() fleet.Target
	// PID is its local process ID for CPU and memory readings, 0 when
	// unknown. It may change across a restart.
	PID() int
	// Restart restarts it; only a gateway firmware-sim started itself
	// can be restarted.
	Restart(ctx context.Context) (stopTook, startTook time.Duration, err error)
}

// ErrNoRestart is returned by Gateway.Restart for a gateway firmware-sim
// did not start.
var ErrNoRestart = errors.New("the restart scenario needs a gateway firmware-sim starts itself: pass --spawn-gateway PATH")

// Config is the configuration of every scenario; fields a scenario does
// not use are ignored.
type Config struct {
	// Devices is the fleet size.
	Devices int
	// Duration bounds the scenario (the load phase of telemetry, soak,
	// revoke-drill and restart; the whole run of enroll).
	Duration time.Duration
	// Prefix of device IDs (default: a random one per run).
	Prefix string
	// SourceIPs is the number of loopback source addresses.
	SourceIPs int
	// Groups is the TLS key exchange devices offer (see fleet.Groups).
	Groups string
	// Resume lets reconnecting devices resume their TLS session.
	Resume bool

	// Rate is the target enrollments per second (0: as fast as possible).
	Rate float64
	// Concurrency bounds enrollments and connects in flight.
	Concurrency int
	// Connect, for enroll: after enrolling, each device connects,
	// publishes one message and disconnects.
	Connect bool

	// Interval between two messages of one device.
	Interval time.Duration
	// QoS of telemetry, 0 or 1.
	QoS int
	// Payload bytes per message.
	Payload int

	// Revoke is how many devices the drill revokes.
	Revoke int
	// RevokeConcurrency is how many revoke requests run at once.
	RevokeConcurrency int

	// RestartAfter is when the restart scenario restarts the gateway.
	RestartAfter time.Duration
	// Jitter is the largest random delay before a device's first
	// reconnect attempt.
	Jitter time.Duration

	// StatsEvery is the soak's reporting period.
	StatsEvery time.Duration
	// Churn is how many random devices per second the soak disconnects
	// (they reconnect).
	Churn float64

	// Progress receives live progress (nil: none).
	Progress io.Writer
	Log      *slog.Logger
}

// Defaults per scenario.
func (c *Config) setDefaults(name string) {
	if c.Devices == 0 {
		c.Devices = 100
	}
	if c.Duration <= 0 {
		switch name {
		case Enroll:
			c.Duration = 10 * time.Minute
		case Soak:
			c.Duration = time.Hour
		default:
			c.Duration = 30 * time.Second
		}
	}
	if c.Concurrency <= 0 {
		c.Concurrency = fleet.DefaultConcurrency
	}
	if c.Interval <= 0 {
		c.Interval = time.Second
	}
	if c.Payload <= 0 {
		c.Payload = 128
	}
	if c.Revoke <= 0 {
		c.Revoke = max(1, c.Devices/10)
	}
	if c.RevokeConcurrency <= 0 {
		c.RevokeConcurrency = 1
	}
	if c.RestartAfter <= 0 {
		c.RestartAfter = c.Duration / 3
	}
	if c.Jitter < 0 {
		c.Jitter = 0
	}
	if c.StatsEvery <= 0 {
		c.StatsEvery = time.Minute
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// Validate checks the configuration of scenario name.
func (c *Config) Validate(name string) error {
	c.setDefaults(name)
	if c.Devices < 1 {
		return fmt.Errorf("--devices %d: need at least one device", c.Devices)
	}
	if c.QoS != 0 && c.QoS != 1 {
		return fmt.Errorf("--qos %d: want 0 or 1", c.QoS)
	}
	if c.Payload < fleet.MinPayload {
		return fmt.Errorf("--payload %d: at least %d bytes (sequence number and send time)", c.Payload, fleet.MinPayload)
	}
	if c.Payload > 256<<10 {
		return fmt.Errorf("--payload %d: at most 256 KiB (the gateway's packet limit)", c.Payload)
	}
	if name == RevokeDrill && c.Revoke > c.Devices {
		return fmt.Errorf("--revoke %d: more than --devices %d", c.Revoke, c.Devices)
	}
	if name == Restart && c.RestartAfter >= c.Duration {
		return fmt.Errorf("--restart-after %v: must be shorter than --duration %v", c.RestartAfter, c.Duration)
	}
	if _, err := fleet.Groups(c.Groups); err != nil {
		return err
	}
	return nil
}

// fdReserve is the file descriptors kept for everything that is not a
// device session: the subscriber, EST and admin connections, logs.
const fdReserve = 200

// CheckFileLimit raises the open-file limit and refuses a fleet that needs
// more simultaneous sessions than the limit allows.
func CheckFileLimit(devices, concurrency int) (int, error) {
	need := devices + concurrency + fdReserve
	lim, err := procstat.RaiseFileLimit(uint64(need))
	if err != nil {
		return 0, err
	}
	if uint64(need) > lim {
		return int(lim), fmt.Errorf("%d devices need about %d open files (one connection each, plus %d for enrollment and the subscriber), "+
			"but this process may open at most %d (its hard limit, which it could not raise): use at most %d devices per process",
			devices, need, concurrency+fdReserve, lim, int(lim)-concurrency-fdReserve)
	}
	return int(lim), nil
}

// Run runs scenario name against gw.
func Run(ctx context.Context, name string, cfg Config, gw Gateway) (*fleet.Report, error) {
	if err := cfg.Validate(name); err != nil {
		return nil, err
	}
	if name != Enroll {
		if _, err := CheckFileLimit(cfg.Devices, cfg.Concurrency); err != nil {
			return nil, err
		}
	} else if _, err := procstat.RaiseFileLimit(0); err != nil {
		return nil, err
	}
	s, err := newSession(name, cfg, gw)
	if err != nil {
		return nil, err
	}
	defer s.close()
	switch name {
	case Enroll:
		err = s.enroll(ctx)
	case Telemetry:
		err = s.telemetry(ctx)
	case RevokeDrill:
		err = s.revokeDrill(ctx)
	case Restart:
		err = s.restart(ctx)
	case Soak:
		err = s.soak(ctx)
	default:
		return nil, fmt.Errorf("unknown scenario %q", name)
	}
	if err != nil {
		return nil, err
	}
	s.finish()
	return s.report, nil
}

// session is one scenario run.
type session struct {
	name   string
	cfg    Config
	gw     Gateway
	f      *fleet.Fleet
	prog   *fleet.Progress
	report *fleet.Report
	start  time.Time
	sub    *fleet.Subscriber

	gwMu    sync.Mutex
	gwPID   int
	gwFirst procstat.Sample
	gwLast  procstat.Sample
	gwPeak  int64
}

func newSession(name string, cfg Config, gw Gateway) (*session, error) {
	groups, _ := fleet.Groups(cfg.Groups)
	f, err := fleet.New(fleet.Config{
		Target:      gw.Target(),
		Devices:     cfg.Devices,
		Prefix:      cfg.Prefix,
		SourceIPs:   cfg.SourceIPs,
		Groups:      groups,
		Resume:      cfg.Resume,
		MaxInflight: 32,
		Log:         cfg.Log,
	})
	if err != nil {
		return nil, err
	}
	s := &session{name: name, cfg: cfg, gw: gw, f: f, start: time.Now()}
	s.report = &fleet.Report{
		Scenario: name, Date: s.start.UTC(), Devices: cfg.Devices, Errors: map[string]int64{},
		Params: map[string]string{
			"prefix":     f.Prefix(),
			"tls_groups": orDefault(cfg.Groups, "x25519"),
		},
	}
	s.gwPID = gw.PID()
	if s.gwPID > 0 {
		if smp, err := procstat.Read(s.gwPID); err == nil {
			s.gwFirst, s.gwLast, s.gwPeak = smp, smp, smp.RSS
		} else {
			s.gwPID = 0
		}
		if lim, err := procstat.FileLimit(gw.PID()); err == nil && lim < cfg.Devices+100 && name != Enroll {
			s.report.Notes = append(s.report.Notes, fmt.Sprintf("the gateway's open-file limit is %d: it cannot hold %d sessions", lim, cfg.Devices))
		}
	}
	s.prog = fleet.StartProgress(cfg.Progress, f.Stats, cfg.Devices)
	s.prog.Extra = s.gatewayLine
	return s, nil
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// sampleGateway reads the gateway's CPU and memory; after a restart it
// starts over with the new process.
func (s *session) sampleGateway() (procstat.Sample, bool) {
	pid := s.gw.PID()
	if pid <= 0 {
		return procstat.Sample{}, false
	}
	smp, err := procstat.Read(pid)
	if err != nil {
		return procstat.Sample{}, false
	}
	s.gwMu.Lock()
	defer s.gwMu.Unlock()
	if pid != s.gwPID {
		s.gwPID, s.gwFirst = pid, smp
	}
	s.gwLast = smp
	s.gwPeak = max(s.gwPeak, smp.Peak, smp.RSS)
	return smp, true
}

func (s *session) gatewayLine() string {
	s.gwMu.Lock()
	prev := s.gwLast
	s.gwMu.Unlock()
	cur, ok := s.sampleGateway()
	if !ok {
		return ""
	}
	u := procstat.Since(prev, cur)
	return fmt.Sprintf("gateway CPU %.0f%% RSS %s", 100*u.Cores(), fleet.FormatBytes(cur.RSS))
}

func (s *session) close() {
	s.prog.Stop()
	if s.sub != nil {
		s.sub.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s.f.DisconnectAll(ctx)
}

// finish completes the report with errors, elapsed time and gateway use.
func (s *session) finish() {
	r := s.report
	r.Elapsed = time.Since(s.start).Seconds()
	for k, v := range s.f.Stats.Errors() {
		r.Errors[k] += v
	}
	if _, ok := s.sampleGateway(); ok {
		s.gwMu.Lock()
		u := procstat.Since(s.gwFirst, s.gwLast)
		r.Gateway = &fleet.ProcUsage{
			PID: s.gwPID, CPUSeconds: u.CPU.Seconds(), CPUPercent: 100 * u.Cores(),
			RSSStart: s.gwFirst.RSS, RSSEnd: s.gwLast.RSS, RSSPeak: s.gwPeak,
		}
		s.gwMu.Unlock()
	}
}

// phase names the current phase on the progress line.
func (s *session) phase(name string) { s.prog.Phase(name) }

// prepare makes keys, mints tokens and enrolls every device.
func (s *session) prepare(ctx context.Context) error {
	s.phase("keys and CSRs")
	if err := s.f.Prepare(ctx); err != nil {
		return err
	}
	s.phase("minting tokens")
	if err := s.f.MintTokens(ctx, 24*time.Hour); err != nil {
		return err
	}
	s.phase("enrolling")
	t0 := time.Now()
	g0, _ := s.sampleGateway()
	n, err := s.f.Enroll(ctx, fleet.EnrollOptions{Rate: s.cfg.Rate, Concurrency: s.cfg.Concurrency})
	if err != nil {
		return err
	}
	el := time.Since(t0)
	g1, gok := s.sampleGateway()
	s.report.AddRate("enrollments/s", float64(n)/el.Seconds(), "1/s")
	s.cpuPer("gateway CPU per enrollment", g0, g1, gok, n)
	s.report.Latencies = append(s.report.Latencies, s.f.Stats.Enroll.Snapshot().Summary("enroll (EST round trip)"))
	if n < len(s.f.Devices) {
		s.report.AddCheck("enrollment", false, "%d of %d devices enrolled", n, len(s.f.Devices))
		if n == 0 {
			return fmt.Errorf("no device enrolled (%s)", topErrors(s.f.Stats.Errors()))
		}
	} else {
		s.report.AddCheck("enrollment", true, "%d of %d devices enrolled in %.1fs", n, n, el.Seconds())
	}
	return nil
}

// minCPU is the least CPU time worth dividing: /proc counts in 10 ms ticks.
const minCPU = 200 * time.Millisecond

// cpuPer reports the gateway's CPU time per operation between two samples,
// when there is enough of it to mean something.
func (s *session) cpuPer(name string, a, b procstat.Sample, ok bool, n int) {
	if !ok || n == 0 {
		return
	}
	if d := b.CPU - a.CPU; d >= minCPU {
		s.report.AddCount(name, float64(d.Microseconds())/float64(n), "µs")
		return
	}
	s.report.Notes = append(s.report.Notes, fmt.Sprintf("%s: the gateway used under %v of CPU, too little to divide (/proc counts 10 ms ticks); use more devices", name, minCPU))
}

// subscribe issues the service certificate and subscribes.
func (s *session) subscribe(ctx context.Context, reconnect bool) error {
	s.phase("service subscriber")
	cert, err := s.f.ServiceCertificate(ctx, "firmware-sim-"+strconv.FormatInt(time.Now().UnixNano()%1e9, 36))
	if err != nil {
		return err
	}
	s.sub, err = s.f.Subscribe(ctx, fleet.SubscribeOptions{Cert: cert, QoS: byte(s.cfg.QoS), Reconnect: reconnect})
	return err
}

// connect opens every device's session.
func (s *session) connect(ctx context.Context) error {
	s.phase("connecting")
	t0 := time.Now()
	g0, _ := s.sampleGateway()
	n, err := s.f.Connect(ctx, fleet.ConnectOptions{Concurrency: s.cfg.Concurrency})
	if err != nil {
		return err
	}
	el := time.Since(t0)
	g1, gok := s.sampleGateway()
	s.report.AddRate("connects/s", float64(n)/el.Seconds(), "1/s")
	s.cpuPer("gateway CPU per connect", g0, g1, gok, n)
	s.report.Latencies = append(s.report.Latencies, s.f.Stats.Connect.Snapshot().Summary("connect (TCP+TLS+CONNACK)"))
	enrolled := int(s.f.Stats.Enrolled.Load())
	s.report.AddCheck("sessions", n == enrolled, "%d of %d enrolled devices connected", n, enrolled)
	if n == 0 {
		return fmt.Errorf("no device connected (%s)", topErrors(s.f.Stats.Errors()))
	}
	return nil
}

// loadOptions are the telemetry options of the configuration.
func (s *session) loadOptions() fleet.LoadOptions {
	s.report.Params["interval"] = s.cfg.Interval.String()
	s.report.Params["qos"] = strconv.Itoa(s.cfg.QoS)
	s.report.Params["payload"] = strconv.Itoa(s.cfg.Payload)
	return fleet.LoadOptions{Interval: s.cfg.Interval, QoS: byte(s.cfg.QoS), Payload: s.cfg.Payload}
}

// delivery reports what the subscriber received of what was published.
func (s *session) delivery(ctx context.Context, loadTime time.Duration, strict bool) {
	st := s.f.Stats
	sent := st.Published.Load()
	s.phase("draining")
	got := s.sub.R.WaitQuiet(ctx, sent, 3*time.Second)
	r := s.report
	r.AddCount("messages published", float64(sent), "")
	r.AddCount("messages received", float64(got), "")
	r.AddCount("duplicates", float64(s.sub.R.Duplicates()), "")
	if n := st.PubErrors.Load(); n > 0 {
		r.AddCount("publish errors", float64(n), "")
	}
	if loadTime > 0 {
		r.AddRate("publish rate", float64(sent)/loadTime.Seconds(), "msgs/s")
		r.AddRate("receive rate", float64(got)/loadTime.Seconds(), "msgs/s")
	}
	pct := 100.0
	if sent > 0 {
		pct = 100 * float64(min(got, sent)) / float64(sent)
	}
	r.AddCount("delivered", pct, "%")
	r.Latencies = append(r.Latencies, st.Delivery.Snapshot().Summary("publish → receive"))
	if strict {
		r.AddCheck("delivery", got >= sent && sent > 0, "%d of %d QoS %d messages delivered (%.2f%%)", got, sent, s.cfg.QoS, pct)
	}
}

func topErrors(m map[string]int64) string {
	var best string
	var n int64
	for k, v := range m {
		if v > n {
			best, n = k, v
		}
	}
	if best == "" {
		return "no error recorded"
	}
	return fmt.Sprintf("%d× %s", n, best)
}
