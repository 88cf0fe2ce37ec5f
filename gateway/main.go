// Command gateway is fleetgate's server: an MQTT broker that admits only
// devices holding a certificate it issued, the CA that issues them over EST,
// and the registry that knows every device.
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
