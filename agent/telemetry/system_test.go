package telemetry_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetgate/fleetgate/agent/telemetry"
)

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestReadSystemFromRaspberryPiLikeFiles(t *testing.T) {
	dir := t.TempDir()
	src := telemetry.Sources{Proc: filepath.Join(dir, "proc"), Thermal: filepath.Join(dir, "thermal")}
	write(t, filepath.Join(src.Proc, "loadavg"), "0.52 0.58 0.59 1/189 1234\n")
	write(t, filepath.Join(src.Proc, "uptime"), "3600.25 7000.00\n")
	write(t, filepath.Join(src.Proc, "meminfo"), "MemTotal:        3884376 kB\nMemFree:          123 kB\nMemAvailable:    3012340 kB\n")
	write(t, filepath.Join(src.Thermal, "thermal_zone0", "type"), "cpu-thermal\n")
	write(t, filepath.Join(src.Thermal, "thermal_zone0", "temp"), "47236\n")

	s := src.ReadSystem()
	if s.Load1 == nil || *s.Load1 != 0.52 || *s.Load15 != 0.59 {
		t.Errorf("load %v", s.Load1)
	}
	if s.UptimeS == nil || *s.UptimeS != 3600.25 {
		t.Errorf("uptime %v", s.UptimeS)
	}
	if s.MemTotalKB == nil || *s.MemTotalKB != 3884376 || s.MemAvailableKB == nil || *s.MemAvailableKB != 3012340 {
		t.Errorf("mem %v %v", s.MemTotalKB, s.MemAvailableKB)
	}
	if s.CPUTempC == nil || *s.CPUTempC != 47.236 {
		t.Errorf("temp %v", s.CPUTempC)
	}
}

func TestReadSystemMissingSources(t *testing.T) {
	dir := t.TempDir()
	s := telemetry.Sources{Proc: filepath.Join(dir, "none"), Thermal: filepath.Join(dir, "none")}.ReadSystem()
	if s.CPUTempC != nil || s.Load1 != nil || s.MemTotalKB != nil {
		t.Errorf("values from missing files: %+v", s)
	}
}
