package limit

import (
	"math"
	"sync/atomic"
	"time"
)

// Pacer is a token bucket for one client's per-message path, without a
// lock: the generic cell rate algorithm keeps one atomic "theoretical
// arrival time" (TAT). Each event moves the TAT one interval past
// max(TAT, now); the event conforms while the TAT stays within Burst
// intervals of now. golang.org/x/time/rate's Limiter does the same job
// behind a mutex at several times the cost.
type Pacer struct {
	tat       atomic.Int64 // nanoseconds since epoch
	interval  int64
	tolerance int64 // Burst × interval
}

// epoch anchors Pacer times on the monotonic clock.
var epoch = time.Now()

// NewPacer returns a full bucket for r, or nil when r is off or zero.
func NewPacer(r Rate) *Pacer {
	if r.IsOff() || r.IsZero() {
		return nil
	}
	interval := int64(math.Max(1, float64(time.Second)/r.PerSecond))
	return &Pacer{interval: interval, tolerance: int64(max(1, r.Burst)) * interval}
}

// Take takes one token and returns how long the caller must wait for it:
// zero when the bucket had one. The token is taken in either case, so a
// caller that waits before acting stays within the rate, and callers that
// do not wait run up a debt that later calls wait out.
func (p *Pacer) Take() time.Duration {
	now := int64(time.Since(epoch))
	for {
		old := p.tat.Load()
		next := max(old, now) + p.interval
		if p.tat.CompareAndSwap(old, next) {
			return time.Duration(max(0, next-now-p.tolerance))
		}
	}
}
