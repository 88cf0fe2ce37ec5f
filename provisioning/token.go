package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/cli"
	"github.com/fleetgate/fleetgate/pkg/identity"
)

// maxBatch bounds one token create run; a factory order larger than this
// is better split into several CSV files anyway.
const maxBatch = 1_000_000

// maxBatchLabel is the gateway's limit on a batch label.
const maxBatchLabel = 128

// tokenOptions are the flags of token create. Flags fall in three groups:
// which devices (one --device-id or a batch source), how the tokens are
// minted (--ttl, --batch) and where they go (stdout, --csv, --json). A new
// destination such as per-device bundle directories is one more field here
// and one more tokenOutput in outputs.
type tokenOptions struct {
	// Which devices.
	deviceID      string
	count         int
	prefix        string
	start         int
	digits        int
	deviceIDs     string
	deviceIDsFile string

	// How they are minted.
	ttl   time.Duration
	batch string

	// Where they go.
	csv   string
	json  bool
	force bool
	// bundle is a directory for one first-boot bundle per device; the
	// others say what the bundles' agent.yaml holds.
	bundle        string
	bundlePath    string
	bundleGateway string
	bundleMQTT    string
}

func (a *app) tokenCommand() *cobra.Command {
	return group(&cobra.Command{
		Use:   "token",
		Short: "Mint one-time enrollment tokens",
	}, a.tokenCreateCommand())
}

func (a *app) tokenCreateCommand() *cobra.Command {
	var o tokenOptions
	cmd := &cobra.Command{
		Use:   "create (--device-id ID | --count N --prefix P | --device-ids A,B | --device-ids-file FILE) [--csv FILE] [--bundle DIR]",
		Short: "Mint an enrollment token for one device or a batch",
		Long: `create mints one-time enrollment tokens. A device trades its token, once, with
a CSR for its first certificate. The gateway keeps only a hash: a token is
shown here once.

With --device-id the token is printed alone on the last line of stdout:
  TOKEN=$(provisioning token create --device-id sensor-0042 | tail -n1)

A batch for a factory line names its devices with --count N --prefix P
(P + zero-padded numbers from --start, --digits wide), --device-ids a,b,c or
--device-ids-file FILE (one ID per line, # comments), and writes
device_id,token,expires_at rows to --csv FILE (mode 0600: tokens are secrets).

--bundle DIR writes one ready-to-copy directory per device, DIR/<device-id>/
(mode 0700), with agent.yaml (device_id, gateway, mqtt, and ca and token_file
under --bundle-path), ca.pem (the data directory's CA bundle) and token (0600).
The flashing station copies it to the SD card's boot partition; on first boot
the agent finds it in /boot/firmware/fleetgate and enrolls. --bundle-gateway
and --bundle-mqtt are the addresses devices reach the gateway at.`,
		Example: `  provisioning token create --device-id sensor-0042 --ttl 24h
  provisioning token create --batch line-3 --count 500 --prefix sensor- --ttl 72h --csv line-3.csv
  provisioning token create --batch line-3 --count 500 --prefix sensor- --ttl 72h --csv line-3.csv \
      --bundle ./line-3 --bundle-gateway https://gw.example.com:8443 --bundle-mqtt gw.example.com:8883`,
		Args: noArgs,
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runTokenCreate(cmd, &o)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&o.deviceID, "device-id", "", "mint a token for this one device")
	f.IntVar(&o.count, "count", 0, "batch: mint tokens for N devices named --prefix + number")
	f.StringVar(&o.prefix, "prefix", "", "batch: device ID prefix, e.g. sensor-")
	f.IntVar(&o.start, "start", 1, "batch: first number")
	f.IntVar(&o.digits, "digits", 4, "batch: numbers are zero-padded to this width")
	f.StringVar(&o.deviceIDs, "device-ids", "", "batch: comma-separated device IDs")
	f.StringVar(&o.deviceIDsFile, "device-ids-file", "", "batch: file with one device ID per line (# starts a comment)")
	f.DurationVar(&o.ttl, "ttl", 0, "token lifetime, e.g. 24h or 72h (default: the gateway's, 24h unless configured)")
	f.StringVar(&o.batch, "batch", "", "label of the batch (a factory line, an order) in the audit log")
	f.StringVar(&o.csv, "csv", "", "write device_id,token,expires_at rows to FILE (mode 0600)")
	f.BoolVar(&o.json, "json", false, "print the tokens as JSON on stdout")
	f.BoolVar(&o.force, "force", false, "replace an existing --csv file or device bundle directories")
	f.StringVar(&o.bundle, "bundle", "", "write a first-boot bundle per device to DIR/<device-id>/ (agent.yaml, ca.pem, token)")
	f.StringVar(&o.bundlePath, "bundle-path", defaultBundlePath, "with --bundle: where the bundle sits on the device (agent.yaml points its ca and token_file there)")
	f.StringVar(&o.bundleGateway, "bundle-gateway", "", "with --bundle: the gateway's EST URL as devices reach it, https://HOST:8443 (required)")
	f.StringVar(&o.bundleMQTT, "bundle-mqtt", "", "with --bundle: the gateway's MQTT address as devices reach it, HOST:8883 (required)")
	return cmd
}

