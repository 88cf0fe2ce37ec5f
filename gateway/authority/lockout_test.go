package authority

import (
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"
)

func TestLockouts(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	const window = 15 * time.Minute

	t.Run("five failures within the window lock the ID for the window", func(t *testing.T) {
		l := newLockouts(5, window, 100)
		for i := range 4 {
			if _, started := l.fail("dev", t0.Add(time.Duration(i)*time.Minute)); started {
				t.Fatalf("lockout after %d failures", i+1)
			}
			if err := l.check("dev", t0.Add(time.Duration(i)*time.Minute)); err != nil {
				t.Fatalf("locked after %d failures: %v", i+1, err)
			}
		}
		at := t0.Add(10 * time.Minute)
		until, started := l.fail("dev", at)
		if !started || !until.Equal(at.Add(window)) {
			t.Fatalf("5th failure: started=%v until=%v", started, until)
		}
		err := l.check("dev", at.Add(time.Minute))
		var le *LockoutError
		if !errors.Is(err, ErrLockedOut) || !errors.As(err, &le) || le.RetryAfter() != window-time.Minute {
			t.Fatalf("check during the lockout: %v", err)
		}
		if err := l.check("other", at); err != nil {
			t.Fatalf("another ID locked: %v", err)
		}
		// Failures during the lockout neither extend nor restart it.
		if _, started := l.fail("dev", at.Add(2*time.Minute)); started {
			t.Fatal("a failure during the lockout started another")
		}
		if err := l.check("dev", until); err != nil {
			t.Fatalf("still locked when the cool-down ended: %v", err)
		}
	})

	t.Run("failures spread wider than the window never lock", func(t *testing.T) {
		l := newLockouts(5, window, 100)
		for i := range 20 {
			if _, started := l.fail("dev", t0.Add(time.Duration(i)*4*time.Minute)); started {
				t.Fatalf("locked out by failure %d, 4 minutes apart", i+1)
			}
		}
	})

	t.Run("success and a new token forget the failures", func(t *testing.T) {
		l := newLockouts(2, window, 100)
		l.fail("dev", t0)
		l.clear("dev")
		if _, started := l.fail("dev", t0); started {
			t.Fatal("a cleared failure still counted")
		}
		l.fail("dev", t0)
		l.clear("dev")
		if err := l.check("dev", t0); err != nil {
			t.Fatalf("lockout survived clear: %v", err)
		}
	})

	t.Run("bounded, and live lockouts are never evicted", func(t *testing.T) {
		const max = 50
		l := newLockouts(1, window, max)
		l.fail("victim", t0)
		for i := range 10_000 {
			l.fail(fmt.Sprintf("random-%d", i), t0.Add(time.Duration(i)*time.Millisecond))
			if len(l.m) > max {
				t.Fatalf("%d IDs tracked, bound %d", len(l.m), max)
			}
		}
		if err := l.check("victim", t0.Add(time.Minute)); !errors.Is(err, ErrLockedOut) {
			t.Fatalf("a flood of other IDs lifted the lockout: %v", err)
		}
		// Once windows and lockouts are over, the entries are swept.
		l.fail("late", t0.Add(2*window))
		if len(l.m) != 1 {
			t.Fatalf("%d IDs tracked after every window passed, want 1", len(l.m))
		}
	})

	t.Run("off", func(t *testing.T) {
		l := newLockouts(-1, window, 100)
		for range 100 {
			if _, started := l.fail("dev", t0); started {
				t.Fatal("lockout while off")
			}
		}
		if err := l.check("dev", t0); err != nil {
			t.Fatal(err)
		}
	})
}

func TestUnavailable(t *testing.T) {
	for _, tc := range []struct {
		err    error
		reason string
	}{
		{fmt.Errorf("enroll: write /data/registry.db: %w", syscall.ENOSPC), "no space left on device"},
		{fmt.Errorf("enroll: %w", syscall.EROFS), "read-only file system"},
		{fmt.Errorf("enroll: %w", syscall.EIO), "input/output error"},
		{errors.New("something else"), ""},
	} {
		reason, ok := Unavailable(tc.err)
		if reason != tc.reason || ok != (tc.reason != "") {
			t.Errorf("Unavailable(%v) = %q, %v; want %q", tc.err, reason, ok, tc.reason)
		}
	}
}

func TestShortDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		15 * time.Minute: "15m", time.Hour: "1h", 90 * time.Minute: "1h30m", 30 * time.Second: "30s", 90 * time.Second: "1m30s",
	} {
		if got := shortDuration(d); got != want {
			t.Errorf("shortDuration(%v) = %q, want %q", d, got, want)
		}
	}
}
