// Command agent runs on a device: it makes the device's key, enrolls with
// a one-time token, publishes telemetry over mutually authenticated MQTT
// and renews its certificate before it expires.
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
