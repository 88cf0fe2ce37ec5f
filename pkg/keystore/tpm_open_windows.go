package keystore

import "fmt"

// OpenTPM would open the TPM at path; the agent supports TPMs on Linux
// only, so on Windows it always fails with ErrTPMUnavailable.
func OpenTPM(path, dir string) (*TPMStore, error) {
	return nil, fmt.Errorf("no TPM at %s: %w: TPM access is implemented for Linux only", path, ErrTPMUnavailable)
}
