package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/fleetgate/fleetgate/gateway/authority"
	"github.com/fleetgate/fleetgate/gateway/broker"
	gwest "github.com/fleetgate/fleetgate/gateway/est"
	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/cli"
)

const usage = `Usage: gateway [flags]

Serves MQTT over mutual TLS, EST enrollment and the CRL, and the admin API.
Every flag may also be set with an environment variable FLEETGATE_<FLAG>,
e.g. FLEETGATE_DATA_DIR.

Flags:
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var (
		cfg                 server.Config
		hosts               string
		logFormat, logLevel string
		showVersion         bool
	)
	fs := flag.NewFlagSet("gateway", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.DataDir, "data-dir", "", "data directory with the CA and registry (default "+server.DefaultDataDir+", or ./"+server.DefaultDevDataDir+" with --dev)")
	fs.StringVar(&cfg.MQTTListen, "mqtt-listen", server.DefaultMQTTListen, "MQTT over mutual TLS listen address")
	fs.StringVar(&cfg.ESTListen, "est-listen", server.DefaultESTListen, "EST enrollment and CRL (HTTPS) listen address")
	fs.StringVar(&cfg.AdminListen, "admin-listen", server.DefaultAdmin, "admin API (HTTPS, operator certificates only) listen address")
	fs.StringVar(&cfg.MetricsListen, "metrics-listen", "", "optional plain-HTTP /metrics listen address, e.g. 127.0.0.1:9100")
	fs.BoolVar(&cfg.Pprof, "pprof", false, "also serve Go's profiler under /debug/pprof/ on --metrics-listen")
	fs.BoolVar(&cfg.Dev, "dev", false, "development mode: create a CA and certificates in the data directory on first start")
	fs.StringVar(&hosts, "hosts", "localhost,127.0.0.1,::1", "with --dev: host names and IPs for the server certificate")
	fs.DurationVar(&cfg.DeviceTTL, "device-cert-ttl", 0, "lifetime of device certificates (default 720h)")
	fs.DurationVar(&cfg.TokenTTL, "token-ttl", 0, "default lifetime of enrollment tokens (default 24h)")
	fs.DurationVar(&cfg.CRLValidity, "crl-validity", 0, "CRL nextUpdate distance; re-signed at half of it (default 24h)")
	fs.StringVar(&cfg.CRLURL, "crl-url", "", "CRL distribution point written into certificates (default https://<server name>:<EST port>/crl)")
	fs.DurationVar(&cfg.ConnectTimeout, "connect-timeout", 0, "deadline for an MQTT client's TLS handshake and CONNECT (default 10s)")
	lim := &cfg.Limits
	fs.Var(&lim.EnrollRate, "est-enroll-rate", "EST simpleenroll/simplereenroll requests per source address, `RATE[:BURST]` per second or off; over it 429 (default "+gwest.DefaultEnrollRate.String()+")")
	fs.Var(&lim.ESTReadRate, "est-read-rate", "other EST requests (cacerts, csrattrs, CRL) per source address, `RATE[:BURST]` or off (default "+gwest.DefaultReadRate.String()+")")
	fs.Var(&lim.MQTTConnectRate, "mqtt-connect-rate", "MQTT connections per source address, `RATE[:BURST]` or off; over it closed before TLS (default "+broker.DefaultConnectRate.String()+")")
	fs.Var(&lim.PublishRate, "mqtt-publish-rate", "publishes per device session, `RATE[:BURST]` or off; over it the session is paced (default "+broker.DefaultPublishRate.String()+")")
	fs.IntVar(&lim.MaxPayload, "mqtt-max-payload", 0, fmt.Sprintf("largest device PUBLISH payload in bytes, -1 for the packet limit only (default %d)", broker.DefaultMaxPayload))
	fs.IntVar(&lim.MaxHandshakes, "max-tls-handshakes", 0, fmt.Sprintf("TLS handshakes in flight per listener; more wait, then are shed (default %d)", limit.DefaultMaxHandshakes))
	fs.IntVar(&lim.LockoutFailures, "enroll-lockout-failures", 0, fmt.Sprintf("bad enrollment tokens for one device ID that lock it out, -1 for no lockout (default %d)", authority.DefaultLockoutFailures))
	fs.DurationVar(&lim.LockoutWindow, "enroll-lockout-window", 0, "window in which the bad tokens count, and length of the lockout (default 15m)")
	fs.StringVar(&logFormat, "log-format", "auto", "log format: auto, text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&showVersion, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "gateway: unexpected argument %q (see gateway --help)\n", fs.Arg(0))
		return 2
	}
	if err := cli.ApplyEnv(fs); err != nil {
		fmt.Fprintf(stderr, "gateway: %v\n", err)
		return 2
	}
	if showVersion {
		fmt.Fprintln(stdout, cli.VersionString("gateway"))
		return 0
	}
	cfg.DevHosts = cli.SplitList(hosts)
	log, err := cli.NewLogger(stderr, logFormat, logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "gateway: %v\n", err)
		return 2
	}
	srv, err := server.New(ctx, cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "gateway: %v\n", err)
		return 1
	}
	if err := srv.Run(ctx); err != nil {
		fmt.Fprintf(stderr, "gateway: %v\n", err)
		return 1
	}
	return 0
}
