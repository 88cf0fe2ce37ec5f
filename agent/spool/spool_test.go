package spool

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// openTest opens a spool at path and, when the test ends, runs the
// consistency check and closes it.
func openTest(t testing.TB, path string, opts *Options) *Spool {
	t.Helper()
	s, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { checkAndClose(t, s) })
	return s
}

func checkAndClose(t testing.TB, s *Spool) {
	t.Helper()
	if err := s.Check(); err != nil && !errors.Is(err, ErrClosed) {
		t.Errorf("consistency check: %v", err)
	}
	if err := s.Close(); err != nil && !errors.Is(err, ErrClosed) {
		t.Errorf("close: %v", err)
	}
}

func newTest(t testing.TB, opts *Options) *Spool {
	t.Helper()
	return openTest(t, filepath.Join(t.TempDir(), "spool.db"), opts)
}

// payload builds a message body naming its sequence number.
func payload(size int) func(seq, dropped uint64) ([]byte, error) {
	return func(seq, dropped uint64) ([]byte, error) {
		b := fmt.Appendf(nil, `{"seq":%d,"spool_dropped":%d,"pad":"`, seq, dropped)
		for len(b) < size-2 {
			b = append(b, 'x')
		}
		return append(b, `"}`...), nil
	}
}

func appendN(t testing.TB, s *Spool, topic string, n, size int) []Appended {
	t.Helper()
	out := make([]Appended, 0, n)
	for range n {
		a, err := s.Append(topic, payload(size))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

func seqs(msgs []Message) []uint64 {
	out := make([]uint64, len(msgs))
	for i, m := range msgs {
		out[i] = m.Seq
	}
	return out
}

func stats(t testing.TB, s *Spool) Stats {
	t.Helper()
	st, err := s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestSequenceNumbers(t *testing.T) {
	t.Run("start at 1 and increase by one", func(t *testing.T) {
		s := newTest(t, nil)
		for i, a := range appendN(t, s, "t", 5, 50) {
			if a.Seq != uint64(i+1) {
				t.Fatalf("message %d got seq %d", i, a.Seq)
			}
		}
	})
	t.Run("never reused after acknowledgement and reopen", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "spool.db")
		s, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		appendN(t, s, "t", 3, 50)
		if err := s.Ack(1, 2, 3); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s = openTest(t, path, nil)
		if st := stats(t, s); st.Pending != 0 || st.NextSeq != 4 {
			t.Fatalf("after reopen: %+v", st)
		}
		if a := appendN(t, s, "t", 1, 50)[0]; a.Seq != 4 {
			t.Fatalf("seq after reopen %d, want 4", a.Seq)
		}
	})
	t.Run("a failed build uses no number", func(t *testing.T) {
		s := newTest(t, nil)
		boom := errors.New("boom")
		if _, err := s.Append("t", func(uint64, uint64) ([]byte, error) { return nil, boom }); !errors.Is(err, boom) {
			t.Fatalf("err %v", err)
		}
		if a := appendN(t, s, "t", 1, 50)[0]; a.Seq != 1 {
			t.Fatalf("seq %d after a failed build, want 1", a.Seq)
		}
	})
	t.Run("a message too large for the spool is refused and uses no number", func(t *testing.T) {
		s := newTest(t, &Options{MaxBytes: MinMaxBytes})
		_, err := s.Append("t", payload(MinMaxBytes))
		if !errors.Is(err, ErrTooLarge) {
			t.Fatalf("err %v, want ErrTooLarge", err)
		}
		if a := appendN(t, s, "t", 1, 50)[0]; a.Seq != 1 {
			t.Fatalf("seq %d, want 1", a.Seq)
		}
	})
}

func TestAppendBatch(t *testing.T) {
	s := newTest(t, &Options{MaxMessages: 4, MaxBytes: MinMaxBytes})
	boom := errors.New("boom")
	entries := []Entry{
		{Topic: "a", Build: payload(30)},
		{Topic: "b", Build: func(uint64, uint64) ([]byte, error) { return nil, boom }},
		{Topic: "c", Build: payload(MinMaxBytes)}, // too large
		{Topic: "d", Build: payload(30)},
	}
	res, err := s.AppendBatch(entries)
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Seq != 1 || res[0].Err != nil || res[3].Seq != 2 || res[3].Err != nil {
		t.Fatalf("stored entries: %+v, %+v", res[0], res[3])
	}
	if !errors.Is(res[1].Err, boom) || !errors.Is(res[2].Err, ErrTooLarge) || res[1].Seq != 0 || res[2].Seq != 0 {
		t.Fatalf("skipped entries: %+v, %+v", res[1], res[2])
	}
	msgs, _ := s.Next(0, 10)
	if got := fmt.Sprint(seqs(msgs)); got != "[1 2]" || msgs[1].Topic != "d" {
		t.Fatalf("stored %s, topic %q", got, msgs[1].Topic)
	}
	// A batch larger than the bound drops its own oldest; later entries
	// see the drops of earlier ones.
	batch := make([]Entry, 6)
	for i := range batch {
		batch[i] = Entry{Topic: "t", Build: payload(30)}
	}
	res, err = s.AppendBatch(batch)
	if err != nil {
		t.Fatal(err)
	}
	if last := res[5]; last.Seq != 8 || last.TotalDropped != 4 {
		t.Fatalf("last of batch %+v", last)
	}
	msgs, _ = s.Next(0, 10)
	if got := fmt.Sprint(seqs(msgs)); got != "[5 6 7 8]" {
		t.Fatalf("kept %s", got)
	}
	if !strings.Contains(string(msgs[3].Payload), `"spool_dropped":3`) {
		t.Errorf("payload of 8: %s", msgs[3].Payload)
	}
}

func TestNextAndAck(t *testing.T) {
	s := newTest(t, nil)
	appendN(t, s, "devices/a/telemetry", 3, 40)
	appendN(t, s, "devices/a/telemetry/temp", 2, 40)

	all, err := s.Next(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(seqs(all)); got != "[1 2 3 4 5]" {
		t.Fatalf("Next(0) = %s", got)
	}
	if all[0].Topic != "devices/a/telemetry" || all[4].Topic != "devices/a/telemetry/temp" {
		t.Errorf("topics %q, %q", all[0].Topic, all[4].Topic)
	}
	if !strings.HasPrefix(string(all[2].Payload), `{"seq":3,`) {
		t.Errorf("payload of 3: %s", all[2].Payload)
	}
	page, _ := s.Next(2, 2)
	if got := fmt.Sprint(seqs(page)); got != "[3 4]" {
		t.Fatalf("Next(2, 2) = %s", got)
	}

	// Acknowledge out of order, twice, and a number never stored.
	if err := s.Ack(4, 2, 2, 99); err != nil {
		t.Fatal(err)
	}
	rest, _ := s.Next(0, 100)
	if got := fmt.Sprint(seqs(rest)); got != "[1 3 5]" {
		t.Fatalf("after ack: %s", got)
	}
	if st := stats(t, s); st.Pending != 3 || st.NextSeq != 6 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := s.Ack(); err != nil {
		t.Fatal(err)
	}
}

func TestDropOldest(t *testing.T) {
	t.Run("by count", func(t *testing.T) {
		s := newTest(t, &Options{MaxMessages: 10})
		res := appendN(t, s, "t", 25, 40)
		if last := res[len(res)-1]; last.Seq != 25 || last.Dropped != 1 || last.TotalDropped != 15 {
			t.Fatalf("last append %+v", last)
		}
		msgs, _ := s.Next(0, 100)
		if got := fmt.Sprint(seqs(msgs)); got != "[16 17 18 19 20 21 22 23 24 25]" {
			t.Fatalf("kept %s", got)
		}
		// The counter reaches the payload of the next message.
		if !strings.Contains(string(msgs[9].Payload), `"spool_dropped":14`) {
			t.Errorf("payload of 25: %s", msgs[9].Payload)
		}
		if st := stats(t, s); st.Dropped != 15 || st.Pending != 10 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("by bytes", func(t *testing.T) {
		const size = 1000
		s := newTest(t, &Options{MaxBytes: MinMaxBytes})
		appendN(t, s, "t", 200, size)
		st := stats(t, s)
		if st.Bytes > MinMaxBytes || st.Bytes < MinMaxBytes-2*(size+20) {
			t.Fatalf("bytes %d, bound %d", st.Bytes, MinMaxBytes)
		}
		if uint64(st.Pending)+st.Dropped != 200 {
			t.Fatalf("pending %d + dropped %d != 200", st.Pending, st.Dropped)
		}
		msgs, _ := s.Next(0, 1000)
		if msgs[len(msgs)-1].Seq != 200 || msgs[0].Seq != st.Dropped+1 {
			t.Fatalf("kept %d..%d with %d dropped", msgs[0].Seq, msgs[len(msgs)-1].Seq, st.Dropped)
		}
	})
	t.Run("dropped counter survives reopen", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "spool.db")
		s, err := Open(path, &Options{MaxMessages: 2})
		if err != nil {
			t.Fatal(err)
		}
		appendN(t, s, "t", 5, 40)
		s.Close()
		s = openTest(t, path, &Options{MaxMessages: 2})
		if st := stats(t, s); st.Dropped != 3 {
			t.Fatalf("dropped %d after reopen, want 3", st.Dropped)
		}
	})
	t.Run("file stays bounded", func(t *testing.T) {
		const bound = 256 << 10
		s := newTest(t, &Options{MaxBytes: bound})
		// Eight times the bound, acknowledging a third as a sender would.
		for i := range 8 * bound / 1000 {
			a, err := s.Append("t", payload(1000))
			if err != nil {
				t.Fatal(err)
			}
			if i%3 == 0 {
				if err := s.Ack(a.Seq - 1); err != nil {
					t.Fatal(err)
				}
			}
		}
		fi, err := os.Stat(s.Path())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("file %d bytes for a bound of %d", fi.Size(), bound)
		if fi.Size() > 8*bound {
			t.Errorf("file grew to %d bytes for a bound of %d", fi.Size(), bound)
		}
	})
}

func TestOpen(t *testing.T) {
	t.Run("second open of a file in use times out", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "spool.db")
		openTest(t, path, nil)
		_, err := Open(path, &Options{LockTimeout: 100 * time.Millisecond})
		if !errors.Is(err, ErrLocked) {
			t.Fatalf("err %v, want ErrLocked", err)
		}
	})
	t.Run("bound below the minimum refused", func(t *testing.T) {
		if _, err := Open(filepath.Join(t.TempDir(), "spool.db"), &Options{MaxBytes: 1000}); err == nil {
			t.Fatal("opened with a 1000-byte bound")
		}
	})
	t.Run("missing directory", func(t *testing.T) {
		if _, err := Open(filepath.Join(t.TempDir(), "no", "spool.db"), nil); err == nil {
			t.Fatal("opened in a missing directory")
		}
	})
	t.Run("closed spool refuses calls", func(t *testing.T) {
		s, err := Open(filepath.Join(t.TempDir(), "spool.db"), nil)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		if _, err := s.Append("t", payload(10)); !errors.Is(err, ErrClosed) {
			t.Errorf("append after close: %v", err)
		}
		if _, err := s.Next(0, 1); !errors.Is(err, ErrClosed) {
			t.Errorf("next after close: %v", err)
		}
		if err := s.Close(); !errors.Is(err, ErrClosed) {
			t.Errorf("second close: %v", err)
		}
	})
	t.Run("ReadStats of a stopped spool", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "spool.db")
		s, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		appendN(t, s, "t", 4, 40)
		s.Ack(2)
		s.Close()
		st, kept, err := ReadStats(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.NextSeq != 5 || fmt.Sprint(kept) != "[1 3 4]" {
			t.Fatalf("stats %+v, kept %v", st, kept)
		}
	})
}

