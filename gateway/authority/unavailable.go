package authority

import (
	"context"
	"errors"
	"syscall"

	"github.com/fleetgate/fleetgate/pkg/registry"
)

// Unavailable reports whether err means the registry cannot serve for now
// (storage full or failing, read-only, closed, too slow), with a short
// reason fit for a client: the errno's text, never a path. Transports
// answer these with "try again later" (HTTP 503).
func Unavailable(err error) (reason string, ok bool) {
	var errno syscall.Errno
	switch {
	case err == nil:
		return "", false
	case errors.Is(err, registry.ErrClosed):
		return "registry closed", true
	case errors.Is(err, context.DeadlineExceeded):
		return "registry busy", true
	case errors.As(err, &errno) && storageErrno(errno):
		return errno.Error(), true
	}
	return "", false
}

// storageErrno lists the errors of a full, failing or read-only disk.
func storageErrno(e syscall.Errno) bool {
	switch e {
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EROFS, syscall.EIO, syscall.EFBIG:
		return true
	}
	return false
}
