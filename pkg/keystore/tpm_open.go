//go:build !windows

package keystore

import (
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// OpenTPM opens the TPM at path and returns a store keeping key blobs in
// dir (see TPMKeyFile). path is a TPM character device (/dev/tpmrm0, the
// kernel's resource manager, is the one to use; /dev/tpm0 works when no
// other program uses the TPM) or the unix socket of an swtpm started with
// --server type=unixio. OpenTPM sends one command to check that a TPM 2.0
// answers; it fails with ErrTPMUnavailable otherwise.
func OpenTPM(path, dir string) (*TPMStore, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("no TPM at %s: %w: %w", path, ErrTPMUnavailable, err)
	}
	var t transport.TPMCloser
	switch {
	case fi.Mode()&os.ModeSocket != 0:
		t, err = linuxudstpm.Open(path)
	case fi.Mode()&os.ModeDevice != 0:
		t, err = linuxtpm.Open(path)
	default:
		err = fmt.Errorf("%s is neither a device node nor a unix socket", path)
	}
	if err != nil {
		return nil, fmt.Errorf("no TPM at %s: %w: %w", path, ErrTPMUnavailable, err)
	}
	s := NewTPMStore(t, dir)
	s.path = path
	if err := s.probe(); err != nil {
		t.Close()
		return nil, err
	}
	return s, nil
}
