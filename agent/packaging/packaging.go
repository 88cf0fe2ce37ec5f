// Package packaging builds the agent's Debian package, fleetgate-agent,
// with nfpm: the static binary as /usr/bin/fleetgate-agent, a hardened
// systemd unit that runs it as the system user fleetgate-agent, a
// commented /etc/fleetgate/agent.yaml (a conffile) and the maintainer
// scripts that create the user and enable the unit. The sources of those
// files sit beside this file and are embedded, so the builder runs from
// anywhere.
package packaging

import (
	"embed"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
)

// Name is the package name; the unit, the user and the state directory
// share it.
const Name = "fleetgate-agent"

// Paths inside the package.
const (
	BinaryPath   = "/usr/bin/fleetgate-agent"
	UnitPath     = "/lib/systemd/system/fleetgate-agent.service"
	ConfigPath   = "/etc/fleetgate/agent.yaml"
	SysusersPath = "/usr/lib/sysusers.d/fleetgate-agent.conf"
)

//go:embed fleetgate-agent.service agent.yaml sysusers.conf scripts
var sources embed.FS

// Source returns one of the embedded packaging sources, e.g.
// "fleetgate-agent.service", "agent.yaml" or "scripts/postinst".
func Source(name string) ([]byte, error) { return sources.ReadFile(name) }

// Arches maps the Debian architectures the agent is packaged for to the
// Go target of the binary they carry. armhf carries the ARMv6 build: it runs
// on every Raspberry Pi, and Raspberry Pi OS's armhf is ARMv6 too.
var Arches = map[string]string{
	"armhf": "linux/arm GOARM=6",
	"arm64": "linux/arm64",
	"amd64": "linux/amd64",
}

// Package describes one .deb to build.
type Package struct {
	// Version is a Debian version (see DebianVersion).
	Version string
	// Arch is a Debian architecture: a key of Arches.
	Arch string
	// Binary is the agent executable for Arch.
	Binary string
	// Maintainer for the control file; a default when empty.
	Maintainer string
	// MTime stamps every file; the zero time means SOURCE_DATE_EPOCH or now.
	MTime time.Time
}

// FileName is the conventional name of the package file:
// fleetgate-agent_VERSION_ARCH.deb.
func (p Package) FileName() string { return Name + "_" + p.Version + "_" + p.Arch + ".deb" }

var debVersionRE = regexp.MustCompile(`^[0-9][A-Za-z0-9.+~]*$`)

// Build writes the .deb to w.
func Build(w io.Writer, p Package) error {
	if _, ok := Arches[p.Arch]; !ok {
		return fmt.Errorf("package %s: unknown architecture %q", Name, p.Arch)
	}
	if !debVersionRE.MatchString(p.Version) {
		return fmt.Errorf("package %s: %q is not a Debian version (see DebianVersion)", Name, p.Version)
	}
	if fi, err := os.Stat(p.Binary); err != nil {
		return fmt.Errorf("package %s: binary: %w", Name, err)
	} else if !fi.Mode().IsRegular() {
		return fmt.Errorf("package %s: binary %s is not a file", Name, p.Binary)
	}
	if p.Maintainer == "" {
		p.Maintainer = "fleetgate maintainers <fleetgate@users.noreply.github.com>"
	}
	// nfpm reads every file from disk: lay the embedded sources out.
	dir, err := os.MkdirTemp("", "fleetgate-deb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	src := func(name string) string { return filepath.Join(dir, filepath.FromSlash(name)) }
	for _, name := range []string{"fleetgate-agent.service", "agent.yaml", "sysusers.conf", "scripts/postinst", "scripts/prerm", "scripts/postrm"} {
		data, err := sources.ReadFile(name)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(src(name)), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(src(name), data, 0o755); err != nil {
			return err
		}
	}

	info := nfpm.WithDefaults(&nfpm.Info{
		Name:          Name,
		Arch:          p.Arch,
		Platform:      "linux",
		Version:       p.Version,
		VersionSchema: "none",
		Section:       "net",
		Priority:      "optional",
		Maintainer:    p.Maintainer,
		Homepage:      "https://github.com/fleetgate/fleetgate",
		Description: "fleetgate device agent\n" +
			"Enrolls the device with a fleetgate gateway (EST, one-time token, key in a\n" +
			"file or a TPM), publishes telemetry over mutually authenticated MQTT with an\n" +
			"on-disk store-and-forward spool, and renews its certificate. A static binary\n" +
			"with a hardened systemd unit; reads a first-boot bundle from the boot partition.",
		MTime: p.MTime,
		Overridables: nfpm.Overridables{
			Contents: files.Contents{
				{Source: p.Binary, Destination: BinaryPath, FileInfo: &files.ContentFileInfo{Mode: 0o755}},
				{Source: src("fleetgate-agent.service"), Destination: UnitPath, FileInfo: &files.ContentFileInfo{Mode: 0o644}},
				{Source: src("sysusers.conf"), Destination: SysusersPath, FileInfo: &files.ContentFileInfo{Mode: 0o644}},
				{Destination: "/etc/fleetgate", Type: files.TypeDir, FileInfo: &files.ContentFileInfo{Mode: 0o755}},
				// Group fleetgate-agent does not exist when dpkg unpacks;
				// postinst hands the file to it.
				{Source: src("agent.yaml"), Destination: ConfigPath, Type: files.TypeConfig, FileInfo: &files.ContentFileInfo{Mode: 0o640}},
			},
			Scripts: nfpm.Scripts{
				PostInstall: src("scripts/postinst"),
				PreRemove:   src("scripts/prerm"),
				PostRemove:  src("scripts/postrm"),
			},
		},
	})
	if err := deb.Default.Package(info, w); err != nil {
		return fmt.Errorf("package %s %s %s: %w", Name, p.Version, p.Arch, err)
	}
	return nil
}

// BuildFile builds the package into dir under its conventional name and
// returns the path. The file appears complete or not at all.
func BuildFile(dir string, p Package) (string, error) {
	path := filepath.Join(dir, p.FileName())
	f, err := os.CreateTemp(dir, "."+p.FileName()+".tmp-")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	if err := Build(f, p); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return "", err
	}
	return path, nil
}

