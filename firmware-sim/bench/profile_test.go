package bench

import (
	"context"
	"crypto/tls"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/internal/gwtest"
)

// TestProfileGateway captures CPU and heap profiles of a gateway running
// in this process under a simulated fleet: the enrollment storm, the
// connect storm, idle sessions and a QoS 1 blast. The load generator runs
// in the same process, so read the profiles focused on the server side
// (e.g. go tool pprof -top -focus 'mochi|gateway|serverHandshake' FILE).
//
// It runs only when FLEETGATE_PROFILE_DIR names a directory:
//
//	FLEETGATE_PROFILE_DIR=/tmp/prof FLEETGATE_PROFILE_DEVICES=3000 \
//	  go test -run TestProfileGateway -count=1 -timeout 30m ./firmware-sim/bench/
func TestProfileGateway(t *testing.T) {
	dir := os.Getenv("FLEETGATE_PROFILE_DIR")
	if dir == "" {
		t.Skip("set FLEETGATE_PROFILE_DIR to capture gateway profiles")
	}
	n := 2000
	if v, err := strconv.Atoi(os.Getenv("FLEETGATE_PROFILE_DEVICES")); err == nil && v > 0 {
		n = v
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	g := gwtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	f, err := fleet.New(fleet.Config{Target: g.Target(), Devices: n, Prefix: "prof-", MaxInflight: 8, Keepalive: 5 * time.Minute, Groups: []tls.CurveID{tls.X25519}})
	if err != nil {
		t.Fatal(err)
	}
	defer f.DisconnectAll(context.Background())
	if err := f.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.MintTokens(ctx, time.Hour); err != nil {
		t.Fatal(err)
	}
	profile := func(name string, fn func()) {
		t.Helper()
		out, err := os.Create(filepath.Join(dir, name+".cpu.pprof"))
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		if err := pprof.StartCPUProfile(out); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		fn()
		pprof.StopCPUProfile()
		t.Logf("%s: %v", name, time.Since(t0))
	}
	profile("enroll", func() {
		if k, err := f.Enroll(ctx, fleet.EnrollOptions{Concurrency: 64}); err != nil || k != n {
			t.Fatalf("enrolled %d of %d: %v %v", k, n, err, f.Stats.Errors())
		}
	})
	profile("connect", func() {
		if k, err := f.Connect(ctx, fleet.ConnectOptions{Concurrency: 64}); err != nil || k != n {
			t.Fatalf("connected %d of %d: %v %v", k, n, err, f.Stats.Errors())
		}
	})
	time.Sleep(3 * time.Second)
	runtime.GC()
	heap := func(name string) {
		if out, err := os.Create(filepath.Join(dir, name+".heap.pprof")); err == nil {
			_ = pprof.Lookup("heap").WriteTo(out, 0)
			out.Close()
		}
	}
	// Live memory of idle sessions, then what the idle gateway allocates
	// (compare the two with -base, sample_index=alloc_space).
	heap("idle")
	time.Sleep(20 * time.Second)
	runtime.GC()
	heap("idle-20s")
	cert, err := f.ServiceCertificate(ctx, "profiler")
	if err != nil {
		t.Fatal(err)
	}
	for _, qos := range []byte{0, 1} {
		sub, err := f.Subscribe(ctx, fleet.SubscribeOptions{Cert: cert, QoS: qos})
		if err != nil {
			t.Fatal(err)
		}
		var res fleet.BlastResult
		recv0 := sub.R.Received()
		profile("qos"+strconv.Itoa(int(qos)), func() {
			res = f.Blast(ctx, 50, qos, 128, 5*time.Minute)
			sub.R.WaitQuiet(ctx, recv0+res.Sent, 3*time.Second)
		})
		t.Logf("QoS %d: sent %d, received %d", qos, res.Sent, sub.R.Received()-recv0)
		sub.Close()
	}
}
