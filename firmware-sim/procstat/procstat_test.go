package procstat

import (
	"os"
	"syscall"
	"testing"
	"time"
)

func TestReadSelf(t *testing.T) {
	a, err := Self()
	if err != nil {
		t.Fatal(err)
	}
	// Burn some CPU so user time moves past one tick.
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	b, err := Self()
	if err != nil {
		t.Fatal(err)
	}
	if b.RSS <= 0 || b.Peak < b.RSS || b.Threads < 1 {
		t.Fatalf("sample %+v", b)
	}
	if u := Since(a, b); u.CPU < 0 || u.Elapsed <= 0 {
		t.Fatalf("usage %+v", u)
	}
	if !Alive(os.Getpid()) || Alive(1<<30) {
		t.Fatal("Alive is wrong")
	}
	if _, err := Read(1 << 30); err == nil {
		t.Fatal("read of a missing process succeeded")
	}
}

func TestFileLimits(t *testing.T) {
	lim, err := RaiseFileLimit(0)
	if err != nil {
		t.Fatal(err)
	}
	soft, err := FileLimit(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if uint64(soft) != lim {
		t.Fatalf("soft limit %d after raising to %d", soft, lim)
	}
	if n, err := OpenFiles(os.Getpid()); err != nil || n < 3 {
		t.Fatalf("open files %d, %v", n, err)
	}
	// Asking for more than the hard limit raises it where the process
	// may and otherwise keeps it: no error either way.
	var hard syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &hard); err != nil {
		t.Fatal(err)
	}
	want := hard.Max + 1000
	got, err := RaiseFileLimit(want)
	if err != nil {
		t.Fatal(err)
	}
	if got != want && got != hard.Max {
		t.Fatalf("limit %d after asking for %d (hard limit was %d)", got, want, hard.Max)
	}
	if soft, err := FileLimit(os.Getpid()); err != nil || uint64(soft) != got {
		t.Fatalf("soft limit %d (%v), want %d", soft, err, got)
	}
}
