// Package procstat reads a local process's CPU time and memory from
// /proc (Linux), and raises this process's open-file limit.
package procstat

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// userHZ is the unit of utime and stime in /proc/PID/stat. Linux fixes it
// at 100 for user space on every architecture, whatever the kernel's HZ.
const userHZ = 100

// Sample is a process's resource use at one moment.
type Sample struct {
	Time time.Time
	// CPU is user + system time since the process started.
	CPU time.Duration
	// RSS is the resident set size; Peak its high-water mark.
	RSS  int64
	Peak int64
	// Threads is the number of OS threads.
	Threads int
}

// Read samples process pid.
func Read(pid int) (Sample, error) {
	s := Sample{Time: time.Now()}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, fmt.Errorf("process %d: %w", pid, err)
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after the last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return s, fmt.Errorf("process %d: unreadable /proc stat", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 18 {
		return s, fmt.Errorf("process %d: short /proc stat", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	th, err3 := strconv.Atoi(f[17])
	if err1 != nil || err2 != nil || err3 != nil {
		return s, fmt.Errorf("process %d: unreadable CPU times in /proc stat", pid)
	}
	s.CPU = time.Duration(ut+st) * time.Second / userHZ
	s.Threads = th

	status, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, fmt.Errorf("process %d: %w", pid, err)
	}
	defer status.Close()
	sc := bufio.NewScanner(status)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			s.RSS = kB(line)
		case strings.HasPrefix(line, "VmHWM:"):
			s.Peak = kB(line)
		}
	}
	return s, sc.Err()
}

func kB(line string) int64 {
	f := strings.Fields(line)
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.ParseInt(f[1], 10, 64)
	return n * 1024
}

// Self samples this process.
func Self() (Sample, error) { return Read(os.Getpid()) }

// Alive reports whether process pid exists.
func Alive(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

// OpenFiles counts the open file descriptors of process pid.
func OpenFiles(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, err
	}
	return len(ents), nil
}

// FileLimit returns the soft open-file limit of process pid, from
// /proc/PID/limits.
func FileLimit(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "Max open files") {
			f := strings.Fields(strings.TrimPrefix(line, "Max open files"))
			if len(f) > 0 {
				if f[0] == "unlimited" {
					return 1 << 30, nil
				}
				return strconv.Atoi(f[0])
			}
		}
	}
	return 0, fmt.Errorf("process %d: no open-file limit in /proc limits", pid)
}

// RaiseFileLimit raises this process's open-file limit to want, or as far
// as it may, and returns the new soft limit. The hard limit is raised too
// when want is above it and the process may (CAP_SYS_RESOURCE, and no
// container above it holding it lower); otherwise the soft limit goes up
// to the hard one. Setting it explicitly (rather than relying on the Go
// runtime's own raise) also makes child processes, such as a spawned
// gateway or Mosquitto, inherit the raised limit.
func RaiseFileLimit(want uint64) (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("read open-file limit: %w", err)
	}
	if want > lim.Max {
		up := syscall.Rlimit{Cur: want, Max: want}
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up) == nil {
			return want, nil
		}
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return 0, fmt.Errorf("raise open-file limit to %d: %w", lim.Max, err)
		}
	} else {
		// Set it anyway, so children inherit it (the Go runtime restores
		// the original soft limit in children unless Setrlimit was called).
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	return lim.Cur, nil
}

// Usage is what a process consumed between two samples.
type Usage struct {
	CPU      time.Duration
	Elapsed  time.Duration
	RSSDelta int64
}

// Since is the usage from a to b.
func Since(a, b Sample) Usage {
	return Usage{CPU: b.CPU - a.CPU, Elapsed: b.Time.Sub(a.Time), RSSDelta: b.RSS - a.RSS}
}

// Cores is the average number of cores busy.
func (u Usage) Cores() float64 {
	if u.Elapsed <= 0 {
		return 0
	}
	return u.CPU.Seconds() / u.Elapsed.Seconds()
}