func TestNotify(t *testing.T) {
	s := newTest(t, nil)
	appendN(t, s, "t", 3, 20)
	select {
	case <-s.Notify():
	default:
		t.Fatal("no notification after append")
	}
	select {
	case <-s.Notify():
		t.Fatal("notifications pile up")
	default:
	}
}

// TestSurvivesKill appends from a child process killed with SIGKILL at a
// random point: every number the child saw committed is in the file, the
// file is consistent, and numbering continues above the last one.
func TestSurvivesKill(t *testing.T) {
	if os.Getenv("SPOOL_KILL_CHILD") != "" {
		killChild(os.Getenv("SPOOL_KILL_CHILD"))
		return
	}
	if testing.Short() {
		t.Skip("spawns a child process")
	}
	path := filepath.Join(t.TempDir(), "spool.db")
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSurvivesKill$")
		cmd.Env = append(os.Environ(), "SPOOL_KILL_CHILD="+path)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var committed []uint64
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			n, err := strconv.ParseUint(sc.Text(), 10, 64)
			if err != nil {
				continue
			}
			committed = append(committed, n)
			if len(committed) == 200+round*37 {
				_ = cmd.Process.Kill()
				break
			}
		}
		_ = cmd.Wait()
		if len(committed) == 0 {
			t.Fatal("child committed nothing")
		}
		s, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Check(); err != nil {
			t.Fatal(err)
		}
		stored := map[uint64]bool{}
		msgs, _ := s.Next(0, 1_000_000)
		for _, m := range msgs {
			stored[m.Seq] = true
		}
		for _, n := range committed {
			if !stored[n] {
				t.Fatalf("round %d: committed message %d missing after kill", round, n)
			}
		}
		st := stats(t, s)
		if last := committed[len(committed)-1]; st.NextSeq <= last {
			t.Fatalf("round %d: next seq %d after committed %d", round, st.NextSeq, last)
		}
		s.Close()
	}
}

