package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/fleetgate/fleetgate/agent/config"
	"github.com/fleetgate/fleetgate/agent/daemon"
	"github.com/fleetgate/fleetgate/pkg/cli"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Exit codes. A service manager should not restart the agent on 3 or 4
// (the systemd unit lists them in RestartPreventExitStatus).
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
	exitRevoked = 3
	exitRefused = 4
)

const usage = `Usage: agent COMMAND [flags]

Commands:
  enroll    make the device key and enroll with a one-time token (if not enrolled yet)
  run       enroll if needed, then publish telemetry until stopped
  renew     renew the certificate now
  status    show the identity on disk
  version   print the version

Settings come from, in order of precedence: flags, FLEETGATE_<FLAG>
environment variables, then a YAML config file: the one --config names, or
else a first-boot bundle's agent.yaml (in --bundle-dir, default
/boot/firmware/fleetgate) over /etc/fleetgate/agent.yaml. YAML keys are the
flag names with '_' for '-'. Run 'agent COMMAND --help' for the flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "version", "--version":
		fmt.Fprintln(stdout, cli.VersionString("agent"))
		return exitOK
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	case "enroll", "run", "renew", "status":
	default:
		fmt.Fprintf(stderr, "agent: unknown command %q\n\n%s", cmd, usage)
		return exitUsage
	}

	var cfg config.Config
	fs := flag.NewFlagSet("agent "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	finish := cfg.Flags(fs)
	jsonOut := false
	if cmd == "status" {
		fs.BoolVar(&jsonOut, "json", false, "print JSON")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "agent %s: unexpected argument %q\n", cmd, fs.Arg(0))
		return exitUsage
	}
	if err := finish(); err != nil {
		fmt.Fprintf(stderr, "agent %s: %v\n", cmd, err)
		return exitUsage
	}
	log, err := cli.NewLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		fmt.Fprintf(stderr, "agent: %v\n", err)
		return exitUsage
	}
	d, err := daemon.New(cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "agent %s: %v\n", cmd, err)
		return exitFailure
	}
	defer d.Close()

	switch cmd {
	case "enroll":
		cred, fresh, err := d.Enroll(ctx)
		if err != nil {
			return fail(stderr, cmd, err)
		}
		if fresh {
			fmt.Fprintf(stdout, "enrolled %s: serial %s, valid until %s\n", cfg.DeviceID, pki.SerialHex(cred.Cert), cred.Cert.NotAfter.Format(time.RFC3339))
		} else {
			fmt.Fprintf(stdout, "already enrolled %s: serial %s, valid until %s\n", cfg.DeviceID, pki.SerialHex(cred.Cert), cred.Cert.NotAfter.Format(time.RFC3339))
		}
		fmt.Fprintf(stdout, "certificate: %s\n", cfg.StateDir+"/device.crt")
		return exitOK
	case "renew":
		cred, err := d.Renew(ctx)
		if err != nil {
			return fail(stderr, cmd, err)
		}
		fmt.Fprintf(stdout, "renewed %s: serial %s, valid until %s\n", cfg.DeviceID, pki.SerialHex(cred.Cert), cred.Cert.NotAfter.Format(time.RFC3339))
		return exitOK
	case "status":
		st, err := d.Status()
		if err != nil {
			return fail(stderr, cmd, err)
		}
		if jsonOut {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(st)
			return exitOK
		}
		printStatus(stdout, st)
		return exitOK
	default: // run
		if err := d.Run(ctx); err != nil {
			return fail(stderr, cmd, err)
		}
		return exitOK
	}
}

func fail(stderr io.Writer, cmd string, err error) int {
	fmt.Fprintf(stderr, "agent %s: %v\n", cmd, err)
	switch {
	case errors.Is(err, daemon.ErrRevoked):
		return exitRevoked
	case errors.Is(err, daemon.ErrEnrollRefused):
		return exitRefused
	default:
		return exitFailure
	}
}

func printStatus(w io.Writer, st daemon.Status) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "device\t%s\n", st.DeviceID)
	fmt.Fprintf(tw, "key store\t%s\n", st.KeyStore)
	fmt.Fprintf(tw, "state dir\t%s\n", st.StateDir)
	fmt.Fprintf(tw, "gateway\t%s (mqtt %s)\n", st.Gateway, st.MQTT)
	if !st.Enrolled {
		fmt.Fprintf(tw, "enrolled\tno\n")
		tw.Flush()
		return
	}
	fmt.Fprintf(tw, "enrolled\tyes\n")
	fmt.Fprintf(tw, "identity\t%s\n", st.Subject)
	fmt.Fprintf(tw, "serial\t%s\n", st.Serial)
	fmt.Fprintf(tw, "valid\t%s to %s\n", st.NotBefore.Format(time.RFC3339), st.NotAfter.Format(time.RFC3339))
	fmt.Fprintf(tw, "renews after\t%s\n", st.RenewAt.Format(time.RFC3339))
	if st.Expired {
		fmt.Fprintf(tw, "expired\tyes: enroll again with a new token\n")
	}
	tw.Flush()
}
