// Package config holds the agent's settings. They come, in order of
// precedence, from:
//
//  1. command-line flags;
//  2. FLEETGATE_<FLAG> environment variables;
//  3. the config file named by --config (or FLEETGATE_CONFIG); when none is
//     named: a first-boot bundle's BUNDLE_DIR/agent.yaml (--bundle-dir,
//     default /boot/firmware/fleetgate), then /etc/fleetgate/agent.yaml,
//     each where it exists, the bundle winning;
//  4. built-in defaults.
//
// Config files are YAML with one key per flag, named like the flag with '_'
// for '-' (device_id, spool_max).
package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fleetgate/fleetgate/pkg/cli"
	"github.com/fleetgate/fleetgate/pkg/identity"
)

// Defaults.
const (
	DefaultConfigFile = "/etc/fleetgate/agent.yaml"
	// DefaultBundleDir is where a flashing station puts a device's
	// first-boot bundle: the Raspberry Pi OS boot partition (FAT, readable
	// and writable from any computer).
	DefaultBundleDir = "/boot/firmware/fleetgate"
	// BundleConfigName is the config file inside a bundle directory.
	BundleConfigName = "agent.yaml"
	DefaultStateDir  = "/var/lib/fleetgate-agent"
	DefaultInterval  = 30 * time.Second
	DefaultMQTTPort  = "8883"

	DefaultSpoolMax         = 16 << 20
	DefaultSpoolMaxMessages = 100_000
	DefaultExecTimeout      = 10 * time.Second
	DefaultMaxInflight      = 32
	// MinSpoolMax leaves room for the largest message (64 KiB) several
	// times over.
	MinSpoolMax = 256 << 10
	// maxSocketPath is the longest unix socket path Linux accepts.
	maxSocketPath = 107
)

// systemConfigFile is DefaultConfigFile; tests point it elsewhere.
var systemConfigFile = DefaultConfigFile

// Key store kinds.
const (
	KeyFile = "file"
	KeyTPM  = "tpm"
)

// Config is the agent's configuration.
type Config struct {
	// Gateway is the EST base URL, https://HOST:PORT.
	Gateway string
	// MQTT is the broker address HOST:PORT (default: the gateway host, 8883).
	MQTT string
	// CA is the PEM bundle that verifies the gateway.
	CA       string
	DeviceID string
	// Token is the one-time enrollment token, or TokenFile a file holding it.
	Token     string
	TokenFile string
	// KeepTokenFile keeps the token file after a successful enrollment
	// (it is deleted by default: the token is spent and a secret).
	KeepTokenFile bool
	StateDir      string
	// Key is the key store: "file" or "tpm"; TPM the TPM device or swtpm socket.
	Key string
	TPM string
	// Interval is the telemetry period.
	Interval time.Duration
	// QoS of telemetry messages (0 or 1).
	QoS int
	// Rekey makes renewal create a new key (default true).
	Rekey bool
	// RenewFraction of the certificate lifetime after which to renew.
	RenewFraction float64

	// SpoolMax bounds the spool's messages in bytes, SpoolMaxMessages in
	// number; beyond either the oldest messages are dropped.
	SpoolMax         ByteSize
	SpoolMaxMessages int
	// MaxInflight bounds the messages published and not yet acknowledged.
	MaxInflight int

	// System enables the built-in system metrics in periodic telemetry.
	System bool
	// Exec is a shell command run every Interval; its stdout, a JSON
	// object, goes under "exec" in the periodic message.
	Exec        string
	ExecTimeout time.Duration
	// LocalSocket is a unix socket where local programs write
	// newline-delimited JSON objects, each sent as a message ("" = off).
	LocalSocket string

	// ConfigFile is the file named by --config; empty when none was named.
	ConfigFile string
	// BundleDir is where a first-boot bundle is looked for.
	BundleDir string
	// Files are the config files the settings were read from, in order of
	// increasing precedence.
	Files     []string
	LogFormat string
	LogLevel  string
}

