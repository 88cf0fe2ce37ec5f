// Command provisioning is fleetgate's operator and factory CLI: it creates
// the CA of a new fleet, mints one-time enrollment tokens (one at a time or
// by the thousand for a factory line), lists, shows and revokes devices,
// issues service and operator certificates, reads the audit log and backs
// up the registry through the gateway's admin API.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}
