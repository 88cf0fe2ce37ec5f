package procstat

import (
	"os"
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
	lim, err := RaiseFileLimit()
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
}