// Flags registers every setting on fs and returns a function that, after
// fs.Parse, applies the environment and the config file to the settings the
// command line left unset, then validates.
func (c *Config) Flags(fs *flag.FlagSet) func() error {
	fs.StringVar(&c.ConfigFile, "config", "", "YAML config file (default "+DefaultConfigFile+" if it exists)")
	fs.StringVar(&c.Gateway, "gateway", "", "EST base URL of the gateway, e.g. https://gateway.example:8443")
	fs.StringVar(&c.MQTT, "mqtt", "", "MQTT broker HOST:PORT (default: gateway host, port "+DefaultMQTTPort+")")
	fs.StringVar(&c.CA, "ca", "", "CA bundle (PEM) that verifies the gateway (default STATE_DIR/ca.pem)")
	fs.StringVar(&c.DeviceID, "device-id", "", "this device's ID ([a-z0-9][a-z0-9._-]{0,62})")
	fs.StringVar(&c.Token, "token", "", "one-time enrollment token")
	fs.StringVar(&c.TokenFile, "token-file", "", "file holding the one-time enrollment token (deleted after enrollment)")
	fs.BoolVar(&c.KeepTokenFile, "keep-token-file", false, "keep the token file after enrollment")
	fs.StringVar(&c.StateDir, "state-dir", DefaultStateDir, "directory for the key, certificate and spool")
	fs.StringVar(&c.Key, "key", KeyFile, "key store: file or tpm")
	fs.StringVar(&c.TPM, "tpm", "/dev/tpmrm0", "with --key tpm: TPM device or swtpm unix socket")
	fs.DurationVar(&c.Interval, "interval", DefaultInterval, "telemetry period")
	fs.IntVar(&c.QoS, "qos", 1, "MQTT QoS of telemetry: 0 or 1")
	fs.BoolVar(&c.Rekey, "rekey", true, "create a new key at each renewal")
	fs.Float64Var(&c.RenewFraction, "renew-at", 2.0/3.0, "renew after this fraction of the certificate lifetime")
	c.SpoolMax = DefaultSpoolMax
	fs.Var(&c.SpoolMax, "spool-max", "bound of the telemetry spool in `bytes` (e.g. 16MiB); the oldest messages are dropped beyond it")
	fs.IntVar(&c.SpoolMaxMessages, "spool-max-messages", DefaultSpoolMaxMessages, "bound of the telemetry spool in messages")
	fs.IntVar(&c.MaxInflight, "max-inflight", DefaultMaxInflight, "messages published and not yet acknowledged, at most")
	fs.BoolVar(&c.System, "system", true, "include system metrics (load, memory, CPU temperature, uptime) in periodic telemetry")
	fs.StringVar(&c.Exec, "exec", "", "shell command run every interval; its stdout (a JSON object) goes under \"exec\" in the message")
	fs.DurationVar(&c.ExecTimeout, "exec-timeout", DefaultExecTimeout, "time limit of each --exec run")
	fs.StringVar(&c.LocalSocket, "local-socket", "", "unix socket for local programs to write newline-delimited JSON telemetry into (default off)")
	fs.StringVar(&c.BundleDir, "bundle-dir", DefaultBundleDir, "first-boot bundle directory; its "+BundleConfigName+" is read when no --config is given")
	fs.StringVar(&c.LogFormat, "log-format", "auto", "log format: auto, text or json")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	return func() error {
		if err := c.overlay(fs); err != nil {
			return err
		}
		return c.Validate()
	}
}

// overlay fills unset flags from the environment, then the config files.
func (c *Config) overlay(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	// --config and --bundle-dir choose the files, so they are settled
	// first, from the command line or the environment.
	for _, name := range []string{"config", "bundle-dir"} {
		if given[name] {
			continue
		}
		if v, ok := os.LookupEnv(cli.EnvName(name)); ok {
			if err := fs.Set(name, v); err != nil {
				return fmt.Errorf("%s=%q: %w", cli.EnvName(name), v, err)
			}
			given[name] = true
		}
	}
	file, err := c.readFiles(fs, given["bundle-dir"])
	if err != nil {
		return err
	}
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || given[f.Name] || f.Name == "config" {
			return
		}
		if v, ok := os.LookupEnv(cli.EnvName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", cli.EnvName(f.Name), v, e)
			}
			return
		}
		if s, ok := file[f.Name]; ok {
			if e := fs.Set(f.Name, s.value); e != nil {
				err = fmt.Errorf("config %s: %s: %w", s.file, strings.ReplaceAll(f.Name, "-", "_"), e)
			}
		}
	})
	return err
}

