package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/cli"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Defaults of the persistent flags when neither the flag nor its
// FLEETGATE_ environment variable is set.
const (
	defaultDataDir = "/var/lib/fleetgate"
	defaultGateway = "https://localhost:9443"
	defaultTimeout = 30 * time.Second
)

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// app is one invocation of the CLI: the persistent flags every subcommand
// shares and where output goes. run builds a fresh one each time, so tests
// can call run concurrently.
type app struct {
	stdout, stderr io.Writer

	dataDir    string
	gatewayURL string
	certFile   string
	keyFile    string
	caFile     string
	timeout    time.Duration

	// started is set once a subcommand's own code runs: errors before that
	// come from parsing the command line and are usage errors.
	started bool
}

// run executes the command line args and returns the process exit code:
// 0 on success, 1 when the work failed, 2 when the command line is wrong.
// Every error is one line on stderr prefixed "provisioning: ".
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	a := &app{stdout: stdout, stderr: stderr}
	root := a.rootCommand()
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return exitOK
	}
	code := exitFailure
	var ue *usageError
	if errors.As(err, &ue) || !a.started {
		code = exitUsage
	}
	msg := oneLine(err.Error())
	if code == exitUsage && cmd != nil {
		msg += fmt.Sprintf(" (see '%s --help')", cmd.CommandPath())
	}
	fmt.Fprintf(stderr, "provisioning: %s\n", msg)
	return code
}

// usageError marks a mistake on the command line (exit code 2).
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return &usageError{err: fmt.Errorf(format, args...)}
}

// oneLine keeps an error message on a single line whatever it wraps.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

func envOr(flagName, def string) string {
	if v := os.Getenv(cli.EnvName(flagName)); v != "" {
		return v
	}
	return def
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "provisioning",
		Short: "Operator and factory CLI of a fleetgate gateway",
		Long: `provisioning creates a fleet's CA, mints one-time enrollment tokens, manages
devices and service certificates, reads the audit log and backs up the
registry, through the gateway's admin API over mutual TLS.

The operator certificate and CA bundle are read from the data directory
(DIR/operator.crt, DIR/operator.key, DIR/ca.pem) unless --cert, --key and
--ca say otherwise. --data-dir and --gateway default to $FLEETGATE_DATA_DIR
and $FLEETGATE_GATEWAY. Global flags may follow the subcommand.`,
		Args:          noArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return usageErrorf("missing command")
		},
	}
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err: err} })
	root.CompletionOptions.HiddenDefaultCmd = true

	pf := root.PersistentFlags()
	pf.StringVar(&a.dataDir, "data-dir", envOr("data-dir", defaultDataDir), "data directory with the CA and operator certificate ($FLEETGATE_DATA_DIR)")
	pf.StringVar(&a.gatewayURL, "gateway", envOr("gateway", defaultGateway), "base URL of the gateway admin API ($FLEETGATE_GATEWAY)")
	pf.StringVar(&a.certFile, "cert", "", "operator certificate (default DIR/operator.crt)")
	pf.StringVar(&a.keyFile, "key", "", "operator key (default DIR/operator.key)")
	pf.StringVar(&a.caFile, "ca", "", "CA bundle the gateway's certificate chains to (default DIR/ca.pem)")
	pf.DurationVar(&a.timeout, "timeout", defaultTimeout, "how long to wait for each gateway request")

	root.AddCommand(
		a.initCommand(),
		a.tokenCommand(),
		a.devicesCommand(),
		a.revokeCommand(),
		a.certCommand(),
		a.auditCommand(),
		a.backupCommand(),
		a.restoreCommand(),
		a.versionCommand(),
	)
	return root
}

// action wraps a subcommand's work: it resolves the persistent flags and
// marks the point after which errors are runtime failures.
func (a *app) action(fn func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if err := a.resolve(); err != nil {
			return err
		}
		a.started = true
		return fn(cmd, args)
	}
}

// resolve checks the persistent flags and fills the defaults that depend
// on the data directory.
func (a *app) resolve() error {
	if a.dataDir == "" {
		return usageErrorf("--data-dir is empty")
	}
	abs, err := filepath.Abs(a.dataDir)
	if err != nil {
		return usageErrorf("--data-dir %s: %w", a.dataDir, err)
	}
	a.dataDir = abs
	l := a.layout()
	if a.certFile == "" {
		a.certFile = l.OperatorCert()
	}
	if a.keyFile == "" {
		a.keyFile = l.OperatorKey()
	}
	if a.caFile == "" {
		a.caFile = l.CABundle()
	}
	if a.timeout <= 0 {
		return usageErrorf("--timeout %v: must be positive", a.timeout)
	}
	return nil
}

func (a *app) layout() pki.Layout { return pki.Layout{Dir: a.dataDir} }

// baseURL normalizes --gateway: a bare host:port means https.
func baseURL(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", usageErrorf("--gateway is empty")
	}
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", usageErrorf("--gateway %q: %w", s, err)
	}
	if u.Scheme != "https" {
		return "", usageErrorf("--gateway %q: the admin API speaks https only", s)
	}
	if u.Host == "" {
		return "", usageErrorf("--gateway %q: no host", s)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", usageErrorf("--gateway %q: want a base URL such as https://gateway:9443", s)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// noArgs refuses positional arguments as a usage error.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		if cmd.HasSubCommands() {
			return usageErrorf("unknown command %q for %q", args[0], cmd.CommandPath())
		}
		return usageErrorf("unexpected argument %q", args[0])
	}
	return nil
}

// exactArgs wants exactly the named positional arguments.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		switch {
		case len(args) < len(names):
			return usageErrorf("missing %s", strings.Join(names[len(args):], " "))
		case len(args) > len(names):
			return usageErrorf("unexpected argument %q", args[len(names)])
		}
		return nil
	}
}

// group makes cmd a command that only holds subcommands.
func group(cmd *cobra.Command, subs ...*cobra.Command) *cobra.Command {
	cmd.Args = noArgs
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		names := make([]string, 0, len(subs))
		for _, s := range subs {
			names = append(names, s.Name())
		}
		return usageErrorf("missing subcommand: want %s", strings.Join(names, " or "))
	}
	cmd.AddCommand(subs...)
	return cmd
}

func (a *app) versionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			a.started = true
			_, err := fmt.Fprintln(a.stdout, cli.VersionString("provisioning"))
			return err
		},
	}
}

// interrupted turns a cancelled command context into a clear error.
func interrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return errors.New("interrupted")
	}
	return err
}
