package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/bench"
	"github.com/fleetgate/fleetgate/firmware-sim/demo"
	"github.com/fleetgate/fleetgate/firmware-sim/fleet"
	"github.com/fleetgate/fleetgate/firmware-sim/scenario"
	"github.com/fleetgate/fleetgate/firmware-sim/spawn"
	"github.com/fleetgate/fleetgate/pkg/cli"
)

const usage = `Usage: firmware-sim SCENARIO [flags]

Scenarios (simulated devices, each with its own key, token, EST enrollment,
mutual-TLS MQTT session and telemetry):
  enroll        enrollment storm at --rate (or as fast as possible), then each
                device's first telemetry message
  telemetry     steady telemetry at --interval per device, --qos 0|1, --payload
  revoke-drill  revoke --revoke devices while they publish: revoke→disconnect
                latency, reconnects refused
  restart       restart the gateway under load (needs --spawn-gateway): the
                reconnect storm and the time to full reconnection
  soak          telemetry for hours (--duration) with periodic statistics

Other commands:
  bench         fleetgate against Mosquitto on the same load, with the crypto
                floors; writes firmware-sim/bench-results/ (--smoke for CI)
  demo          start a dev gateway, enroll real agents, show telemetry flowing,
                revoke one device and show it cut off, then stop everything
  version       print the version

Every scenario takes the gateway's addresses:
  firmware-sim SCENARIO --devices N --duration D --gateway https://HOST:PORT
      --mqtt HOST:PORT --admin https://HOST:PORT --data-dir DIR [--ca FILE]
or starts one itself:
  firmware-sim SCENARIO --devices N --spawn-gateway bin/gateway [--data-dir DIR]

Load goes only to loopback addresses (127.0.0.0/8).
Run 'firmware-sim SCENARIO --help' for the flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "version", "--version":
		fmt.Fprintln(stdout, cli.VersionString("firmware-sim"))
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	case "demo":
		return runDemo(ctx, args[1:], stdout, stderr)
	case "bench":
		return runBench(ctx, args[1:], stdout, stderr)
	default:
		for _, n := range scenario.Names {
			if args[0] == n {
				return runScenario(ctx, n, args[1:], stdout, stderr)
			}
		}
		fmt.Fprintf(stderr, "firmware-sim: unknown scenario %q\n\n%s", args[0], usage)
		return 2
	}
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg demo.Config
	fs := flag.NewFlagSet("firmware-sim demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.Devices, "devices", 3, "number of agents to enroll")
	fs.DurationVar(&cfg.Watch, "watch", 4*time.Second, "how long to show telemetry before and after the revocation")
	fs.StringVar(&cfg.BinDir, "bin-dir", "", "directory with the gateway and agent binaries (default: next to firmware-sim)")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "keep the demo's data in this directory (default: a temporary one, removed at the end)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if cfg.BinDir == "" {
		dir, err := ownDir()
		if err != nil {
			fmt.Fprintf(stderr, "firmware-sim demo: %v\n", err)
			return 1
		}
		cfg.BinDir = dir
	}
	if err := demo.Run(ctx, cfg, stdout); err != nil {
		fmt.Fprintf(stderr, "firmware-sim demo: %v\n", err)
		return 1
	}
	return 0
}

// staticGateway is a gateway firmware-sim did not start.
type staticGateway struct {
	target fleet.Target
	pid    int
}

// Target, PID and Restart implement scenario.Gateway.
func (g staticGateway) Target() fleet.Target { return g.target }
func (g staticGateway) PID() int             { return g.pid }
func (g staticGateway) Restart(context.Context) (time.Duration, time.Duration, error) {
	return 0, 0, scenario.ErrNoRestart
}

func runScenario(ctx context.Context, name string, args []string, stdout, stderr io.Writer) int {
	var (
		cfg                        scenario.Config
		target                     fleet.Target
		spawnPath, gwLogLevel      string
		gwArgs                     listFlag
		gwPID                      int
		asJSON, quiet              bool
		logLevel, logFormat        string
		qos                        int
		estURL, mqttAddr, adminURL string
	)
	fs := flag.NewFlagSet("firmware-sim "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.Devices, "devices", 100, "number of simulated devices")
	fs.DurationVar(&cfg.Duration, "duration", 0, "how long the load runs (enroll: bound of the whole run; default 30s, enroll 10m, soak 1h)")
	fs.StringVar(&estURL, "gateway", "https://localhost:8443", "the gateway's EST listener")
	fs.StringVar(&mqttAddr, "mqtt", "localhost:8883", "the gateway's MQTT listener")
	fs.StringVar(&adminURL, "admin", "https://localhost:9443", "the gateway's admin API")
	fs.StringVar(&target.DataDir, "data-dir", "", "gateway data directory with the operator certificate (with --spawn-gateway: the spawned gateway's, default a temporary one)")
	fs.StringVar(&target.CAFile, "ca", "", "CA bundle the devices trust (default DATA-DIR/ca.pem)")
	fs.StringVar(&spawnPath, "spawn-gateway", "", "start this gateway binary (--dev) on free loopback ports and run against it")
	fs.StringVar(&gwLogLevel, "gateway-log-level", "info", "with --spawn-gateway: the gateway's log level")
	fs.Var(&gwArgs, "gateway-arg", "with --spawn-gateway: one more gateway flag, e.g. --gateway-arg=--mqtt-publish-rate=off (repeatable)")
	fs.IntVar(&gwPID, "gateway-pid", 0, "PID of a local gateway, for its CPU and memory in the report")
	fs.BoolVar(&asJSON, "json", false, "print the report as JSON")
	fs.BoolVar(&quiet, "quiet", false, "no live progress")
	fs.StringVar(&cfg.Prefix, "prefix", "", "device ID prefix (default sim-RANDOM-)")
	fs.IntVar(&cfg.SourceIPs, "source-ips", 0, "spread devices over this many source addresses 127.0.0.2… (0: one per device; -1: the kernel's choice)")
	fs.StringVar(&cfg.Groups, "tls-groups", "x25519", "TLS key exchange devices offer: x25519, p256, mlkem (X25519MLKEM768) or default")
	fs.BoolVar(&cfg.Resume, "resume", false, "resume TLS sessions (tickets) on reconnect")
	fs.Float64Var(&cfg.Rate, "rate", 0, "target enrollments per second (0: as fast as possible)")
	fs.IntVar(&cfg.Concurrency, "concurrency", fleet.DefaultConcurrency, "enrollments and connects in flight at most")
	fs.StringVar(&logLevel, "log-level", "warn", "log level: debug, info, warn or error")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	if name == scenario.Enroll {
		fs.BoolVar(&cfg.Connect, "connect", true, "after enrolling, each device connects and publishes one message")
	} else {
		fs.DurationVar(&cfg.Interval, "interval", time.Second, "telemetry period of each device")
		fs.IntVar(&qos, "qos", 1, "telemetry QoS: 0 or 1")
		fs.IntVar(&cfg.Payload, "payload", 128, "telemetry payload bytes")
	}
	switch name {
	case scenario.RevokeDrill:
		fs.IntVar(&cfg.Revoke, "revoke", 0, "devices to revoke (default a tenth of --devices)")
		fs.IntVar(&cfg.RevokeConcurrency, "revoke-concurrency", 1, "revoke requests in flight")
	case scenario.Restart:
		fs.DurationVar(&cfg.RestartAfter, "restart-after", 0, "when to restart the gateway (default a third of --duration)")
		fs.DurationVar(&cfg.Jitter, "jitter", 2*time.Second, "largest random delay before a device's first reconnect attempt")
	case scenario.Soak:
		fs.DurationVar(&cfg.StatsEvery, "stats-every", time.Minute, "period of the statistics lines")
		fs.Float64Var(&cfg.Churn, "churn", 0, "random devices disconnected per second (they reconnect)")
		fs.DurationVar(&cfg.Jitter, "jitter", 2*time.Second, "largest random delay before a reconnect")
	}
	if code, ok := parseArgs(fs, args, stderr); !ok {
		return code
	}
	cfg.QoS = qos
	fail := func(err error) int {
		fmt.Fprintf(stderr, "firmware-sim %s: %v\n", name, oneLine(err))
		return 1
	}
	log, err := cli.NewLogger(stderr, logFormat, logLevel)
	if err != nil {
		return fail(err)
	}
	cfg.Log = log
	if !quiet {
		cfg.Progress = stderr
	}
	if err := cfg.Validate(name); err != nil {
		fmt.Fprintf(stderr, "firmware-sim %s: %v\n", name, err)
		return 2
	}

	var gw scenario.Gateway
	if spawnPath != "" {
		given := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
		for _, f := range []string{"gateway", "mqtt", "admin", "ca", "gateway-pid"} {
			if given[f] {
				fmt.Fprintf(stderr, "firmware-sim %s: --%s conflicts with --spawn-gateway (the spawned gateway's addresses are used)\n", name, f)
				return 2
			}
		}
		if name != scenario.Enroll {
			if _, err := scenario.CheckFileLimit(cfg.Devices, cfg.Concurrency); err != nil {
				return fail(err)
			}
		}
		dir := target.DataDir
		if dir == "" {
			tmp, err := os.MkdirTemp("", "firmware-sim-gateway-")
			if err != nil {
				return fail(err)
			}
			defer os.RemoveAll(tmp)
			dir = tmp
		}
		g, err := spawn.StartGateway(ctx, spawn.GatewayConfig{Path: spawnPath, DataDir: dir, LogLevel: gwLogLevel, Args: gwArgs})
		if err != nil {
			return fail(err)
		}
		defer g.Stop(30 * time.Second)
		if !quiet {
			fmt.Fprintf(stderr, "gateway started (pid %d): mqtt %s, est %s, admin %s, log %s\n", g.PID(), g.MQTT, g.EST, g.Admin, g.LogFile)
		}
		gw = g
	} else {
		if name == scenario.Restart {
			return fail(scenario.ErrNoRestart)
		}
		target.ESTURL, target.MQTTAddr, target.AdminURL = estURL, mqttAddr, adminURL
		gw = staticGateway{target: target, pid: gwPID}
	}

	rep, err := scenario.Run(ctx, name, cfg, gw)
	if err != nil {
		if ctx.Err() != nil {
			return fail(fmt.Errorf("interrupted: %w", err))
		}
		return fail(err)
	}
	if asJSON {
		err = rep.WriteJSON(stdout)
	} else {
		err = rep.WriteTable(stdout)
	}
	if err != nil {
		return fail(err)
	}
	if !rep.OK() {
		var failed []string
		for _, c := range rep.Checks {
			if !c.OK {
				failed = append(failed, c.Name+" ("+c.Detail+")")
			}
		}
		fmt.Fprintf(stderr, "firmware-sim %s: failed: %s\n", name, strings.Join(failed, "; "))
		return 1
	}
	return 0
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, " ") }

func (l *listFlag) Set(s string) error {
	*l = append(*l, s)
	return nil
}

// oneLine keeps an error on one line.
// parseArgs parses a subcommand's flags and refuses arguments after them;
// when it returns false, the subcommand exits with code (0 for --help).
func parseArgs(fs *flag.FlagSet, args []string, stderr io.Writer) (code int, ok bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return 2, false
	}
	return 0, true
}

// ownDir is the directory of the firmware-sim binary, where make puts the
// other binaries too.
func ownDir() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	return filepath.Dir(exe), nil
}

func oneLine(err error) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", " ")), " ")
}

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg := bench.Config{}
	fs := flag.NewFlagSet("firmware-sim bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.BoolVar(&cfg.Smoke, "smoke", false, "the short CI version: small sizes, under a minute")
	fs.StringVar(&cfg.GatewayBin, "gateway-bin", "", "gateway binary (default: next to firmware-sim)")
	fs.StringVar(&cfg.Mosquitto, "mosquitto", "", "mosquitto binary (default: from PATH; 'none' to skip the comparison)")
	fs.StringVar(&cfg.OutDir, "out", "", "directory for results.json and chart.svg (default firmware-sim/bench-results; with --smoke a temporary directory)")
	fs.IntVar(&cfg.Sessions, "sessions", 0, "concurrent mTLS sessions per broker (default 50000; smoke 300), capped by the open-file limit")
	fs.IntVar(&cfg.Enrollments, "enrollments", 0, "enrollments in the storm (default: --sessions)")
	fs.IntVar(&cfg.Publishers, "publishers", 0, "telemetry publishers (default 1000; smoke 100)")
	fs.IntVar(&cfg.Messages, "messages", 0, "messages per publisher in each throughput run (default 200; smoke 20)")
	fs.IntVar(&cfg.Payload, "payload", 0, "telemetry payload bytes (default 128)")
	fs.IntVar(&cfg.Inflight, "inflight", 0, "QoS 1 messages in flight per publisher (default 8)")
	fs.IntVar(&cfg.Rounds, "rounds", 0, "times each throughput run is repeated; the median round is reported (default 3; smoke 1)")
	fs.Float64Var(&cfg.LatencyRate, "latency-rate", 0, "aggregate msgs/s of the latency run (default 5000; smoke 1000)")
	fs.DurationVar(&cfg.LatencyTime, "latency-time", 0, "length of the latency run (default 10s; smoke 2s)")
	fs.IntVar(&cfg.Revoke, "revoke", 0, "devices revoked in the revocation run (default 100; smoke 5)")
	fs.IntVar(&cfg.Resumed, "resumed", 0, "devices in the session resumption run (default 2000; smoke 100)")
	fs.IntVar(&cfg.Concurrency, "concurrency", 0, "enrollments and connects in flight (default 64)")
	fs.StringVar(&cfg.Groups, "tls-groups", "x25519", "TLS key exchange: x25519, p256, mlkem or default")
	fs.StringVar(&cfg.GatewayLogLevel, "gateway-log-level", "info", "the gateway's log level")
	fs.Var((*listFlag)(&cfg.GatewayArgs), "gateway-arg", "one more gateway flag, e.g. --gateway-arg=--mqtt-publish-rate=off (repeatable)")
	fs.BoolVar(&cfg.Quiet, "quiet", false, "no live progress")
	fs.DurationVar(&cfg.Timeout, "timeout", 0, "bound of the whole run (default 45m; smoke 5m)")
	if code, ok := parseArgs(fs, args, stderr); !ok {
		return code
	}
	if cfg.GatewayBin == "" {
		dir, err := ownDir()
		if err != nil {
			fmt.Fprintf(stderr, "firmware-sim bench: %v\n", err)
			return 1
		}
		cfg.GatewayBin = filepath.Join(dir, "gateway")
	}
	cfg.Stdout, cfg.Stderr = stdout, stderr
	res, err := bench.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "firmware-sim bench: %v\n", oneLine(err))
		return 1
	}
	if !res.OK() {
		fmt.Fprintf(stderr, "firmware-sim bench: %s\n", res.Failure())
		return 1
	}
	return 0
}