// setting is a value and the file it came from.
type setting struct{ value, file string }

// readFiles reads the config files in force, merged: the --config file
// alone when one was named; otherwise /etc/fleetgate/agent.yaml, then a
// bundle's agent.yaml over it. bundleGiven says --bundle-dir was set on
// the command line or in the environment (else the system file may set it).
func (c *Config) readFiles(fs *flag.FlagSet, bundleGiven bool) (map[string]setting, error) {
	out := map[string]setting{}
	merge := func(path string, required bool, refuse ...string) error {
		m, err := ReadFile(path)
		if err != nil {
			if !required && errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		for name, v := range m {
			if name == "config" || slices.Contains(refuse, name) || fs.Lookup(name) == nil {
				return fmt.Errorf("config %s: unknown setting %q", path, strings.ReplaceAll(name, "-", "_"))
			}
			out[name] = setting{value: v, file: path}
		}
		c.Files = append(c.Files, path)
		return nil
	}
	if c.ConfigFile != "" {
		return out, merge(c.ConfigFile, true)
	}
	if err := merge(systemConfigFile, false); err != nil {
		return nil, err
	}
	if s, ok := out["bundle-dir"]; ok && !bundleGiven {
		c.BundleDir = s.value
	}
	if c.BundleDir != "" {
		// A bundle says who the device is and where it enrolls; where it
		// finds bundles is not its business.
		if err := merge(filepath.Join(c.BundleDir, BundleConfigName), false, "bundle-dir"); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ReadFile reads a YAML config file into flag-name → value form. Keys use
// '_' (device_id) or '-' (device-id); nested values are refused.
func ReadFile(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(data, path)
}

// Parse reads YAML config text; name is used in errors.
func Parse(data []byte, name string) (map[string]string, error) {
	// Decode into nodes, not map[string]any: YAML would resolve an
	// unquoted 007 to the number 7 and a date to a timestamp, and a device
	// whose ID is its zero-padded serial would enroll under another ID.
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return map[string]string{}, nil
		}
		return nil, fmt.Errorf("config %s: %w", name, err)
	}
	if len(doc.Content) == 0 {
		return map[string]string{}, nil
	}
	root := doc.Content[0]
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return map[string]string{}, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config %s: want key: value settings at the top level", name)
	}
	out := make(map[string]string, len(root.Content)/2)
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return nil, fmt.Errorf("config %s: line %d: a key must be a plain name", name, k.Line)
		}
		if v.Kind == yaml.AliasNode && v.Alias != nil {
			v = v.Alias
		}
		switch {
		case v.Kind != yaml.ScalarNode:
			return nil, fmt.Errorf("config %s: %s: want a single value", name, k.Value)
		case v.Tag == "!!null":
			continue
		}
		key := strings.ReplaceAll(k.Value, "_", "-")
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("config %s: %s is set twice", name, k.Value)
		}
		out[key] = v.Value
	}
	return out, nil
}

