package spawn

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMosquittoConf(t *testing.T) {
	conf := MosquittoConf(18883, "/tmp/m", 1000000)
	for _, want := range []string{
		"per_listener_settings false", "allow_anonymous false", "listener 18883 127.0.0.1",
		"cafile /tmp/m/ca.pem", "certfile /tmp/m/server.crt", "keyfile /tmp/m/server.key",
		"require_certificate true", "use_identity_as_username true", "set_tcp_nodelay true",
		"max_queued_messages 1000000", "log_dest stderr",
	} {
		if !strings.Contains(conf, want+"\n") {
			t.Errorf("config lacks %q:\n%s", want, conf)
		}
	}
}

func TestScrapeMetric(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`# HELP fleetgate_mqtt_messages_dropped_total Messages dropped.
# TYPE fleetgate_mqtt_messages_dropped_total counter
fleetgate_mqtt_messages_dropped_total 7
fleetgate_mqtt_messages_dropped_total_extra 100
fleetgate_enrollments_total{result="ok"} 5
fleetgate_enrollments_total{result="bad_csr"} 2
`))
	}))
	defer srv.Close()
	ctx := context.Background()
	if v, err := ScrapeMetric(ctx, srv.URL, "fleetgate_mqtt_messages_dropped_total"); err != nil || v != 7 {
		t.Fatalf("dropped = %v, %v; want 7", v, err)
	}
	if v, err := ScrapeMetric(ctx, srv.URL, "fleetgate_enrollments_total"); err != nil || v != 7 {
		t.Fatalf("enrollments = %v, %v; want 7 (summed over labels)", v, err)
	}
	if _, err := ScrapeMetric(ctx, srv.URL, "nope"); err == nil {
		t.Fatal("missing metric found")
	}
}

func TestStartGatewayReportsAMissingBinary(t *testing.T) {
	_, err := StartGateway(context.Background(), GatewayConfig{Path: "/nonexistent/gateway", DataDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "gateway binary") {
		t.Fatalf("StartGateway = %v", err)
	}
}

// A child's exit code and last log line come back; one that ignores
// SIGTERM is killed after the timeout; a log is appended to, not replaced.
func TestProcess(t *testing.T) {
	log := filepath.Join(t.TempDir(), "child.log")
	p, err := Start("/bin/sh", []string{"-c", "echo first; echo last; exit 3"}, log)
	if err != nil {
		t.Fatal(err)
	}
	if code, ok := p.Wait(10 * time.Second); !ok || code != 3 {
		t.Fatalf("exit code %d (exited %v), want 3", code, ok)
	}
	if !p.Exited() || LastLine(p.Log) != "last" {
		t.Fatalf("exited %v, last line %q", p.Exited(), LastLine(p.Log))
	}
	p, err = Start("/bin/sh", []string{"-c", "trap '' TERM; echo again; exec sleep 30"}, log)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := p.Wait(200 * time.Millisecond); ok {
		t.Fatal("a sleeping child exited")
	}
	if err := p.Stop(300 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("stopping a child that ignores SIGTERM: %v, want killed", err)
	}
	if data, _ := os.ReadFile(log); string(data) != "first\nlast\nagain\n" {
		t.Fatalf("log %q, want both runs' output", data)
	}
}
