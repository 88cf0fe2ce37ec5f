package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// defaultBundlePath is where the agent looks for a first-boot bundle: the
// Raspberry Pi OS boot partition, which any computer can write.
const defaultBundlePath = "/boot/firmware/fleetgate"

// Files of a device bundle.
const (
	bundleConfig = "agent.yaml"
	bundleCA     = "ca.pem"
	bundleToken  = "token"
)

// bundleOutput writes one directory per device, DIR/<device-id>/, holding
// what the device's agent needs on first boot: agent.yaml, ca.pem and the
// token (0600). The flashing station copies a directory to the SD card's
// boot partition as devicePath (default /boot/firmware/fleetgate), where
// the agent's --bundle-dir finds it.
type bundleOutput struct {
	dir        string // absolute
	devicePath string // absolute path of the bundle on the device
	gateway    string // EST URL the device enrolls at
	mqtt       string // broker HOST:PORT
	caFile     string // the data dir's ca.pem
	batch      string
	force      bool

	ids []string // the devices of this run
	ca  []byte   // read by check
}

// newBundleOutput checks the --bundle flags and makes the output.
func (o *tokenOptions) newBundleOutput(a *app, ids []string) (*bundleOutput, error) {
	if o.bundleGateway == "" || o.bundleMQTT == "" {
		return nil, usageErrorf("--bundle needs --bundle-gateway https://HOST:8443 and --bundle-mqtt HOST:8883 (the addresses devices use)")
	}
	u, err := url.Parse(o.bundleGateway)
	if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, usageErrorf("--bundle-gateway %q: want https://HOST:PORT, the gateway's EST listener", o.bundleGateway)
	}
	if host, port, err := net.SplitHostPort(o.bundleMQTT); err != nil || host == "" || port == "" {
		return nil, usageErrorf("--bundle-mqtt %q: want HOST:PORT", o.bundleMQTT)
	}
	// The path is on the device, not here: a Linux path whatever this
	// machine is.
	if !path.IsAbs(o.bundlePath) || path.Clean(o.bundlePath) != o.bundlePath {
		return nil, usageErrorf("--bundle-path %q: want a clean absolute path on the device, e.g. %s", o.bundlePath, defaultBundlePath)
	}
	dir, err := filepath.Abs(o.bundle)
	if err != nil {
		return nil, usageErrorf("--bundle: %w", err)
	}
	return &bundleOutput{
		dir:        dir,
		devicePath: o.bundlePath,
		gateway:    "https://" + u.Host,
		mqtt:       o.bundleMQTT,
		caFile:     a.layout().CABundle(),
		batch:      o.batch,
		force:      o.force,
		ids:        ids,
	}, nil
}

// check runs before minting: the CA bundle is readable, DIR can be made,
// and no device directory is in the way (unless --force).
func (b *bundleOutput) check() error {
	if err := b.checkDir(); err != nil {
		return err
	}
	return b.checkDevices()
}

func (b *bundleOutput) checkDir() error {
	ca, err := os.ReadFile(b.caFile)
	if err != nil {
		return fmt.Errorf("--bundle: CA bundle: %w", err)
	}
	if _, err := pki.ParseCertsPEM(ca); err != nil {
		return fmt.Errorf("--bundle: CA bundle %s: %w", b.caFile, err)
	}
	b.ca = ca
	st, err := os.Stat(b.dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		parent, perr := os.Stat(filepath.Dir(b.dir))
		if perr != nil {
			return fmt.Errorf("--bundle: %w", perr)
		}
		if !parent.IsDir() {
			return fmt.Errorf("--bundle: %s is not a directory", filepath.Dir(b.dir))
		}
		return nil
	case err != nil:
		return fmt.Errorf("--bundle: %w", err)
	case !st.IsDir():
		return fmt.Errorf("--bundle: %s is not a directory", b.dir)
	}
	return nil
}

// checkDevices refuses to overwrite a device's bundle, which may hold an
// unused token, unless --force.
func (b *bundleOutput) checkDevices() error {
	if b.force {
		return nil
	}
	for _, id := range b.ids {
		if _, err := os.Lstat(filepath.Join(b.dir, id)); err == nil {
			return fmt.Errorf("%s exists and may hold an unused token: choose another --bundle or pass --force", filepath.Join(b.dir, id))
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("--bundle: %w", err)
		}
	}
	return nil
}

// write makes each device's directory under a temporary name and renames
// it into place, so a directory that exists is complete.
func (b *bundleOutput) write(tokens []adminapi.Token) error {
	if err := os.MkdirAll(b.dir, 0o700); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	for _, t := range tokens {
		if err := b.writeDevice(t); err != nil {
			return fmt.Errorf("bundle for %s: %w", t.DeviceID, err)
		}
	}
	return nil
}

func (b *bundleOutput) writeDevice(t adminapi.Token) error {
	cfg, err := b.config(t)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(b.dir, "."+t.DeviceID+".tmp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // gone after the rename; cleans up a failure
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{bundleConfig, cfg, 0o644},
		{bundleCA, b.ca, 0o644},
		{bundleToken, []byte(t.Token + "\n"), 0o600},
	} {
		if err := pki.WriteFileAtomic(filepath.Join(tmp, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	// MkdirTemp made tmp 0700: the directory holds a secret.
	final := filepath.Join(b.dir, t.DeviceID)
	if b.force {
		if err := os.RemoveAll(final); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, final); err != nil {
		return err
	}
	return syncDir(b.dir)
}

// bundleSettings is the agent.yaml of a bundle; field names are the agent's
// flag names with '_'.
type bundleSettings struct {
	DeviceID  string `yaml:"device_id"`
	Gateway   string `yaml:"gateway"`
	MQTT      string `yaml:"mqtt"`
	CA        string `yaml:"ca"`
	TokenFile string `yaml:"token_file"`
}

// config renders a device's agent.yaml: a comment saying what it is, then
// the settings, every value quoted as YAML needs (a device ID such as 007
// stays text).
func (b *bundleOutput) config(t adminapi.Token) ([]byte, error) {
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# fleetgate agent first-boot bundle for %s", t.DeviceID)
	if b.batch != "" {
		fmt.Fprintf(&buf, ", batch %q", b.batch)
	}
	fmt.Fprintf(&buf, ".\n# Made by 'provisioning token create --bundle' at %s.\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(&buf, "# Copy this directory to the device's boot partition as %s.\n", b.devicePath)
	fmt.Fprintf(&buf, "# The agent reads it when no --config is given; settings here win over\n")
	fmt.Fprintf(&buf, "# /etc/fleetgate/agent.yaml. The token is single-use and expires %s;\n", t.ExpiresAt.UTC().Format(time.RFC3339))
	fmt.Fprintf(&buf, "# the agent deletes it after enrolling when it may.\n")
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	err := enc.Encode(bundleSettings{
		DeviceID:  t.DeviceID,
		Gateway:   b.gateway,
		MQTT:      b.mqtt,
		CA:        path.Join(b.devicePath, bundleCA),
		TokenFile: path.Join(b.devicePath, bundleToken),
	})
	if err != nil {
		return nil, fmt.Errorf("render agent.yaml: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("render agent.yaml: %w", err)
	}
	return buf.Bytes(), nil
}

func (b *bundleOutput) describe() string {
	return b.dir + "/<device-id>/ (agent.yaml, ca.pem, token)"
}

// syncDir flushes a directory's entries (the renames) to disk.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
