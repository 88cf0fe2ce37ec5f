package server

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

// checkDataDir refuses to serve from a data directory whose permissions
// would let another local user take over the fleet: a directory others may
// write to (they could swap the CA or the registry), a private key others
// may read (the issuing key signs device certificates, the server key
// impersonates the gateway), or a registry others may read (device records,
// token hashes and the audit log). Each message names the chmod that fixes
// it. The root and operator keys are checked too when they are present:
// the root key belongs offline, but a copy left here must at least be
// private.
//
// Permission bits are a Unix idea; on Windows the checks pass.
func checkDataDir(l pki.Layout) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	st, err := os.Stat(l.Dir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("data dir %s is not a directory", l.Dir)
	}
	if perm := st.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("data dir %s has mode %04o: %s may write to it and replace the CA or the registry; run chmod %04o %s",
			l.Dir, perm, who(perm&0o022), perm&^0o022, l.Dir)
	}
	for _, key := range []struct {
		path     string
		required bool
	}{
		{l.IssuingKey(), true},
		{l.ServerKey(), true},
		{l.RootKey(), false},
		{l.OperatorKey(), false},
	} {
		if err := checkPrivate(key.path, key.required, 0o077, "key file"); err != nil {
			return err
		}
	}
	// Group read access to the registry is tolerated (a backup operator's
	// group); the world's is not.
	return checkPrivate(l.Registry(), false, 0o007, "registry")
}

// checkPrivate refuses a file with any of the mask bits set. A missing
// file is an error only when required.
func checkPrivate(path string, required bool, mask fs.FileMode, what string) error {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !required:
		return nil
	case err != nil:
		return fmt.Errorf("%s: %w", what, err)
	case !st.Mode().IsRegular():
		return fmt.Errorf("%s %s is not a regular file", what, path)
	}
	if perm := st.Mode().Perm(); perm&mask != 0 {
		return fmt.Errorf("%s %s has mode %04o: %s has access to it; run chmod %04o %s",
			what, path, perm, who(perm&mask), perm&^mask&^0o111, path)
	}
	return nil
}

// who names the classes that hold any of the permission bits given.
func who(bits fs.FileMode) string {
	g, o := bits&0o070 != 0, bits&0o007 != 0
	switch {
	case g && o:
		return "its group and every other user"
	case g:
		return "its group"
	default:
		return "every other user"
	}
}
