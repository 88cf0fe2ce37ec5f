package boltdb

import (
	"context"
	"fmt"
	"sync"

	bolt "go.etcd.io/bbolt"
)

// groupCommit shares one durable commit among concurrent writers. The first
// writer to arrive leads: it commits every write queued so far in one bbolt
// transaction (one fsync) while later writers queue for the next one. Unlike
// bbolt's Batch there is no delay: a lone writer commits at once, and under
// load a commit takes whatever queued up during the previous fsync.
//
// Writes must be idempotent functions of the transaction (they are re-run
// when another write in the same group fails), with no side effects outside
// it before the commit.
type groupCommit struct {
	mu      sync.Mutex
	pending []groupCall
	leading bool
}

type groupCall struct {
	fn  func(*bolt.Tx) error
	err chan error
}

// grouped runs fn in a shared write transaction; its result is exactly what
// db.Update(fn) would have returned.
func (s *Store) grouped(ctx context.Context, op string, fn func(t *txn) error) error {
	if err := s.ready(ctx); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	c := groupCall{fn: func(tx *bolt.Tx) error { return fn(newTxn(tx)) }, err: make(chan error, 1)}
	g := &s.group
	g.mu.Lock()
	g.pending = append(g.pending, c)
	lead := !g.leading
	g.leading = true
	g.mu.Unlock()
	if lead {
		s.lead()
	}
	return s.wrap(op, <-c.err)
}

// lead commits one group, then hands the lead to a new goroutine if more
// writes queued meanwhile, so no caller waits on other callers' commits
// after its own.
func (s *Store) lead() {
	g := &s.group
	g.mu.Lock()
	calls := g.pending
	g.pending = nil
	g.mu.Unlock()
	s.commitGroup(calls)
	g.mu.Lock()
	if len(g.pending) == 0 {
		g.leading = false
		g.mu.Unlock()
		return
	}
	g.mu.Unlock()
	go s.lead()
}

// commitGroup commits calls in one transaction. A call that fails is taken
// out and run alone (its error is its own result); the rest are retried.
func (s *Store) commitGroup(calls []groupCall) {
	for len(calls) > 0 {
		failed := -1
		err := s.db.Update(func(tx *bolt.Tx) error {
			for i, c := range calls {
				if err := c.fn(tx); err != nil {
					failed = i
					return err
				}
			}
			return nil
		})
		if failed < 0 {
			for _, c := range calls {
				c.err <- err
			}
			return
		}
		c := calls[failed]
		calls = append(calls[:failed:failed], calls[failed+1:]...)
		if len(calls) == 0 && err != nil {
			c.err <- err // it was alone: its error is final
			return
		}
		c.err <- s.db.Update(c.fn)
	}
}
