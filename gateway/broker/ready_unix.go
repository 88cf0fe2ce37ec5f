//go:build unix

package broker

import "syscall"

// readReady reads what is already waiting on the socket without blocking;
// ok is false when nothing is (or on any error: the caller's blocking read
// reports it).
func readReady(raw syscall.RawConn, p []byte) (n int, ok bool) {
	if raw == nil || len(p) == 0 {
		return 0, false
	}
	var rerr error
	err := raw.Read(func(fd uintptr) bool {
		n, rerr = syscall.Read(int(fd), p)
		return true // one attempt: never wait here
	})
	if err != nil || rerr != nil || n <= 0 {
		return 0, false
	}
	return n, true
}
