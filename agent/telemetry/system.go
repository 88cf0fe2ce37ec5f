// Package telemetry gathers what the agent reports: system metrics read
// from /proc and /sys (the same on a Raspberry Pi and a server), the JSON
// output of a command run every interval (Exec), and JSON lines that local
// programs write into a unix socket (LocalServer), so a sensor program
// needs no TLS or MQTT code of its own.
package telemetry

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// System is one sample of system metrics. Fields the platform does not
// offer are nil and left out of the JSON.
type System struct {
	CPUTempC       *float64 `json:"cpu_temp_c,omitempty"`
	Load1          *float64 `json:"load1,omitempty"`
	Load5          *float64 `json:"load5,omitempty"`
	Load15         *float64 `json:"load15,omitempty"`
	MemTotalKB     *uint64  `json:"mem_total_kb,omitempty"`
	MemAvailableKB *uint64  `json:"mem_available_kb,omitempty"`
	UptimeS        *float64 `json:"uptime_s,omitempty"`
}

// Sources are the files System reads; tests point them elsewhere.
type Sources struct {
	Proc    string // default /proc
	Thermal string // default /sys/class/thermal
}

// DefaultSources reads the running system.
var DefaultSources = Sources{Proc: "/proc", Thermal: "/sys/class/thermal"}

// ReadSystem samples the system metrics.
func (s Sources) ReadSystem() System {
	var out System
	if data, err := os.ReadFile(filepath.Join(s.Proc, "loadavg")); err == nil {
		f := strings.Fields(string(data))
		if len(f) >= 3 {
			out.Load1, out.Load5, out.Load15 = parseFloat(f[0]), parseFloat(f[1]), parseFloat(f[2])
		}
	}
	if data, err := os.ReadFile(filepath.Join(s.Proc, "uptime")); err == nil {
		if f := strings.Fields(string(data)); len(f) >= 1 {
			out.UptimeS = parseFloat(f[0])
		}
	}
	if data, err := os.ReadFile(filepath.Join(s.Proc, "meminfo")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(data))
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			f := strings.Fields(v)
			if len(f) == 0 {
				continue
			}
			switch k {
			case "MemTotal":
				out.MemTotalKB = parseUint(f[0])
			case "MemAvailable":
				out.MemAvailableKB = parseUint(f[0])
			}
		}
	}
	out.CPUTempC = s.cpuTemp()
	return out
}

// cpuTemp reads the first thermal zone of type cpu (or the first zone at
// all, as on a Raspberry Pi's cpu-thermal / soc zone), in °C.
func (s Sources) cpuTemp() *float64 {
	zones, _ := filepath.Glob(filepath.Join(s.Thermal, "thermal_zone*"))
	var fallback *float64
	for _, z := range zones {
		data, err := os.ReadFile(filepath.Join(z, "temp"))
		if err != nil {
			continue
		}
		milli, err := strconv.ParseFloat(strings.TrimSpace(string(data)), 64)
		if err != nil {
			continue
		}
		c := milli / 1000
		typ, _ := os.ReadFile(filepath.Join(z, "type"))
		t := strings.ToLower(strings.TrimSpace(string(typ)))
		if strings.Contains(t, "cpu") || strings.Contains(t, "soc") || strings.Contains(t, "x86_pkg") {
			return &c
		}
		if fallback == nil {
			fallback = &c
		}
	}
	return fallback
}

func parseFloat(s string) *float64 {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return nil
	}
	return &v
}

func parseUint(s string) *uint64 {
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return nil
	}
	return &v
}
