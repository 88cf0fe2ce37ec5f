// Command mkdeb builds the fleetgate-agent Debian packages from agent
// binaries already built (make dist runs it):
//
//	go run ./agent/packaging/mkdeb -version "$(git describe --tags --always --dirty)" -out dist \
//	    -bin armhf=dist/agent-linux-armv6 -bin arm64=dist/agent-linux-arm64 -bin amd64=dist/agent-linux-amd64
//
// The version is turned into a Debian version (packaging.DebianVersion).
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/fleetgate/fleetgate/agent/packaging"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// binFlags collects -bin ARCH=PATH.
type binFlags map[string]string

func (b binFlags) String() string { return fmt.Sprint(map[string]string(b)) }

func (b binFlags) Set(s string) error {
	arch, path, ok := strings.Cut(s, "=")
	if !ok || arch == "" || path == "" {
		return fmt.Errorf("%q: want ARCH=PATH", s)
	}
	if _, known := packaging.Arches[arch]; !known {
		return fmt.Errorf("architecture %q: want one of armhf, arm64, amd64", arch)
	}
	b[arch] = path
	return nil
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("mkdeb", flag.ContinueOnError)
	fs.SetOutput(stderr)
	version := fs.String("version", "", "version, as git describe --tags --always --dirty prints it")
	out := fs.String("out", "dist", "directory for the .deb files")
	maintainer := fs.String("maintainer", "", "Maintainer field of the packages")
	bins := binFlags{}
	fs.Var(bins, "bin", "ARCH=PATH: package the agent binary PATH for Debian architecture ARCH (repeat)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 || len(bins) == 0 || *version == "" {
		fmt.Fprintln(stderr, "mkdeb: want -version V and at least one -bin ARCH=PATH")
		return 2
	}
	v, err := packaging.DebianVersion(*version)
	if err != nil {
		fmt.Fprintf(stderr, "mkdeb: %v\n", err)
		return 2
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		fmt.Fprintf(stderr, "mkdeb: %v\n", err)
		return 1
	}
	arches := make([]string, 0, len(bins))
	for a := range bins {
		arches = append(arches, a)
	}
	sort.Strings(arches)
	for _, arch := range arches {
		path, err := packaging.BuildFile(*out, packaging.Package{Version: v, Arch: arch, Binary: bins[arch], Maintainer: *maintainer})
		if err != nil {
			fmt.Fprintf(stderr, "mkdeb: %v\n", err)
			return 1
		}
		fmt.Fprintln(stdout, path)
	}
	return 0
}
