package scenario

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/mqttc"
	"github.com/fleetgate/fleetgate/firmware-sim/procstat"
)

// setupTimeout bounds preparing a fleet (keys, tokens, enrollment,
// connects) in the scenarios whose --duration is the load phase.
const setupTimeout = 30 * time.Minute

// enroll: an enrollment storm, then (with Connect) each device's first
// telemetry message through its own session.
func (s *session) enroll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Duration)
	defer cancel()
	s.report.Params["rate"] = rateString(s.cfg.Rate)
	s.report.Params["concurrency"] = strconv.Itoa(s.cfg.Concurrency)
	if err := s.prepare(ctx); err != nil {
		return err
	}
	if !s.cfg.Connect {
		return nil
	}
	s.cfg.QoS = 1
	if err := s.subscribe(ctx, false); err != nil {
		return err
	}
	s.phase("first telemetry")
	t0 := time.Now()
	err := s.f.Each(ctx, s.cfg.Concurrency, func(ctx context.Context, d *fleet.Device) error {
		if !d.Enrolled() {
			return nil
		}
		c, err := s.f.Dial(ctx, d)
		if err != nil {
			s.f.Stats.Error("connect", err)
			return nil
		}
		pctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		_ = s.f.PublishOne(pctx, d, c, 1, s.cfg.Payload)
		cancel()
		_ = c.Disconnect()
		return nil
	})
	if err != nil {
		return err
	}
	s.report.Latencies = append(s.report.Latencies, s.f.Stats.Connect.Snapshot().Summary("connect (TCP+TLS+CONNACK)"))
	s.delivery(ctx, time.Since(t0), true)
	return nil
}

func rateString(r float64) string {
	if r <= 0 {
		return "max"
	}
	return strconv.FormatFloat(r, 'f', -1, 64) + "/s"
}

// setupLoad enrolls, subscribes and connects every device.
func (s *session) setupLoad(ctx context.Context, reconnectSubscriber bool) error {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	if err := s.prepare(ctx); err != nil {
		return err
	}
	if err := s.subscribe(ctx, reconnectSubscriber); err != nil {
		return err
	}
	return s.connect(ctx)
}

// telemetry: steady publishing for the duration.
func (s *session) telemetry(ctx context.Context) error {
	if err := s.setupLoad(ctx, false); err != nil {
		return err
	}
	opts := s.loadOptions()
	s.phase("telemetry")
	t0 := time.Now()
	lctx, cancel := context.WithTimeout(ctx, s.cfg.Duration)
	s.f.Run(lctx, opts)
	cancel()
	s.delivery(ctx, time.Since(t0), s.cfg.QoS == 1)
	lost := s.f.Stats.Lost.Load()
	s.report.AddCheck("sessions kept", lost == 0, "%d sessions lost during the run", lost)
	return nil
}

// drill is the bookkeeping of a revocation drill.
type drill struct {
	mu        sync.Mutex
	revokedAt map[*fleet.Device]time.Time
	refused   atomic.Int64 // reconnects the gateway refused, as it must
	accepted  atomic.Int64 // reconnects it admitted: a failure
	failed    atomic.Int64 // reconnects that failed otherwise
	attempts  atomic.Int64
	others    atomic.Int64 // sessions of devices not revoked that ended
	how       sync.Map     // reason → *atomic.Int64: how reconnects were refused
}