func (a *app) runTokenCreate(cmd *cobra.Command, o *tokenOptions) error {
	ids, single, err := o.devices(cmd.Flags().Changed)
	if err != nil {
		return err
	}
	if cmd.Flags().Changed("ttl") && o.ttl <= 0 {
		return usageErrorf("--ttl %v: must be positive", o.ttl)
	}
	if len(o.batch) > maxBatchLabel || strings.ContainsAny(o.batch, "\r\n") {
		return usageErrorf("--batch: one line of at most %d bytes", maxBatchLabel)
	}
	outs, err := o.outputs(a, ids, single, cmd.Flags().Changed)
	if err != nil {
		return err
	}
	// Check every destination before minting, so a bad path costs no tokens.
	for _, out := range outs {
		if err := out.check(); err != nil {
			return err
		}
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	var ttl string
	if o.ttl > 0 {
		ttl = o.ttl.String()
	}
	var progress func(done, total int)
	if len(ids) > adminapi.MaxTokensPerRequest {
		progress = func(done, total int) { fmt.Fprintf(a.stderr, "minted %d/%d tokens\n", done, total) }
	}
	tokens, mintErr := mintTokens(cmd.Context(), g, ids, ttl, o.batch, adminapi.MaxTokensPerRequest, progress)
	if mintErr != nil && len(tokens) == 0 {
		return mintErr
	}
	// Tokens minted before a failure are valid: hand them out all the same.
	var where []string
	for _, out := range outs {
		if err := out.write(tokens); err != nil {
			return fmt.Errorf("%d tokens minted but not saved: %w", len(tokens), err)
		}
		if d := out.describe(); d != "" {
			where = append(where, d)
		}
	}
	if mintErr != nil {
		return fmt.Errorf("minted only %d of %d tokens (saved to %s): %w", len(tokens), len(ids), strings.Join(where, " and "), mintErr)
	}
	if !single {
		fmt.Fprintln(a.stderr, batchSummary(tokens, o.batch, where))
	}
	return nil
}

// devices returns the device IDs the flags name, and whether the run is a
// single --device-id. changed reports whether a flag was given.
func (o *tokenOptions) devices(changed func(string) bool) ([]string, bool, error) {
	var sources []string
	if changed("device-id") {
		sources = append(sources, "--device-id")
	}
	if changed("count") {
		sources = append(sources, "--count")
	}
	if changed("device-ids") {
		sources = append(sources, "--device-ids")
	}
	if changed("device-ids-file") {
		sources = append(sources, "--device-ids-file")
	}
	switch len(sources) {
	case 0:
		return nil, false, usageErrorf("say which devices: --device-id ID, or a batch with --count N --prefix P, --device-ids A,B,C or --device-ids-file FILE")
	case 1:
	default:
		return nil, false, usageErrorf("%s exclude each other", strings.Join(sources, " and "))
	}
	if !changed("count") {
		for _, name := range []string{"prefix", "start", "digits"} {
			if changed(name) {
				return nil, false, usageErrorf("--%s goes with --count", name)
			}
		}
	}

	switch sources[0] {
	case "--device-id":
		if err := identity.ValidateName(o.deviceID); err != nil {
			return nil, false, &usageError{err: fmt.Errorf("--device-id: %w", err)}
		}
		return []string{o.deviceID}, o.csv == "" && o.bundle == "", nil
	case "--count":
		ids, err := sequenceIDs(o.prefix, o.start, o.count, o.digits)
		if err != nil {
			return nil, false, &usageError{err: err}
		}
		return ids, false, nil
	case "--device-ids":
		ids := cli.SplitList(o.deviceIDs)
		if err := checkIDs(ids); err != nil {
			return nil, false, &usageError{err: fmt.Errorf("--device-ids: %w", err)}
		}
		return ids, false, nil
	default:
		ids, err := readIDsFile(o.deviceIDsFile)
		if err != nil {
			return nil, false, err
		}
		return ids, false, nil
	}
}

// outputs lists where the tokens of ids go. changed reports whether a flag
// was given.
func (o *tokenOptions) outputs(a *app, ids []string, single bool, changed func(string) bool) ([]tokenOutput, error) {
	var outs []tokenOutput
	if o.csv != "" {
		path, err := filepath.Abs(o.csv)
		if err != nil {
			return nil, usageErrorf("--csv: %w", err)
		}
		outs = append(outs, &csvOutput{path: path, force: o.force})
	}
	if o.json {
		outs = append(outs, &jsonOutput{w: a.stdout})
	}
	// Bundles after the CSV: a batch fails part-way through many
	// directories more likely than through one file, and the CSV then
	// holds every token already.
	if o.bundle == "" {
		for _, name := range []string{"bundle-path", "bundle-gateway", "bundle-mqtt"} {
			if changed(name) {
				return nil, usageErrorf("--%s goes with --bundle", name)
			}
		}
	} else {
		b, err := o.newBundleOutput(a, ids)
		if err != nil {
			return nil, err
		}
		outs = append(outs, b)
	}
	if single && !o.json {
		outs = append(outs, &plainOutput{stdout: a.stdout, stderr: a.stderr})
	}
	if len(outs) == 0 {
		return nil, usageErrorf("a batch needs --csv FILE or --bundle DIR (tokens are secrets: they go to files only you can read) or --json")
	}
	return outs, nil
}

// batchSummary is the one line that ends a batch run.
func batchSummary(tokens []adminapi.Token, batch string, where []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "minted %s", plural(len(tokens), "token"))
	if batch != "" {
		fmt.Fprintf(&b, " for batch %q", batch)
	}
	if n := len(tokens); n > 0 {
		if n == 1 {
			fmt.Fprintf(&b, " (%s)", tokens[0].DeviceID)
		} else {
			fmt.Fprintf(&b, " (%s ... %s)", tokens[0].DeviceID, tokens[n-1].DeviceID)
		}
		fmt.Fprintf(&b, ", expiring %s", timestamp(tokens[0].ExpiresAt))
	}
	if len(where) > 0 {
		fmt.Fprintf(&b, "; saved to %s", strings.Join(where, " and "))
	}
	return b.String()
}
