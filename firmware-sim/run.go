package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/demo"
	"github.com/fleetgate/fleetgate/pkg/cli"
)

const usage = `Usage: firmware-sim SCENARIO [flags]

Scenarios:
  demo      start a dev gateway, enroll real agents, show telemetry flowing,
            revoke one device and show it cut off, then stop everything
  version   print the version

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
	default:
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
		exe, err := os.Executable()
		if err != nil {
			fmt.Fprintf(stderr, "firmware-sim demo: %v\n", err)
			return 1
		}
		cfg.BinDir = filepath.Dir(exe)
	}
	if err := demo.Run(ctx, cfg, stdout); err != nil {
		fmt.Fprintf(stderr, "firmware-sim demo: %v\n", err)
		return 1
	}
	return 0
}