func (dr *drill) refusedBy(reason string) {
	v, _ := dr.how.LoadOrStore(reason, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func (dr *drill) refusals() string {
	var parts []string
	dr.how.Range(func(k, v any) bool {
		parts = append(parts, fmt.Sprintf("%d %s", v.(*atomic.Int64).Load(), k))
		return true
	})
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func (dr *drill) victim(d *fleet.Device) bool {
	dr.mu.Lock()
	defer dr.mu.Unlock()
	_, ok := dr.revokedAt[d]
	return ok
}

// revokeDrill: revoke devices through the admin API while the fleet
// publishes; measure revoke→disconnect per device and confirm reconnects
// are refused.
func (s *session) revokeDrill(ctx context.Context) error {
	if err := s.setupLoad(ctx, false); err != nil {
		return err
	}
	dr := &drill{revokedAt: map[*fleet.Device]time.Time{}}
	opts := s.loadOptions()
	opts.OnLost = func(ctx context.Context, d *fleet.Device, _ *mqttc.Conn) bool {
		if !dr.victim(d) {
			dr.others.Add(1)
			return false
		}
		// A revoked device comes back at once, as a stolen one would.
		dr.attempts.Add(1)
		c, err := s.f.Dial(ctx, d)
		switch {
		case err == nil:
			dr.accepted.Add(1)
			_ = c.Close()
		case fleet.Denied(err):
			dr.refused.Add(1)
			dr.refusedBy(fleet.Reason(err))
		default:
			dr.failed.Add(1)
			s.f.Stats.Error("reconnect after revoke", err)
		}
		return false
	}
	s.report.Params["revoke"] = strconv.Itoa(s.cfg.Revoke)
	s.report.Params["revoke_concurrency"] = strconv.Itoa(s.cfg.RevokeConcurrency)

	lctx, cancel := context.WithTimeout(ctx, s.cfg.Duration)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.f.Run(lctx, opts)
	}()
	s.phase("telemetry (warm-up)")
	fleet.Sleep(lctx, min(s.cfg.Duration/4, 5*time.Second))

	// Victims spread evenly over the fleet (and its source addresses).
	var victims []*fleet.Device
	step := float64(len(s.f.Devices)) / float64(s.cfg.Revoke)
	for i := range s.cfg.Revoke {
		if d := s.f.Devices[int(float64(i)*step)]; d.Conn() != nil {
			victims = append(victims, d)
		}
	}
	s.phase(fmt.Sprintf("revoking %d devices", len(victims)))
	var (
		request        fleet.Histogram
		notCut, noLive atomic.Int64
		errs           atomic.Int64
	)
	t0 := time.Now()
	var next atomic.Int64
	var rw sync.WaitGroup
	for range min(s.cfg.RevokeConcurrency, len(victims)) {
		rw.Add(1)
		go func() {
			defer rw.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(victims) || lctx.Err() != nil {
					return
				}
				d := victims[i]
				c := d.Conn()
				start := time.Now()
				dr.mu.Lock()
				dr.revokedAt[d] = start
				dr.mu.Unlock()
				rctx, rcancel := context.WithTimeout(lctx, 30*time.Second)
				res, err := s.f.Admin().Revoke(rctx, d.ID, "keyCompromise")
				rcancel()
				request.Observe(time.Since(start))
				if err != nil {
					errs.Add(1)
					s.f.Stats.Error("revoke", err)
					continue
				}
				if !res.Disconnected {
					noLive.Add(1)
				}
				if c == nil {
					notCut.Add(1)
					continue
				}
				select {
				case <-c.Done():
					s.f.Stats.Revoke.Observe(c.ClosedAt().Sub(start))
				case <-time.After(10 * time.Second):
					notCut.Add(1)
				case <-lctx.Done():
					notCut.Add(1)
				}
			}
		}()
	}
	rw.Wait()
	revokeTime := time.Since(t0)
	// Let the victims' reconnect attempts finish.
	deadline := time.Now().Add(15 * time.Second)
	for dr.refused.Load()+dr.accepted.Load()+dr.failed.Load() < dr.attempts.Load() || dr.attempts.Load() < int64(s.f.Stats.Revoke.Snapshot().Count()) {
		if time.Now().After(deadline) || lctx.Err() != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.phase("telemetry (after the revocations)")
	<-lctx.Done()
	wg.Wait()

	cut := s.f.Stats.Revoke.Snapshot()
	r := s.report
	r.Latencies = append(r.Latencies, cut.Summary("revoke → disconnect"), request.Snapshot().Summary("revoke request (admin API)"))
	r.AddRate("revocations/s", float64(len(victims))/revokeTime.Seconds(), "1/s")
	r.AddCount("devices connected during the drill", float64(len(s.f.Devices)), "")
	r.AddCheck("revoked sessions cut", int(cut.Count()) == len(victims) && errs.Load() == 0,
		"%d of %d revoked devices disconnected (%d revoke errors, %d not cut within 10s)", cut.Count(), len(victims), errs.Load(), notCut.Load())
	if noLive.Load() > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("the gateway reported no live session for %d revoked devices", noLive.Load()))
	}
	r.AddCheck("reconnects refused", dr.accepted.Load() == 0 && dr.refused.Load() == dr.attempts.Load() && dr.attempts.Load() > 0,
		"%d of %d reconnect attempts of revoked devices refused [%s] (%d admitted, %d failed otherwise)",
		dr.refused.Load(), dr.attempts.Load(), dr.refusals(), dr.accepted.Load(), dr.failed.Load())
	r.AddCheck("other devices unaffected", dr.others.Load() == 0, "%d sessions of devices not revoked ended", dr.others.Load())
	if p99 := cut.Quantile(0.99); cut.Count() > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("revoke→disconnect p99 %.1f ms with %d devices connected (target < 50 ms)", float64(p99.Microseconds())/1000, len(s.f.Devices)))
	}
	s.delivery(ctx, s.cfg.Duration, false)
	return nil
}

