package telemetry

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// script writes an executable shell script into a temp dir.
func script(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "source.sh")
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestExec(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	for _, tc := range []struct {
		name    string
		body    string
		timeout time.Duration
		want    string // compacted output
		wantErr string
		is      error
	}{
		{name: "JSON object", body: `echo '{ "volts": 1.2,  "fan": "on" }'`, want: `{"volts":1.2,"fan":"on"}`},
		{name: "JSON across lines and stderr noise", body: "echo '{' ; echo '\"a\": [1, 2]' ; echo '}' ; echo warming up >&2", want: `{"a":[1,2]}`},
		{name: "failing command", body: "echo 'sensor not found' >&2; exit 3", wantErr: "exit status 3: sensor not found"},
		{name: "not JSON", body: "echo 42.5", wantErr: "output is not a JSON object", is: ErrNotObject},
		{name: "a JSON array is not an object", body: "echo '[1,2]'", is: ErrNotObject},
		{name: "two objects", body: `echo '{"a":1}{"b":2}'`, is: ErrNotObject},
		{name: "no output", body: "true", wantErr: "empty", is: ErrNotObject},
		{name: "too much output", body: `head -c 40000 /dev/zero | tr '\0' ' '; echo '{}'`, wantErr: "output over 32768 bytes"},
		{name: "slow command hits the timeout", body: "sleep 30; echo '{}'", timeout: 300 * time.Millisecond, is: ErrExecTimeout},
		{name: "slow grandchild holding stdout is killed too", body: "(sleep 30; echo '{}') & wait", timeout: 300 * time.Millisecond, is: ErrExecTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			timeout := tc.timeout
			if timeout == 0 {
				timeout = 30 * time.Second
			}
			start := time.Now()
			out, err := Exec{Command: script(t, tc.body), Timeout: timeout}.Run(context.Background())
			if took := time.Since(start); took > 20*time.Second {
				t.Errorf("Run took %v", took)
			}
			if tc.wantErr == "" && tc.is == nil {
				if err != nil {
					t.Fatal(err)
				}
				if string(out) != tc.want {
					t.Fatalf("output %s, want %s", out, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error; output %s", out)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v, want %v", err, tc.is)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q, want it to contain %q", err, tc.wantErr)
			}
		})
	}
	t.Run("cancelled context", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := (Exec{Command: "sleep 5", Timeout: time.Minute}).Run(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("err %v", err)
		}
	})
}
