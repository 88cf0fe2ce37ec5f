package fleet

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// subBits sets the histogram precision: 2^subBits buckets per power of
// two, so a recorded value is off by at most 1/64 (1.6 %).
const subBits = 6

const (
	subCount    = 1 << subBits
	bucketCount = (64-subBits)*subCount + subCount
)

// Histogram records durations in log-linear buckets with bounded memory
// (about 30 KiB) and lock-free updates, so hours of soak or millions of
// messages cost the same.
type Histogram struct {
	counts [bucketCount]atomic.Uint64
	n      atomic.Uint64
	sum    atomic.Int64
	max    atomic.Int64
}

func bucketOf(v int64) int {
	if v < 0 {
		v = 0
	}
	u := uint64(v)
	if u < 2*subCount {
		return int(u)
	}
	shift := bits.Len64(u) - (subBits + 1)
	return shift*subCount + int(u>>shift)
}

// bucketValue is a representative value (the middle) of bucket i.
func bucketValue(i int) int64 {
	if i < 2*subCount {
		return int64(i)
	}
	shift := i/subCount - 1
	low := uint64(i%subCount+subCount) << shift
	return int64(low + (uint64(1)<<shift)/2)
}

// Observe records one duration.
func (h *Histogram) Observe(d time.Duration) {
	v := int64(d)
	h.counts[bucketOf(v)].Add(1)
	h.n.Add(1)
	h.sum.Add(v)
	for {
		m := h.max.Load()
		if v <= m || h.max.CompareAndSwap(m, v) {
			break
		}
	}
}

// Snapshot is a point-in-time copy of a histogram; snapshots subtract to
// give the distribution of a time window.
type Snapshot struct {
	counts [bucketCount]uint64
	n      uint64
	sum    int64
	max    int64
}

// Snapshot copies the histogram.
func (h *Histogram) Snapshot() *Snapshot {
	s := &Snapshot{n: h.n.Load(), sum: h.sum.Load(), max: h.max.Load()}
	for i := range h.counts {
		s.counts[i] = h.counts[i].Load()
	}
	return s
}

// Sub returns the observations recorded between prev and s. Its max is the
// largest bucket seen in the window.
func (s *Snapshot) Sub(prev *Snapshot) *Snapshot {
	out := &Snapshot{n: s.n - prev.n, sum: s.sum - prev.sum}
	for i := range s.counts {
		out.counts[i] = s.counts[i] - prev.counts[i]
		if out.counts[i] > 0 {
			out.max = bucketValue(i)
		}
	}
	return out
}

// Count is the number of observations.
func (s *Snapshot) Count() uint64 { return s.n }

// Mean is the average observation.
func (s *Snapshot) Mean() time.Duration {
	if s.n == 0 {
		return 0
	}
	return time.Duration(s.sum / int64(s.n))
}

// Max is the largest observation.
func (s *Snapshot) Max() time.Duration { return time.Duration(s.max) }

// Quantile returns the q-quantile (0 < q <= 1).
func (s *Snapshot) Quantile(q float64) time.Duration {
	if s.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(s.n)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range s.counts {
		seen += c
		if seen >= rank {
			v := bucketValue(i)
			if v > s.max && s.max > 0 {
				v = s.max
			}
			return time.Duration(v)
		}
	}
	return time.Duration(s.max)
}

// Summary is the distribution as a report shows it.
func (s *Snapshot) Summary(name string) Latency {
	ms := func(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }
	return Latency{
		Name:  name,
		Count: s.n,
		P50:   ms(s.Quantile(0.50)),
		P90:   ms(s.Quantile(0.90)),
		P99:   ms(s.Quantile(0.99)),
		Max:   ms(s.Max()),
		Mean:  ms(s.Mean()),
	}
}
