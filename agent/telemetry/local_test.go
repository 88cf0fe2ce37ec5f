package telemetry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestParseLine(t *testing.T) {
	for _, tc := range []struct {
		name, line   string
		sub, data    string
		wantErr      string
		is           error
		skipDataTest bool
	}{
		{name: "plain object", line: `{"temp_c": 21.5, "door": "open"}`, data: `{"temp_c":21.5,"door":"open"}`},
		{name: "envelope with subtopic", line: `{"topic":"temp","data":{"c":21.5}}`, sub: "temp", data: `{"c":21.5}`},
		{name: "nested subtopic", line: `{"topic":"greenhouse/3/soil","data":{}}`, sub: "greenhouse/3/soil", data: `{}`},
		{name: "invalid JSON", line: `{"temp_c": 21.5`, is: ErrNotObject},
		{name: "not an object", line: `21.5`, is: ErrNotObject},
		{name: "trailing garbage", line: `{"a":1} x`, is: ErrNotObject},
		{name: "envelope without data", line: `{"topic":"temp"}`, wantErr: "envelope"},
		{name: "envelope with extra keys", line: `{"topic":"temp","data":{},"c":1}`, wantErr: "envelope"},
		{name: "envelope data not an object", line: `{"topic":"temp","data":5}`, is: ErrNotObject},
		{name: "topic not a string", line: `{"topic":5,"data":{}}`, is: ErrBadSubtopic},
		{name: "wildcard in topic", line: `{"topic":"temp/#","data":{}}`, is: ErrBadSubtopic},
		{name: "plus in topic", line: `{"topic":"+","data":{}}`, is: ErrBadSubtopic},
		{name: "empty level", line: `{"topic":"a//b","data":{}}`, is: ErrBadSubtopic},
		{name: "leading slash", line: `{"topic":"/a","data":{}}`, is: ErrBadSubtopic},
		{name: "trailing slash", line: `{"topic":"a/","data":{}}`, is: ErrBadSubtopic},
		{name: "empty topic", line: `{"topic":"","data":{}}`, is: ErrBadSubtopic},
		{name: "topic too long", line: `{"topic":"` + strings.Repeat("a", 129) + `","data":{}}`, is: ErrBadSubtopic},
		{name: "NUL in topic", line: `{"topic":"a\u0000b","data":{}}`, is: ErrBadSubtopic},
		{name: "line too long", line: `{"a":"` + strings.Repeat("x", MaxLineSize) + `"}`, is: ErrLineTooLong},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := ParseLine([]byte(tc.line))
			if tc.wantErr == "" && tc.is == nil {
				if err != nil {
					t.Fatal(err)
				}
				if m.Subtopic != tc.sub || string(m.Data) != tc.data {
					t.Fatalf("got %q %s, want %q %s", m.Subtopic, m.Data, tc.sub, tc.data)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted: %+v", m)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v, want %v", err, tc.is)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q, want %q", err, tc.wantErr)
			}
		})
	}
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// localServer serves a socket in a temp dir and collects what it stores.
type localServer struct {
	path string
	got  chan LocalMessage
	logs *syncBuffer
}