// restart: restart the gateway under load; devices reconnect with jitter
// and backoff.
func (s *session) restart(ctx context.Context) error {
	if err := s.setupLoad(ctx, true); err != nil {
		return err
	}
	opts := s.loadOptions()
	opts.Reconnect = true
	opts.Jitter = s.cfg.Jitter
	s.report.Params["jitter"] = s.cfg.Jitter.String()
	s.report.Params["restart_after"] = s.cfg.RestartAfter.String()
	lctx, cancel := context.WithTimeout(ctx, s.cfg.Duration)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.f.Run(lctx, opts)
	}()
	s.phase("telemetry (before the restart)")
	fleet.Sleep(lctx, s.cfg.RestartAfter)
	if lctx.Err() != nil {
		wg.Wait()
		return fmt.Errorf("duration over before the restart")
	}
	want := s.f.Stats.Connected.Load()
	s.phase("restarting the gateway")
	t0 := time.Now()
	stopTook, startTook, err := s.gw.Restart(lctx)
	if err != nil {
		cancel()
		wg.Wait()
		return err
	}
	ready := time.Now()
	s.sampleGateway() // the new process: its use counts from here
	s.report.Notes = append(s.report.Notes, "gateway CPU and memory are those of the restarted process, from its start")
	s.phase("reconnect storm")
	var full time.Duration
	for lctx.Err() == nil {
		if s.f.Stats.Connected.Load() >= want && s.f.Stats.Reconnects.Load() >= want {
			var last time.Time
			for _, d := range s.f.Devices {
				if at := d.ConnectedAt(); at.After(last) {
					last = at
				}
			}
			full = last.Sub(t0)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.phase("telemetry (after the restart)")
	<-lctx.Done()
	wg.Wait()

	r := s.report
	r.AddCount("gateway stop took", ms(stopTook), "ms")
	r.AddCount("gateway start took", ms(startTook), "ms")
	r.Latencies = append(r.Latencies, s.f.Stats.Reconnect.Snapshot().Summary("lost → reconnected"))
	r.AddCount("reconnects", float64(s.f.Stats.Reconnects.Load()), "")
	if full > 0 {
		r.AddCount("time to full reconnection (from stop)", ms(full), "ms")
		r.AddCount("time to full reconnection (from ready)", ms(full-ready.Sub(t0)), "ms")
	}
	r.AddCheck("full reconnection", full > 0, "%d of %d sessions back before the end of --duration", min(s.f.Stats.Reconnects.Load(), want), want)
	s.delivery(ctx, s.cfg.Duration, false)
	return nil
}

// soak: telemetry for hours with periodic statistics, optional churn.
func (s *session) soak(ctx context.Context) error {
	if err := s.setupLoad(ctx, true); err != nil {
		return err
	}
	opts := s.loadOptions()
	opts.Reconnect = true
	opts.Jitter = max(s.cfg.Jitter, time.Second)
	s.report.Params["stats_every"] = s.cfg.StatsEvery.String()
	s.report.Params["churn"] = strconv.FormatFloat(s.cfg.Churn, 'f', -1, 64) + "/s"
	lctx, cancel := context.WithTimeout(ctx, s.cfg.Duration)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.f.Run(lctx, opts)
	}()
	if s.cfg.Churn > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(time.Duration(float64(time.Second) / s.cfg.Churn))
			defer t.Stop()
			for {
				select {
				case <-lctx.Done():
					return
				case <-t.C:
					s.f.Kick(s.f.Devices[rand.IntN(len(s.f.Devices))])
				}
			}
		}()
	}
	s.phase("soak")
	t0 := time.Now()
	st := s.f.Stats
	var (
		rssMin, rssMax int64
		rssFirst       int64
	)
	prevDelivery := st.Delivery.Snapshot()
	prevPub, prevRecv, prevT := st.Published.Load(), st.Received.Load(), time.Now()
	prevGw, gwOK := s.sampleGateway()
	tick := time.NewTicker(s.cfg.StatsEvery)
	defer tick.Stop()
	for lctx.Err() == nil {
		select {
		case <-lctx.Done():
		case now := <-tick.C:
			cur := st.Delivery.Snapshot()
			win := cur.Sub(prevDelivery)
			pub, recv := st.Published.Load(), st.Received.Load()
			dt := now.Sub(prevT).Seconds()
			line := fmt.Sprintf("soak %s: connected %d, published %.0f/s, received %.0f/s, p99 %.1f ms, errors %d",
				time.Since(t0).Round(time.Second), st.Connected.Load(), float64(pub-prevPub)/dt, float64(recv-prevRecv)/dt,
				float64(win.Quantile(0.99).Microseconds())/1000, st.ErrorTotal())
			if g, ok := s.sampleGateway(); ok && gwOK {
				u := procstat.Since(prevGw, g)
				line += fmt.Sprintf(", gateway CPU %.0f%% RSS %s", 100*u.Cores(), fleet.FormatBytes(g.RSS))
				if rssFirst == 0 {
					rssFirst, rssMin = g.RSS, g.RSS
				}
				rssMin, rssMax = min(rssMin, g.RSS), max(rssMax, g.RSS)
				prevGw = g
			}
			s.prog.Printf("%s", line)
			prevDelivery, prevPub, prevRecv, prevT = cur, pub, recv, now
		}
	}
	wg.Wait()
	r := s.report
	if rssFirst > 0 {
		r.AddCount("gateway RSS at first report", float64(rssFirst)/(1<<20), "MiB")
		r.AddCount("gateway RSS min", float64(rssMin)/(1<<20), "MiB")
		r.AddCount("gateway RSS max", float64(rssMax)/(1<<20), "MiB")
	}
	r.AddCount("reconnects", float64(st.Reconnects.Load()), "")
	s.delivery(ctx, s.cfg.Duration, s.cfg.QoS == 1 && s.cfg.Churn == 0)
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
