package server_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

func TestPprofOnMetricsListener(t *testing.T) {
	get := func(t *testing.T, url string) int {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, on := range []bool{false, true} {
		e := newEnv(t, func(c *server.Config) { c.MetricsListen = "127.0.0.1:0"; c.Pprof = on })
		base := "http://" + e.srv.Addr("metrics")
		if code := get(t, base+"/metrics"); code != http.StatusOK {
			t.Fatalf("pprof %v: /metrics answered %d", on, code)
		}
		want := http.StatusNotFound
		if on {
			want = http.StatusOK
		}
		if code := get(t, base+"/debug/pprof/cmdline"); code != want {
			t.Fatalf("pprof %v: /debug/pprof/cmdline answered %d, want %d", on, code, want)
		}
	}

	t.Run("refused without a metrics listener", func(t *testing.T) {
		l := pki.Layout{Dir: t.TempDir()}
		if err := pki.Init(l, pki.InitOptions{Hosts: []string{"localhost"}}); err != nil {
			t.Fatal(err)
		}
		cfg := server.Config{DataDir: l.Dir, MQTTListen: "127.0.0.1:0", ESTListen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Pprof: true}
		_, err := server.New(context.Background(), cfg, nil)
		if err == nil || !strings.Contains(err.Error(), "--pprof needs --metrics-listen") {
			t.Fatalf("New with --pprof alone: %v", err)
		}
	})
}
