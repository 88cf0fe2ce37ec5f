//go:build !unix

package broker

import "syscall"

// readReady is unavailable here: every read flushes the batch first.
func readReady(syscall.RawConn, []byte) (int, bool) { return 0, false }
