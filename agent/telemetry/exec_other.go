//go:build !unix

package telemetry

import "os/exec"

// killGroup: without process groups, the default cancellation kills the
// command alone.
func killGroup(*exec.Cmd) {}
