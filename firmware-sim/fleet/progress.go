package fleet

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// Progress shows a fleet's live counters: one line rewritten in place on a
// terminal, a line every few seconds otherwise (CI logs).
type Progress struct {
	w     io.Writer
	tty   bool
	every time.Duration
	stats *Stats
	start time.Time
	// Extra, when set, adds text to each line (gateway CPU and memory).
	Extra func() string

	mu    sync.Mutex
	phase string
	total int

	stop chan struct{}
	done chan struct{}
}

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// StartProgress starts printing the counters of s to w. A quiet progress
// (w nil) prints nothing.
func StartProgress(w io.Writer, s *Stats, total int) *Progress {
	p := &Progress{w: w, stats: s, total: total, start: time.Now(), stop: make(chan struct{}), done: make(chan struct{})}
	if w == nil {
		close(p.done)
		return p
	}
	p.tty = IsTerminal(w)
	p.every = 10 * time.Second
	if p.tty {
		p.every = 500 * time.Millisecond
	}
	go p.run()
	return p
}

// Phase names what the fleet is doing now.
func (p *Progress) Phase(name string) {
	p.mu.Lock()
	p.phase = name
	p.mu.Unlock()
	if p.w != nil && !p.tty {
		fmt.Fprintf(p.w, "[%6.1fs] phase: %s\n", time.Since(p.start).Seconds(), name)
	}
}

// Printf prints a line without garbling the live line.
func (p *Progress) Printf(format string, args ...any) {
	if p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty {
		fmt.Fprint(p.w, "\r\x1b[K")
	}
	fmt.Fprintf(p.w, format+"\n", args...)
}

func (p *Progress) run() {
	defer close(p.done)
	t := time.NewTicker(p.every)
	defer t.Stop()
	lastPub, lastRecv, last := int64(0), int64(0), time.Now()
	for {
		select {
		case <-p.stop:
			if p.tty {
				p.mu.Lock()
				fmt.Fprint(p.w, "\r\x1b[K")
				p.mu.Unlock()
			}
			return
		case now := <-t.C:
			pub, recv := p.stats.Published.Load(), p.stats.Received.Load()
			dt := now.Sub(last).Seconds()
			line := p.line(float64(pub-lastPub)/dt, float64(recv-lastRecv)/dt)
			lastPub, lastRecv, last = pub, recv, now
			p.mu.Lock()
			if p.tty {
				fmt.Fprint(p.w, "\r\x1b[K"+line)
			} else {
				fmt.Fprintln(p.w, line)
			}
			p.mu.Unlock()
		}
	}
}

func (p *Progress) line(pubRate, recvRate float64) string {
	p.mu.Lock()
	phase, total := p.phase, p.total
	p.mu.Unlock()
	s := p.stats
	parts := []string{
		fmt.Sprintf("[%6.1fs] %s", time.Since(p.start).Seconds(), phase),
		fmt.Sprintf("enrolled %s/%s", FormatNumber(float64(s.Enrolled.Load())), FormatNumber(float64(total))),
		fmt.Sprintf("connected %s", FormatNumber(float64(s.Connected.Load()))),
		fmt.Sprintf("pub %s/s", FormatNumber(pubRate)),
		fmt.Sprintf("recv %s/s", FormatNumber(recvRate)),
		fmt.Sprintf("errors %s", FormatNumber(float64(s.ErrorTotal()))),
	}
	if p.Extra != nil {
		if e := p.Extra(); e != "" {
			parts = append(parts, e)
		}
	}
	return strings.Join(parts, " | ")
}

// Stop stops printing.
func (p *Progress) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	close(p.stop)
	<-p.done
}
