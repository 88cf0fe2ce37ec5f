package bench

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// Colors of the chart's series.
const (
	colorOurs   = "#2b6cb0"
	colorTheirs = "#dd6b20"
	colorFloor  = "#718096"
)

// bar is one bar of a panel.
type bar struct {
	label string
	value float64
	color string
}

// panel is one small bar chart with its own scale.
type panel struct {
	title string
	unit  string
	bars  []bar
}

// Chart renders the headline numbers as an SVG of small bar charts, one
// per measure (each with its own scale): connects/s and msgs/s for both
// brokers, and fleetgate's CPU per connect against the handshake floor.
func Chart(r *Results) string {
	ours, theirs := r.broker("fleetgate"), r.broker("mosquitto")
	var panels []panel
	add := func(title, unit string, a, b float64, withTheirs bool) {
		p := panel{title: title, unit: unit, bars: []bar{{"fleetgate", a, colorOurs}}}
		if withTheirs {
			p.bars = append(p.bars, bar{"mosquitto", b, colorTheirs})
		}
		panels = append(panels, p)
	}
	if ours != nil {
		t := theirs
		if t == nil {
			t = &BrokerResult{}
		}
		add("mTLS connects/s", "connects/s", ours.Connect.PerSecond, t.Connect.PerSecond, theirs != nil)
		if ours.QoS0 != nil {
			v := 0.0
			if t.QoS0 != nil {
				v = t.QoS0.PerSecond
			}
			add("QoS 0 msgs/s delivered", "msgs/s", ours.QoS0.PerSecond, v, theirs != nil)
		}
		if ours.QoS1 != nil {
			v := 0.0
			if t.QoS1 != nil {
				v = t.QoS1.PerSecond
			}
			add("QoS 1 msgs/s delivered", "msgs/s", ours.QoS1.PerSecond, v, theirs != nil)
		}
		cpu := panel{title: "server CPU per full connect", unit: "µs", bars: []bar{{"fleetgate", float64(ours.Connect.ServerCPU), colorOurs}}}
		if theirs != nil {
			cpu.bars = append(cpu.bars, bar{"mosquitto", float64(theirs.Connect.ServerCPU), colorTheirs})
		}
		cpu.bars = append(cpu.bars, bar{"TLS floor", float64(r.Floors.HandshakeCPU), colorFloor})
		panels = append(panels, cpu)
		add("RSS per idle session", "KiB", ours.Idle.steady()/1024, t.Idle.steady()/1024, theirs != nil)
	}
	return renderSVG(chartTitle(r), panels)
}

func chartTitle(r *Results) string {
	kind := ""
	if r.Smoke {
		kind = " (smoke)"
	}
	return fmt.Sprintf("fleetgate vs Mosquitto%s — %d cores, %d sessions, %d publishers — %s",
		kind, r.Machine.Cores, r.Params.Sessions, r.Params.Publishers, r.Date.Format("2006-01-02"))
}

const (
	panelW  = 230
	panelH  = 260
	marginT = 56
	plotTop = 56 // inside a panel: room for the title, unit and value label
	plotBot = 40 // room for the labels
)

func renderSVG(title string, panels []panel) string {
	w := max(len(panels), 1)*panelW + 20
	h := panelH + marginT + 30
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif">`+"\n", w, h, w, h)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#ffffff"/>`+"\n", w, h)
	fmt.Fprintf(&b, `<text x="%d" y="28" font-size="16" font-weight="bold" text-anchor="middle">%s</text>`+"\n", w/2, html.EscapeString(title))
	for i, p := range panels {
		x0 := 10 + i*panelW
		y0 := marginT
		fmt.Fprintf(&b, `<g transform="translate(%d,%d)">`+"\n", x0, y0)
		fmt.Fprintf(&b, `<text x="%d" y="16" font-size="13" font-weight="bold" text-anchor="middle">%s</text>`+"\n", panelW/2, html.EscapeString(p.title))
		fmt.Fprintf(&b, `<text x="%d" y="32" font-size="11" fill="#4a5568" text-anchor="middle">%s</text>`+"\n", panelW/2, html.EscapeString(p.unit))
		top := 0.0
		for _, br := range p.bars {
			top = math.Max(top, br.value)
		}
		if top <= 0 {
			top = 1
		}
		plotH := float64(panelH - plotTop - plotBot)
		base := float64(panelH - plotBot)
		fmt.Fprintf(&b, `<line x1="10" y1="%.0f" x2="%d" y2="%.0f" stroke="#a0aec0"/>`+"\n", base, panelW-10, base)
		n := len(p.bars)
		slot := float64(panelW-20) / float64(n)
		bw := math.Min(slot*0.7, 60)
		for j, br := range p.bars {
			hgt := plotH * br.value / top
			x := 10 + slot*float64(j) + (slot-bw)/2
			y := base - hgt
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", x, y, bw, hgt, br.color)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle">%s</text>`+"\n", x+bw/2, y-4, html.EscapeString(short(br.value)))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle">%s</text>`+"\n", x+bw/2, base+16, html.EscapeString(br.label))
		}
		b.WriteString("</g>\n")
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// short prints a value compactly: 12.3k, 1.2M, 45.6, 0.42.
func short(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.1fM", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.0fk", v/1e3)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	case v >= 10:
		return fmt.Sprintf("%.0f", v)
	default:
		return fmt.Sprintf("%.2g", v)
	}
}
