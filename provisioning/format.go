package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"
)

// newTable returns a writer that aligns tab-separated columns.
func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// plural returns "1 certificate" or "3 certificates".
func plural(n int, noun string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, noun)
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// shortDuration renders d, rounded, in its largest sensible unit: 45s,
// 12m, 5h, 29d, 2y.
func shortDuration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	const (
		day  = 24 * time.Hour
		year = 365 * day
	)
	round := func(unit time.Duration) int64 { return int64((d + unit/2) / unit) }
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", round(time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", round(time.Minute))
	case d < 2*day:
		return fmt.Sprintf("%dh", round(time.Hour))
	case d < 2*year:
		return fmt.Sprintf("%dd", round(day))
	default:
		return fmt.Sprintf("%dy", round(year))
	}
}

// ago renders a past moment relative to now ("5m ago"); zero is "never".
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "in " + shortDuration(d)
	case d < 10*time.Second:
		return "just now"
	default:
		return shortDuration(d) + " ago"
	}
}

// expires renders an expiry relative to now ("in 29d", "expired 2d ago").
func expires(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	if d := t.Sub(now); d > 0 {
		return "in " + shortDuration(d)
	}
	return "expired " + shortDuration(now.Sub(t)) + " ago"
}

// timestamp renders an absolute time in UTC, "-" when zero.
func timestamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
