package scenario_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/internal/gwtest"
	"github.com/fleetgate/fleetgate/firmware-sim/scenario"
)

// TestScenarios runs every scenario with a handful of devices against an
// in-process gateway and expects every check to pass.
func TestScenarios(t *testing.T) {
	cases := []struct {
		name string
		cfg  scenario.Config
		// want names checks the report must hold (all must pass).
		want []string
	}{
		{scenario.Enroll, scenario.Config{Devices: 6, Concurrency: 3, Connect: true, Duration: time.Minute}, []string{"enrollment", "delivery"}},
		{scenario.Telemetry, scenario.Config{Devices: 4, Duration: 1500 * time.Millisecond, Interval: 100 * time.Millisecond, QoS: 1}, []string{"sessions", "delivery", "sessions kept"}},
		{scenario.RevokeDrill, scenario.Config{Devices: 6, Revoke: 2, Duration: 3 * time.Second, Interval: 200 * time.Millisecond, QoS: 1}, []string{"revoked sessions cut", "reconnects refused", "other devices unaffected"}},
		{scenario.Restart, scenario.Config{Devices: 4, Duration: 5 * time.Second, RestartAfter: time.Second, Jitter: 200 * time.Millisecond, Interval: 200 * time.Millisecond, QoS: 1}, []string{"full reconnection"}},
		{scenario.Soak, scenario.Config{Devices: 4, Duration: 2500 * time.Millisecond, StatsEvery: time.Second, Churn: 2, Interval: 100 * time.Millisecond, QoS: 0}, []string{"sessions"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			g := gwtest.Start(t)
			var progress bytes.Buffer
			tc.cfg.Progress = &progress
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			rep, err := scenario.Run(ctx, tc.name, tc.cfg, g)
			if err != nil {
				t.Fatal(err)
			}
			var table bytes.Buffer
			_ = rep.WriteTable(&table)
			if !rep.OK() {
				t.Fatalf("checks failed:\n%s", table.String())
			}
			for _, w := range tc.want {
				found := false
				for _, c := range rep.Checks {
					found = found || c.Name == w
				}
				if !found {
					t.Errorf("report has no %q check:\n%s", w, table.String())
				}
			}
			var js bytes.Buffer
			if err := rep.WriteJSON(&js); err != nil {
				t.Fatal(err)
			}
			var back fleet.Report
			if err := json.Unmarshal(js.Bytes(), &back); err != nil || back.Scenario != tc.name {
				t.Fatalf("JSON report does not round-trip: %v", err)
			}
			if tc.name == scenario.Soak && !strings.Contains(progress.String(), "soak ") {
				t.Errorf("soak printed no periodic statistics:\n%s", progress.String())
			}
		})
	}
}

func TestConfigRefusals(t *testing.T) {
	cases := []struct {
		name string
		cfg  scenario.Config
		want string
	}{
		{scenario.Telemetry, scenario.Config{Devices: 3, QoS: 2}, "--qos"},
		{scenario.Telemetry, scenario.Config{Devices: 3, Payload: 10}, "--payload"},
		{scenario.RevokeDrill, scenario.Config{Devices: 3, Revoke: 4}, "--revoke"},
		{scenario.Restart, scenario.Config{Devices: 3, Duration: time.Second, RestartAfter: 2 * time.Second}, "--restart-after"},
		{scenario.Telemetry, scenario.Config{Devices: 3, Groups: "rsa"}, "TLS group"},
	}
	for _, tc := range cases {
		err := tc.cfg.Validate(tc.name)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s %+v: Validate = %v, want an error about %s", tc.name, tc.cfg, err, tc.want)
		}
	}
	if _, err := scenario.CheckFileLimit(1_000_000, 64); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("a million devices passed the file limit check: %v", err)
	}
}
