package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/internal/gwtest"
)

func runArgs(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestCommandLineRefusals(t *testing.T) {
	cases := []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "Usage"},
		{[]string{"storm"}, 2, "unknown scenario"},
		{[]string{"telemetry", "--qos", "2"}, 2, "--qos"},
		{[]string{"telemetry", "--bogus"}, 2, "bogus"},
		{[]string{"restart", "--data-dir", "/tmp"}, 1, "--spawn-gateway"},
		// More than any Linux allows one process (fs.nr_open is at most
		// 2^20), so it fails even where the hard limit may be raised.
		{[]string{"telemetry", "--devices", "2000000", "--data-dir", "/tmp"}, 1, "open files"},
		{[]string{"telemetry", "--devices", "2", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"bench", "--smoke", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"telemetry", "--devices", "2", "--data-dir", "/tmp", "--mqtt", "192.0.2.1:8883"}, 1, "loopback"},
		{[]string{"telemetry", "--spawn-gateway", "/bin/true", "--mqtt", "127.0.0.1:1"}, 2, "conflicts"},
	}
	for _, tc := range cases {
		code, _, errOut := runArgs(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("firmware-sim %s: exit %d, stderr %q; want exit %d mentioning %q", strings.Join(tc.args, " "), code, errOut, tc.code, tc.want)
		}
		if code == 1 && strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("firmware-sim %s: error is not one line: %q", strings.Join(tc.args, " "), errOut)
		}
	}
}

func TestTelemetryCommandAgainstAGateway(t *testing.T) {
	g := gwtest.Start(t)
	tg := g.Target()
	code, out, errOut := runArgs("telemetry", "--devices", "3", "--duration", "800ms", "--interval", "100ms", "--json", "--quiet",
		"--gateway", tg.ESTURL, "--mqtt", tg.MQTTAddr, "--admin", tg.AdminURL, "--data-dir", tg.DataDir)
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	var rep fleet.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out)
	}
	if rep.Scenario != "telemetry" || rep.Devices != 3 || !rep.OK() {
		t.Fatalf("report %+v", rep)
	}
}
