// Package config holds the agent's settings. They come, in order of
// precedence, from command-line flags, FLEETGATE_ environment variables, a
// YAML file (/etc/fleetgate/agent.yaml by default, keys named like the flags
// with '_' for '-') and built-in defaults.
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
	"sort"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fleetgate/fleetgate/pkg/cli"
	"github.com/fleetgate/fleetgate/pkg/identity"
)

// Defaults.
const (
	DefaultConfigFile = "/etc/fleetgate/agent.yaml"
	DefaultStateDir   = "/var/lib/fleetgate-agent"
	DefaultInterval   = 30 * time.Second
	DefaultMQTTPort   = "8883"
)

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
	// ConfigFile the settings were read from, if any.
	ConfigFile string
	LogFormat  string
	LogLevel   string
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
	fs.StringVar(&c.LogFormat, "log-format", "auto", "log format: auto, text or json")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	return func() error {
		if err := c.overlay(fs); err != nil {
			return err
		}
		return c.Validate()
	}
}

// overlay fills unset flags from the environment, then the config file.
func (c *Config) overlay(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if !given["config"] {
		if v, ok := os.LookupEnv(cli.EnvName("config")); ok {
			c.ConfigFile = v
			given["config"] = true
		}
	}
	file := map[string]string{}
	switch {
	case c.ConfigFile != "":
		m, err := ReadFile(c.ConfigFile)
		if err != nil {
			return err
		}
		file = m
	default:
		if m, err := ReadFile(DefaultConfigFile); err == nil {
			c.ConfigFile = DefaultConfigFile
			file = m
		} else if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	for name := range file {
		if fs.Lookup(name) == nil || name == "config" {
			return fmt.Errorf("config %s: unknown setting %q", c.ConfigFile, strings.ReplaceAll(name, "-", "_"))
		}
	}
	var err error
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
		if v, ok := file[f.Name]; ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("config %s: %s: %w", c.ConfigFile, strings.ReplaceAll(f.Name, "-", "_"), e)
			}
		}
	})
	return err
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
	var raw map[string]any
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&raw); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config %s: %w", name, err)
	}
	out := make(map[string]string, len(raw))
	for k, v := range raw {
		switch v.(type) {
		case map[string]any, []any:
			return nil, fmt.Errorf("config %s: %s: want a single value", name, k)
		case nil:
			continue
		}
		out[strings.ReplaceAll(k, "_", "-")] = fmt.Sprint(v)
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
	if c.TokenFile != "" {
		if c.TokenFile, err = filepath.Abs(c.TokenFile); err != nil {
			return err
		}
	}
	return nil
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
