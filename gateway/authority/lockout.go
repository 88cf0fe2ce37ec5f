package authority

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrLockedOut: a device ID saw too many bad enrollment tokens and is
// refused for a while, whatever token comes next. Errors that wrap it are
// *LockoutError.
var ErrLockedOut = errors.New("too many failed enrollment attempts")

// LockoutError refuses an enrollment during a lockout.
type LockoutError struct {
	DeviceID string
	Until    time.Time
	// Wait is the time left when the error was made.
	Wait time.Duration
}

func (e *LockoutError) Error() string {
	return fmt.Sprintf("device %s: %v; try again in %v", e.DeviceID, ErrLockedOut, e.Wait.Round(time.Second))
}

// Is makes errors.Is(err, ErrLockedOut) true.
func (e *LockoutError) Is(target error) bool { return target == ErrLockedOut }

// RetryAfter is how long the client should wait.
func (e *LockoutError) RetryAfter() time.Duration { return e.Wait }

// Lockout defaults: five bad tokens for one device ID within 15 minutes
// lock that ID out for 15 minutes. A token carries 192 random bits, so the
// lockout does not protect the token from guessing; it keeps a scanner from
// costing registry reads for ever and makes the attempt visible in the
// audit log. It is also a way to hold a device's enrollment up for a
// while, for someone who knows its ID: the cool-down is short, the agent
// retries after it on its own, and an operator who mints a new token for
// the device lifts the lockout at once.
const (
	DefaultLockoutFailures = 5
	DefaultLockoutWindow   = 15 * time.Minute
	// DefaultMaxTracked bounds the device IDs with failures remembered.
	DefaultMaxTracked = 100_000
)

// lockouts remembers failed enrollments per device ID, in memory. The map
// is bounded: entries whose window and lockout have passed are swept out,
// and when it is full of live entries, new IDs are not tracked (live
// lockouts are never evicted to make room, so a flood of random IDs cannot
// lift one).
type lockouts struct {
	failures int
	window   time.Duration
	max      int

	mu      sync.Mutex
	m       map[string]*lockEntry
	sweptAt time.Time
}

type lockEntry struct {
	count int
	first time.Time // of the current window
	until time.Time // end of the lockout; zero when not locked
}

func newLockouts(failures int, window time.Duration, max int) *lockouts {
	return &lockouts{failures: failures, window: window, max: max, m: make(map[string]*lockEntry)}
}

func (l *lockouts) enabled() bool { return l != nil && l.failures > 0 }

// check returns a LockoutError while id is locked out.
func (l *lockouts) check(id string, now time.Time) error {
	if !l.enabled() {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.m[id]
	if e == nil || !now.Before(e.until) {
		return nil
	}
	return &LockoutError{DeviceID: id, Until: e.until, Wait: e.until.Sub(now)}
}

// fail records a bad token for id and reports whether it started a lockout.
func (l *lockouts) fail(id string, now time.Time) (until time.Time, started bool) {
	if !l.enabled() {
		return time.Time{}, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.m[id]
	if e == nil {
		if (len(l.m) >= l.max && now.Sub(l.sweptAt) >= time.Second) || now.Sub(l.sweptAt) >= time.Minute {
			l.sweep(now)
		}
		if len(l.m) >= l.max {
			return time.Time{}, false
		}
		e = &lockEntry{}
		l.m[id] = e
	}
	if now.Before(e.until) {
		return e.until, false // a racing attempt of the locked-out ID
	}
	if e.count == 0 || now.Sub(e.first) >= l.window {
		e.count, e.first = 0, now
	}
	e.count++
	if e.count < l.failures {
		return time.Time{}, false
	}
	e.count = 0
	e.until = now.Add(l.window)
	return e.until, true
}

// clear forgets id (a successful enrollment, or a new token minted).
func (l *lockouts) clear(id string) {
	if !l.enabled() {
		return
	}
	l.mu.Lock()
	delete(l.m, id)
	l.mu.Unlock()
}

// sweep forgets entries whose window and lockout are over; callers hold mu.
func (l *lockouts) sweep(now time.Time) {
	l.sweptAt = now
	for id, e := range l.m {
		if !now.Before(e.until) && now.Sub(e.first) >= l.window {
			delete(l.m, id)
		}
	}
}