var (
	describeRE = regexp.MustCompile(`^(.*)-([0-9]+)-g([0-9a-f]{4,40})$`)
	tagRE      = regexp.MustCompile(`^[vV]?([0-9]+(?:\.[0-9]+)*)(.*)$`)
	hashRE     = regexp.MustCompile(`^[0-9a-f]{4,40}$`)
	unsafeRE   = regexp.MustCompile(`[^A-Za-z0-9.+~]+`)
)

// DebianVersion turns the output of `git describe --tags --always --dirty`
// into a Debian version that sorts the way the builds were made:
//
//	v1.2.3                  1.2.3
//	v1.2.3-rc.1             1.2.3~rc.1              (before 1.2.3)
//	v1.2.3-4-gabc1234       1.2.3+git4.abc1234      (after 1.2.3)
//	abc1234                 0.0.0~gitabc1234        (no tag yet)
//	v1.2.3-dirty            1.2.3+dirty
//	dev                     0.0.0~dev
func DebianVersion(describe string) (string, error) {
	s := strings.TrimSpace(describe)
	if s == "" {
		return "", errors.New("empty version")
	}
	s, dirty := strings.CutSuffix(s, "-dirty")
	var after string
	if m := describeRE.FindStringSubmatch(s); m != nil {
		s, after = m[1], "git"+m[2]+"."+m[3]
	}
	var v string
	m := tagRE.FindStringSubmatch(s)
	switch {
	case after == "" && hashRE.MatchString(s):
		// --always: no tag reaches this commit.
		v = "0.0.0~git" + s
	case m != nil:
		v = m[1]
		switch rest := m[2]; {
		case rest == "":
		case rest[0] == '+':
			v += "+" + clean(rest[1:])
		default:
			v += "~" + clean(strings.TrimLeft(rest, "-~."))
		}
	default:
		v = "0.0.0~" + clean(s)
	}
	var plus []string
	if after != "" {
		plus = append(plus, after)
	}
	if dirty {
		plus = append(plus, "dirty")
	}
	if len(plus) > 0 {
		sep := "+"
		if strings.Contains(v, "+") {
			sep = "."
		}
		v += sep + strings.Join(plus, ".")
	}
	v = strings.TrimRight(v, "~.+")
	if !debVersionRE.MatchString(v) {
		return "", fmt.Errorf("version %q: cannot make a Debian version of it (got %q)", describe, v)
	}
	return v, nil
}

// clean replaces what a Debian upstream version may not hold with dots.
func clean(s string) string {
	return strings.Trim(unsafeRE.ReplaceAllString(s, "."), ".")
}
