package spawn

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
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
