package authority

import (
	"context"
	"sync"
	"time"
)

// seenTracker batches last-seen times in memory so the MQTT hot path never
// writes to the registry; FlushSeen commits them in one transaction.
type seenTracker struct {
	mu   sync.Mutex
	seen map[string]time.Time
}

// Seen records that a device connected or disconnected at t.
func (a *Authority) Seen(deviceID string, t time.Time) {
	a.seen.mu.Lock()
	if a.seen.seen == nil {
		a.seen.seen = make(map[string]time.Time)
	}
	if t.After(a.seen.seen[deviceID]) {
		a.seen.seen[deviceID] = t
	}
	a.seen.mu.Unlock()
}

// FlushSeen writes the batched last-seen times to the registry.
func (a *Authority) FlushSeen(ctx context.Context) error {
	a.seen.mu.Lock()
	batch := a.seen.seen
	a.seen.seen = nil
	a.seen.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	if err := a.store.TouchLastSeen(ctx, batch); err != nil {
		// Put them back so the next flush retries; newer times win.
		a.seen.mu.Lock()
		for id, t := range batch {
			if a.seen.seen == nil {
				a.seen.seen = make(map[string]time.Time)
			}
			if t.After(a.seen.seen[id]) {
				a.seen.seen[id] = t
			}
		}
		a.seen.mu.Unlock()
		return err
	}
	return nil
}