// Validate checks the settings and makes paths absolute.
func (c *Config) Validate() error {
	var problems []string
	if c.DeviceID == "" {
		problems = append(problems, "--device-id is required")
	} else if err := identity.ValidateName(c.DeviceID); err != nil {
		problems = append(problems, fmt.Sprintf("--device-id: %v", err))
	}
	if c.Gateway == "" {
		problems = append(problems, "--gateway is required (the EST URL, e.g. https://gateway.example:8443)")
	} else if u, err := url.Parse(c.Gateway); err != nil || u.Scheme != "https" || u.Host == "" {
		problems = append(problems, fmt.Sprintf("--gateway %q: want https://HOST:PORT", c.Gateway))
	} else if c.MQTT == "" {
		c.MQTT = net.JoinHostPort(u.Hostname(), DefaultMQTTPort)
	}
	if c.MQTT != "" {
		if _, _, err := net.SplitHostPort(c.MQTT); err != nil {
			problems = append(problems, fmt.Sprintf("--mqtt %q: want HOST:PORT", c.MQTT))
		}
	}
	switch c.Key {
	case KeyFile, KeyTPM:
	default:
		problems = append(problems, fmt.Sprintf("--key %q: want file or tpm", c.Key))
	}
	if c.Interval < 100*time.Millisecond {
		problems = append(problems, fmt.Sprintf("--interval %v: at least 100ms", c.Interval))
	}
	if c.QoS != 0 && c.QoS != 1 {
		problems = append(problems, fmt.Sprintf("--qos %d: want 0 or 1", c.QoS))
	}
	if c.RenewFraction <= 0.1 || c.RenewFraction >= 0.95 {
		problems = append(problems, fmt.Sprintf("--renew-at %v: want a fraction between 0.1 and 0.95", c.RenewFraction))
	}
	if c.StateDir == "" {
		problems = append(problems, "--state-dir is required")
	}
	if c.SpoolMax < MinSpoolMax {
		problems = append(problems, fmt.Sprintf("--spool-max %v: at least %v", c.SpoolMax, ByteSize(MinSpoolMax)))
	}
	if c.SpoolMaxMessages < 10 {
		problems = append(problems, fmt.Sprintf("--spool-max-messages %d: at least 10", c.SpoolMaxMessages))
	}
	if c.MaxInflight < 1 || c.MaxInflight > 1000 {
		problems = append(problems, fmt.Sprintf("--max-inflight %d: want 1 to 1000", c.MaxInflight))
	}
	if c.ExecTimeout <= 0 {
		problems = append(problems, fmt.Sprintf("--exec-timeout %v: must be positive", c.ExecTimeout))
	}
	if c.LocalSocket != "" {
		if abs, err := filepath.Abs(c.LocalSocket); err != nil || len(abs) > maxSocketPath {
			problems = append(problems, fmt.Sprintf("--local-socket %q: want a path of at most %d bytes", c.LocalSocket, maxSocketPath))
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return errors.New(strings.Join(problems, "; "))
	}
	var err error
	if c.StateDir, err = filepath.Abs(c.StateDir); err != nil {
		return err
	}
	if c.CA == "" {
		c.CA = filepath.Join(c.StateDir, "ca.pem")
	}
	if c.CA, err = filepath.Abs(c.CA); err != nil {
		return err
	}
	for _, p := range []*string{&c.TokenFile, &c.LocalSocket, &c.BundleDir} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return err
			}
		}
	}
	return nil
}

// SpoolPath is the spool file in the state directory.
func (c *Config) SpoolPath() string { return filepath.Join(c.StateDir, "spool.db") }

// ByteSize is a size in bytes, written as a number with an optional unit:
// 16777216, 16MiB, 512KiB, 1GiB, 10MB (KB, MB, GB are powers of 1000).
type ByteSize int64

var byteUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
}

// String writes the size with the largest binary unit that divides it.
func (b ByteSize) String() string {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if b != 0 && int64(b)%u.mult == 0 {
			return strconv.FormatInt(int64(b)/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// Set parses a size (flag.Value).
func (b *ByteSize) Set(s string) error {
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// ParseByteSize reads a size such as 16MiB or 1048576.
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range byteUnits {
		if n, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(n), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: want bytes, optionally with KiB, MiB or GiB", s)
	}
	return ByteSize(n * mult), nil
}

// ReadToken returns the enrollment token from Token or TokenFile.
func (c *Config) ReadToken() (string, error) {
	if c.Token != "" {
		return strings.TrimSpace(c.Token), nil
	}
	if c.TokenFile == "" {
		return "", errors.New("no enrollment token: pass --token or --token-file")
	}
	data, err := os.ReadFile(c.TokenFile)
	if err != nil {
		return "", fmt.Errorf("read token file: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", fmt.Errorf("token file %s is empty", c.TokenFile)
	}
	return tok, nil
}
