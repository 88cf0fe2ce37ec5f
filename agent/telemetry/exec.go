package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// MaxExecOutput bounds what an Exec command may print: with the system
// metrics beside it, the message stays under the gateway's default payload
// limit of 64 KiB.
const MaxExecOutput = 32 << 10

// Errors of Exec.Run.
var (
	// ErrExecTimeout: the command ran past its time limit and was killed.
	ErrExecTimeout = errors.New("timed out")
	// ErrNotObject: the command's output is not one JSON object.
	ErrNotObject = errors.New("output is not a JSON object")
)

// Exec is a telemetry source that runs a shell command (sh -c) and reads
// one JSON object from its stdout. It lets a device report anything a
// script can measure without code in the agent.
type Exec struct {
	Command string
	// Timeout bounds each run; the command and everything it started are
	// killed when it passes.
	Timeout time.Duration
}

// Run runs the command once and returns its output, compacted. It fails
// when the command fails, runs too long, prints more than MaxExecOutput
// bytes or prints anything but one JSON object.
func (e Exec) Run(ctx context.Context) (json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", e.Command)
	stdout := &limitedBuffer{max: MaxExecOutput}
	stderr := &limitedBuffer{max: 1024}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	killGroup(cmd)
	// A grandchild that keeps stdout open must not hold Run past the kill.
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	switch {
	case ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded):
		return nil, fmt.Errorf("exec %q: %w after %v", e.Command, ErrExecTimeout, e.Timeout)
	case ctx.Err() != nil:
		return nil, fmt.Errorf("exec %q: %w", e.Command, ctx.Err())
	case err != nil:
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return nil, fmt.Errorf("exec %q: %w: %s", e.Command, err, lastLine(msg))
		}
		return nil, fmt.Errorf("exec %q: %w", e.Command, err)
	case stdout.overflow:
		return nil, fmt.Errorf("exec %q: output over %d bytes", e.Command, MaxExecOutput)
	}
	obj, err := compactObject(stdout.Bytes())
	if err != nil {
		return nil, fmt.Errorf("exec %q: %w", e.Command, err)
	}
	return obj, nil
}

// compactObject checks that data is exactly one JSON object and returns it
// without insignificant white space.
func compactObject(data []byte) (json.RawMessage, error) {
	data = bytes.TrimSpace(data)
	if len(data) == 0 || data[0] != '{' {
		return nil, fmt.Errorf("%w: %s", ErrNotObject, describe(data))
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, data); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotObject, err)
	}
	return buf.Bytes(), nil
}

// describe quotes the start of bad input for an error message.
func describe(data []byte) string {
	if len(data) == 0 {
		return "empty"
	}
	const max = 40
	if len(data) > max {
		return fmt.Sprintf("%q...", data[:max])
	}
	return fmt.Sprintf("%q", data)
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// limitedBuffer keeps the first max bytes written and notes the rest. (It
// holds its buffer in a field: an embedded bytes.Buffer would lend it
// ReadFrom, which io.Copy prefers to Write, bypassing the limit.)
type limitedBuffer struct {
	buf      bytes.Buffer
	max      int
	overflow bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	room := b.max - b.buf.Len()
	if len(p) > room {
		b.overflow = true
		if room > 0 {
			b.buf.Write(p[:room])
		}
		// Claim success: failing the write would kill the command with
		// SIGPIPE and hide the real reason.
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (b *limitedBuffer) Bytes() []byte  { return b.buf.Bytes() }
func (b *limitedBuffer) String() string { return b.buf.String() }
