package daemon

import (
	"github.com/fleetgate/fleetgate/agent/config"
	"github.com/fleetgate/fleetgate/pkg/keystore"
)

// openTPM opens the TPM key store: the key lives in the TPM, its wrapped
// blob in the state directory.
func openTPM(cfg config.Config) (keystore.Store, error) {
	return keystore.OpenTPM(cfg.TPM, cfg.StateDir)
}
