package telemetry

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Limits of the local socket.
const (
	// MaxLineSize bounds one line (one message) on the local socket. With
	// the envelope the agent adds, a message stays under the gateway's
	// default payload limit of 64 KiB.
	MaxLineSize = 60 << 10
	// MaxSubtopicSize bounds the subtopic a line may name.
	MaxSubtopicSize = 128
	// MaxLocalConns bounds the local programs connected at once.
	MaxLocalConns = 32
)

// Errors of ParseLine.
var (
	ErrLineTooLong = fmt.Errorf("line longer than %d bytes", MaxLineSize)
	ErrBadSubtopic = errors.New("bad topic")
)

// LocalMessage is one line a local program wrote to the socket.
type LocalMessage struct {
	// Subtopic is where under devices/ID/telemetry the message goes; ""
	// for devices/ID/telemetry itself.
	Subtopic string
	// Data is the JSON object to send, compacted.
	Data json.RawMessage
}

// ParseLine reads one line of the local socket protocol: a JSON object,
// sent as it is to devices/ID/telemetry, or an envelope
// {"topic":"temp","data":{...}} whose data goes to
// devices/ID/telemetry/temp. An object with a "topic" key is always read
// as an envelope. A topic is 1 to 128 bytes of levels made of
// [A-Za-z0-9_.-], joined by '/'.
func ParseLine(line []byte) (LocalMessage, error) {
	if len(line) > MaxLineSize {
		return LocalMessage{}, ErrLineTooLong
	}
	obj, err := compactObject(line)
	if err != nil {
		return LocalMessage{}, err
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(obj, &fields); err != nil {
		return LocalMessage{}, fmt.Errorf("%w: %v", ErrNotObject, err)
	}
	rawTopic, envelope := fields["topic"]
	if !envelope {
		return LocalMessage{Data: obj}, nil
	}
	var sub string
	if err := json.Unmarshal(rawTopic, &sub); err != nil {
		return LocalMessage{}, fmt.Errorf("%w: want a string", ErrBadSubtopic)
	}
	if err := checkSubtopic(sub); err != nil {
		return LocalMessage{}, err
	}
	data, ok := fields["data"]
	if !ok || len(fields) != 2 {
		return LocalMessage{}, errors.New(`an object with "topic" is an envelope: want exactly "topic" and "data"`)
	}
	if len(data) == 0 || data[0] != '{' {
		return LocalMessage{}, fmt.Errorf(`"data": %w`, ErrNotObject)
	}
	return LocalMessage{Subtopic: sub, Data: data}, nil
}

// checkSubtopic keeps subtopics inside what the gateway's topic ACL allows
// and free of MQTT wildcards, so a line can never get the device cut off.
func checkSubtopic(s string) error {
	if s == "" || len(s) > MaxSubtopicSize {
		return fmt.Errorf("%w %q: want 1 to %d bytes", ErrBadSubtopic, s, MaxSubtopicSize)
	}
	level := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '/':
			if level == 0 {
				return fmt.Errorf("%w %q: empty level", ErrBadSubtopic, s)
			}
			level = 0
			continue
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '.', c == '-':
		default:
			return fmt.Errorf("%w %q: only letters, digits, '_', '.', '-' and '/'", ErrBadSubtopic, s)
		}
		level++
	}
	if level == 0 {
		return fmt.Errorf("%w %q: empty level", ErrBadSubtopic, s)
	}
	return nil
}

// ListenLocal creates the unix socket at path with the given mode (group
// members may write when it is 0660). A stale socket from an earlier run is
// replaced; any other file in the way is an error.
func ListenLocal(path string, mode fs.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("local socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("local socket %s: a file that is not a socket is in the way", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("local socket: remove stale socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("local socket: %w", err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("local socket: %w", err)
	}
	return ln, nil
}

// maxBatch bounds the lines of one connection stored together.
const maxBatch = 64

// LocalServer reads telemetry lines from local programs.
type LocalServer struct {
	// Store stores the messages of lines that arrived together, in order,
	// in one go, and says for each why it was not stored (a nil slice or
	// nil entries: stored). Errors are logged.
	Store func([]LocalMessage) []error
	Log   *slog.Logger

	limit rateLimit
}

// Serve accepts connections on ln until ctx ends, then closes ln and every
// connection and returns. Each connection may send any number of lines;
// a bad line is logged and skipped, the connection stays open. A
// connection's lines are stored in order, those already read together in
// one batch (one spool transaction), and the next read waits for the store:
// a writer faster than the spool is slowed by the socket (back-pressure)
// rather than buffered in memory.
func (s *LocalServer) Serve(ctx context.Context, ln net.Listener) {
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				s.Log.Error("local socket stopped accepting", "error", err)
			}
			break
		}
		mu.Lock()
		if ctx.Err() != nil {
			mu.Unlock()
			c.Close()
			break
		}
		if len(conns) >= MaxLocalConns {
			mu.Unlock()
			s.reject("connection refused", fmt.Errorf("%d programs connected already", MaxLocalConns))
			c.Close()
			continue
		}
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Go(func() {
			s.serveConn(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		})
	}
	ln.Close()
	wg.Wait()
}

func (s *LocalServer) serveConn(c net.Conn) {
	r := bufio.NewReaderSize(c, MaxLineSize+1)
	batch := make([]LocalMessage, 0, maxBatch)
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			s.reject("line too long", ErrLineTooLong)
			// Skip the rest of the line.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = r.ReadSlice('\n')
			}
			line = nil
		}
		if t := bytes.TrimSpace(line); len(t) > 0 {
			// Parse now: the next read reuses line's memory.
			if m, perr := ParseLine(t); perr != nil {
				s.reject("invalid line", perr)
			} else {
				batch = append(batch, m)
			}
		}
		if err == nil && len(batch) < maxBatch && lineBuffered(r) {
			continue
		}
		s.store(batch)
		batch = batch[:0]
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.Log.Debug("local socket connection ended", "error", err)
			}
			return
		}
	}
}

// lineBuffered reports whether r holds a whole line already read from
// the connection.
func lineBuffered(r *bufio.Reader) bool {
	n := r.Buffered()
	if n == 0 {
		return false
	}
	b, _ := r.Peek(n)
	return bytes.IndexByte(b, '\n') >= 0
}

func (s *LocalServer) store(batch []LocalMessage) {
	if len(batch) == 0 {
		return
	}
	for _, err := range s.Store(batch) {
		if err != nil {
			s.reject("message not stored", err)
		}
	}
}

// reject logs a refused line, at most once a second per server, with the
// number of refusals not logged in between: a broken sensor program must
// not flood the journal.
func (s *LocalServer) reject(what string, err error) {
	if n, ok := s.limit.allow(time.Now()); ok {
		s.Log.Warn("local socket: "+what, "reason", err, "not_logged_since_last", n)
	}
}

// rateLimit lets one event through per second and counts the others.
type rateLimit struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (r *rateLimit) allow(now time.Time) (int, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now.Sub(r.last) < time.Second {
		r.suppressed++
		return 0, false
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	return n, true
}