func killChild(path string) {
	s, err := Open(path, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	w := bufio.NewWriter(os.Stdout)
	for {
		a, err := s.Append("t", payload(200))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Fprintln(w, a.Seq)
		w.Flush()
	}
}

// BenchmarkAppend measures durable appends: one bbolt commit with fsync
// per message.
func BenchmarkAppend(b *testing.B) {
	for _, size := range []int{256, 4096} {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			s := newTest(b, nil)
			build := payload(size)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Append("devices/bench/telemetry", build); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}

// BenchmarkAppendBatch measures appends of 64 messages per transaction, as
// the local socket stores lines that arrive together.
func BenchmarkAppendBatch(b *testing.B) {
	s := newTest(b, nil)
	batch := make([]Entry, 64)
	for i := range batch {
		batch[i] = Entry{Topic: "devices/bench/telemetry", Build: payload(256)}
	}
	b.SetBytes(int64(256 * len(batch)))
	for b.Loop() {
		if _, err := s.AppendBatch(batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*len(batch))/b.Elapsed().Seconds(), "msgs/s")
}

// BenchmarkAppendAckCycle is the steady state of a connected agent: append
// a message, read it, acknowledge it.
func BenchmarkAppendAckCycle(b *testing.B) {
	s := newTest(b, nil)
	build := payload(256)
	for b.Loop() {
		a, err := s.Append("devices/bench/telemetry", build)
		if err != nil {
			b.Fatal(err)
		}
		msgs, err := s.Next(a.Seq-1, 1)
		if err != nil || len(msgs) != 1 {
			b.Fatal(err)
		}
		if err := s.Ack(a.Seq); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}