func startLocal(t *testing.T, store func([]LocalMessage) []error) *localServer {
	t.Helper()
	// Unix socket paths are short: use a short temp dir.
	dir, err := os.MkdirTemp("", "fg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ls := &localServer{path: filepath.Join(dir, "run", "telemetry.sock"), got: make(chan LocalMessage, 100), logs: &syncBuffer{}}
	ln, err := ListenLocal(ls.path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	if store == nil {
		store = func(ms []LocalMessage) []error {
			for _, m := range ms {
				ls.got <- m
			}
			return nil
		}
	}
	srv := &LocalServer{Store: store, Log: slog.New(slog.NewTextHandler(ls.logs, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return ls
}

func (ls *localServer) next(t *testing.T) LocalMessage {
	t.Helper()
	select {
	case m := <-ls.got:
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("no message; log:\n%s", ls.logs.String())
		return LocalMessage{}
	}
}

func (ls *localServer) waitLog(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(ls.logs.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("log never said %q:\n%s", s, ls.logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLocalSocket(t *testing.T) {
	ls := startLocal(t, nil)
	fi, err := os.Stat(ls.path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want a socket with 0660", fi.Mode())
	}

	c, err := net.Dial("unix", ls.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	t.Run("valid line", func(t *testing.T) {
		fmt.Fprintln(c, `{"temp_c": 21.5}`)
		if m := ls.next(t); m.Subtopic != "" || string(m.Data) != `{"temp_c":21.5}` {
			t.Fatalf("got %+v", m)
		}
	})
	t.Run("envelope and CRLF", func(t *testing.T) {
		fmt.Fprint(c, "{\"topic\":\"door\",\"data\":{\"open\":true}}\r\n")
		if m := ls.next(t); m.Subtopic != "door" || string(m.Data) != `{"open":true}` {
			t.Fatalf("got %+v", m)
		}
	})
	t.Run("invalid JSON is rejected with a reason and the connection lives on", func(t *testing.T) {
		fmt.Fprintln(c, `{"temp_c": 21.`)
		fmt.Fprintln(c, `{"after":"bad"}`)
		if m := ls.next(t); string(m.Data) != `{"after":"bad"}` {
			t.Fatalf("got %+v", m)
		}
		ls.waitLog(t, "invalid line")
		ls.waitLog(t, "output is not a JSON object")
	})
	t.Run("oversized line is skipped whole", func(t *testing.T) {
		// Past the log rate limit of the previous subtest.
		time.Sleep(1100 * time.Millisecond)
		big := `{"pad":"` + strings.Repeat("x", 3*MaxLineSize) + `"}`
		go func() {
			fmt.Fprintln(c, big)
			fmt.Fprintln(c, `{"after":"big"}`)
		}()
		if m := ls.next(t); string(m.Data) != `{"after":"big"}` {
			t.Fatalf("got %d bytes: the oversized line's tail was read as a message", len(m.Data))
		}
		ls.waitLog(t, "line too long")
	})
	t.Run("largest line accepted", func(t *testing.T) {
		line := `{"pad":"` + strings.Repeat("x", MaxLineSize-10) + `"}`
		go fmt.Fprintln(c, line)
		if m := ls.next(t); len(m.Data) != len(line) {
			t.Fatalf("got %d bytes, want %d", len(m.Data), len(line))
		}
	})
	t.Run("last line without newline, several writers", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 5 {
			wg.Go(func() {
				w, err := net.Dial("unix", ls.path)
				if err != nil {
					t.Error(err)
					return
				}
				fmt.Fprintf(w, `{"writer":%d}`, i)
				w.Close()
			})
		}
		wg.Wait()
		seen := map[string]bool{}
		for range 5 {
			seen[string(ls.next(t).Data)] = true
		}
		if len(seen) != 5 {
			t.Fatalf("got %v", seen)
		}
	})
}

func TestLocalSocketHandleError(t *testing.T) {
	ls := startLocal(t, func(ms []LocalMessage) []error { return []error{errors.New("spool closed")} })
	c, err := net.Dial("unix", ls.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintln(c, `{"a":1}`)
	ls.waitLog(t, "message not stored")
}

// TestLocalSocketBatches: lines that arrive together are stored together,
// in order, and never more than maxBatch at a time.
func TestLocalSocketBatches(t *testing.T) {
	var (
		mu      sync.Mutex
		got     []string
		batches []int
	)
	ls := startLocal(t, func(ms []LocalMessage) []error {
		mu.Lock()
		defer mu.Unlock()
		batches = append(batches, len(ms))
		for _, m := range ms {
			got = append(got, string(m.Data))
		}
		return nil
	})
	c, err := net.Dial("unix", ls.path)
	if err != nil {
		t.Fatal(err)
	}
	const n = 500
	var buf bytes.Buffer
	for i := range n {
		fmt.Fprintf(&buf, "{\"i\":%d}\n", i)
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		done := len(got) == n
		mu.Unlock()
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stored %d of %d", len(got), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	for i, g := range got {
		if want := fmt.Sprintf(`{"i":%d}`, i); g != want {
			t.Fatalf("line %d stored as %s", i, g)
		}
	}
	for _, b := range batches {
		if b > maxBatch {
			t.Fatalf("a batch of %d", b)
		}
	}
	if len(batches) >= n {
		t.Errorf("%d lines written at once were stored in %d batches", n, len(batches))
	}
	t.Logf("%d lines in %d batches", n, len(batches))
}

func TestListenLocal(t *testing.T) {
	dir, err := os.MkdirTemp("", "fg")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "t.sock")

	t.Run("stale socket replaced", func(t *testing.T) {
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		// Leave the file behind as a crash would.
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
		ln2, err := ListenLocal(path, 0o660)
		if err != nil {
			t.Fatal(err)
		}
		ln2.Close()
	})
	t.Run("a regular file is not replaced", func(t *testing.T) {
		os.Remove(path)
		if err := os.WriteFile(path, []byte("data"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := ListenLocal(path, 0o660); err == nil || !strings.Contains(err.Error(), "not a socket") {
			t.Fatalf("err %v", err)
		}
		if data, _ := os.ReadFile(path); string(data) != "data" {
			t.Fatal("file replaced")
		}
	})
}

func TestRateLimit(t *testing.T) {
	var r rateLimit
	t0 := time.Unix(1000, 0)
	if _, ok := r.allow(t0); !ok {
		t.Fatal("first event suppressed")
	}
	for i := range 5 {
		if _, ok := r.allow(t0.Add(time.Duration(i) * 100 * time.Millisecond)); ok {
			t.Fatal("event within a second let through")
		}
	}
	if n, ok := r.allow(t0.Add(2 * time.Second)); !ok || n != 5 {
		t.Fatalf("after a second: %d, %v", n, ok)
	}
}
