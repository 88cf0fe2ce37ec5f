package fleet

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Latency is a latency distribution in milliseconds.
type Latency struct {
	Name  string  `json:"name"`
	Count uint64  `json:"count"`
	P50   float64 `json:"p50_ms"`
	P90   float64 `json:"p90_ms"`
	P99   float64 `json:"p99_ms"`
	Max   float64 `json:"max_ms"`
	Mean  float64 `json:"mean_ms"`
}

// Value is a named number with its unit.
type Value struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit,omitempty"`
}

// Check is a pass/fail verdict of a scenario (a revoked device that
// stayed connected fails the drill).
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// ProcUsage is what a local process (the gateway) consumed during a run.
type ProcUsage struct {
	PID        int     `json:"pid"`
	CPUSeconds float64 `json:"cpu_s"`
	CPUPercent float64 `json:"cpu_percent"`
	RSSStart   int64   `json:"rss_start_bytes"`
	RSSEnd     int64   `json:"rss_end_bytes"`
	RSSPeak    int64   `json:"rss_peak_bytes"`
}

// Report is the result of a scenario: printed as a table or JSON.
type Report struct {
	Scenario  string            `json:"scenario"`
	Date      time.Time         `json:"date"`
	Devices   int               `json:"devices"`
	Elapsed   float64           `json:"elapsed_s"`
	Params    map[string]string `json:"params,omitempty"`
	Latencies []Latency         `json:"latencies,omitempty"`
	Rates     []Value           `json:"rates,omitempty"`
	Counts    []Value           `json:"counts,omitempty"`
	Errors    map[string]int64  `json:"errors"`
	Gateway   *ProcUsage        `json:"gateway,omitempty"`
	Checks    []Check           `json:"checks,omitempty"`
	Notes     []string          `json:"notes,omitempty"`
}

// OK reports whether every check passed.
func (r *Report) OK() bool {
	for _, c := range r.Checks {
		if !c.OK {
			return false
		}
	}
	return true
}

// AddCheck records a verdict.
func (r *Report) AddCheck(name string, ok bool, format string, args ...any) {
	r.Checks = append(r.Checks, Check{Name: name, OK: ok, Detail: fmt.Sprintf(format, args...)})
}

// AddRate records a rate.
func (r *Report) AddRate(name string, v float64, unit string) {
	r.Rates = append(r.Rates, Value{Name: name, Value: round(v, 2), Unit: unit})
}

// AddCount records a count.
func (r *Report) AddCount(name string, v float64, unit string) {
	r.Counts = append(r.Counts, Value{Name: name, Value: round(v, 3), Unit: unit})
}

func round(v float64, digits int) float64 {
	p := 1.0
	for range digits {
		p *= 10
	}
	if v < 0 {
		return -float64(int64(-v*p+0.5)) / p
	}
	return float64(int64(v*p+0.5)) / p
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report for a human.
func (r *Report) WriteTable(w io.Writer) error {
	fmt.Fprintf(w, "\nfirmware-sim %s: %d devices, %.1fs (%s)\n", r.Scenario, r.Devices, r.Elapsed, r.Date.Format(time.RFC3339))
	if len(r.Params) > 0 {
		var ps []string
		for _, k := range slices.Sorted(maps.Keys(r.Params)) {
			ps = append(ps, k+"="+r.Params[k])
		}
		fmt.Fprintf(w, "  %s\n", strings.Join(ps, " "))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	if len(r.Latencies) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(tw, "latency (ms)\tcount\tp50\tp90\tp99\tmax\t")
		for _, l := range r.Latencies {
			fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t\n", l.Name, l.Count, l.P50, l.P90, l.P99, l.Max)
		}
		tw.Flush()
	}
	if len(r.Rates)+len(r.Counts) > 0 {
		fmt.Fprintln(w)
		for _, v := range append(slices.Clone(r.Rates), r.Counts...) {
			fmt.Fprintf(tw, "%s\t%s\t%s\t\n", v.Name, FormatNumber(v.Value), v.Unit)
		}
		tw.Flush()
	}
	fmt.Fprintln(w)
	if len(r.Errors) == 0 {
		fmt.Fprintln(w, "errors: none")
	} else {
		fmt.Fprintln(w, "errors by reason:")
		for _, k := range slices.Sorted(maps.Keys(r.Errors)) {
			fmt.Fprintf(tw, "  %s\t%d\t\n", k, r.Errors[k])
		}
		tw.Flush()
	}
	if g := r.Gateway; g != nil {
		fmt.Fprintf(w, "gateway pid %d: CPU %.2fs (%.0f%% of one core), RSS %s → %s (peak %s)\n",
			g.PID, g.CPUSeconds, g.CPUPercent, FormatBytes(g.RSSStart), FormatBytes(g.RSSEnd), FormatBytes(g.RSSPeak))
	}
	for _, c := range r.Checks {
		mark := "PASS"
		if !c.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "%s  %s: %s\n", mark, c.Name, c.Detail)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	return nil
}

// FormatNumber prints a number with thousands separators, and up to two
// decimals below 1000.
func FormatNumber(v float64) string {
	s := strconv.FormatFloat(math.Abs(v), 'f', 2, 64)
	whole, frac, _ := strings.Cut(s, ".")
	var b strings.Builder
	if v < 0 {
		b.WriteByte('-')
	}
	for i, ch := range whole {
		if i > 0 && (len(whole)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(ch)
	}
	if frac = strings.TrimRight(frac, "0"); frac != "" && len(whole) <= 3 {
		b.WriteString("." + frac)
	}
	return b.String()
}

// FormatBytes prints a byte count in KiB, MiB or GiB.
func FormatBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	default:
		return fmt.Sprintf("%d B", n)
	}
}
