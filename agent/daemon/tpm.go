package daemon

import (
	"fmt"

	"github.com/fleetgate/fleetgate/agent/config"
	"github.com/fleetgate/fleetgate/pkg/keystore"
)

func openTPM(cfg config.Config) (keystore.Store, error) {
	return nil, fmt.Errorf("--key tpm: not available yet (TPM %s)", cfg.TPM)
}
