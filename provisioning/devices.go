package main

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/identity"
)

// maxPageSize is the gateway's largest device page.
const maxPageSize = 10000

func (a *app) devicesCommand() *cobra.Command {
	return group(&cobra.Command{
		Use:     "devices",
		Aliases: []string{"device"},
		Short:   "List and show devices",
	}, a.devicesListCommand(), a.devicesShowCommand())
}

type listOptions struct {
	status   string
	prefix   string
	pageSize int
	json     bool
}

func (a *app) devicesListCommand() *cobra.Command {
	var o listOptions
	cmd := &cobra.Command{
		Use:     "list [--status active|revoked] [--prefix P] [--json]",
		Aliases: []string{"ls"},
		Short:   "List devices",
		Args:    noArgs,
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runDevicesList(cmd.Context(), o)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&o.status, "status", "", "only devices in this state: active or revoked")
	f.StringVar(&o.prefix, "prefix", "", "only devices whose ID starts with this")
	f.IntVar(&o.pageSize, "page-size", 0, "devices per request (default: the gateway's, 1000)")
	f.BoolVar(&o.json, "json", false, `print {"devices":[...]} as JSON`)
	return cmd
}

func (a *app) runDevicesList(ctx context.Context, o listOptions) error {
	switch o.status {
	case "", "active", "revoked":
	default:
		return usageErrorf("--status %q: want active or revoked", o.status)
	}
	if o.pageSize < 0 || o.pageSize > maxPageSize {
		return usageErrorf("--page-size %d: want 1 to %d", o.pageSize, maxPageSize)
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	devices, err := listAll(ctx, g, o)
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(a.stdout, adminapi.DeviceList{Devices: devices})
	}
	if len(devices) == 0 {
		fmt.Fprintln(a.stderr, "no devices")
		return nil
	}
	now := time.Now()
	tw := newTable(a.stdout)
	fmt.Fprintln(tw, "ID\tSTATUS\tCONNECTED\tCERT EXPIRES\tLAST SEEN\tENROLLED")
	for _, d := range devices {
		certExp := expires(now, d.CertNotAfter)
		if d.Status == "revoked" {
			certExp = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, d.Status, yesNo(d.Connected), certExp, ago(now, d.LastSeen), ago(now, d.EnrolledAt))
	}
	return tw.Flush()
}

// listAll follows the Next cursor through every page.
func listAll(ctx context.Context, g *gateway, o listOptions) ([]adminapi.Device, error) {
	devices := []adminapi.Device{}
	after := ""
	for {
		page, err := call(ctx, g, "list devices", func(ctx context.Context) (adminapi.DeviceList, error) {
			return g.api.Devices(ctx, o.status, o.prefix, after, o.pageSize)
		})
		if err != nil {
			return nil, err
		}
		devices = append(devices, page.Devices...)
		if page.Next == "" {
			return devices, nil
		}
		if page.Next <= after {
			return nil, fmt.Errorf("list devices: gateway's cursor %q does not advance past %q", page.Next, after)
		}
		after = page.Next
	}
}

type showOptions struct{ json bool }

func (a *app) devicesShowCommand() *cobra.Command {
	var o showOptions
	cmd := &cobra.Command{
		Use:   "show ID [--json]",
		Short: "Show a device and its certificates",
		Args:  exactArgs("ID"),
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runDevicesShow(cmd.Context(), args[0], o)
		}),
	}
	cmd.Flags().BoolVar(&o.json, "json", false, "print the device as JSON")
	return cmd
}

func (a *app) runDevicesShow(ctx context.Context, id string, o showOptions) error {
	if err := identity.ValidateName(id); err != nil {
		return &usageError{err: fmt.Errorf("device ID: %w", err)}
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	d, err := call(ctx, g, "show device "+id, func(ctx context.Context) (adminapi.DeviceDetail, error) {
		return g.api.Device(ctx, id)
	})
	if adminapi.IsStatus(err, http.StatusNotFound) {
		return fmt.Errorf("no device %s in the registry", id)
	}
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(a.stdout, d)
	}
	now := time.Now()
	tw := newTable(a.stdout)
	fmt.Fprintf(tw, "device:\t%s\n", d.ID)
	fmt.Fprintf(tw, "status:\t%s\n", d.Status)
	if d.Status == "revoked" {
		fmt.Fprintf(tw, "revoked:\t%s (%s), reason %s\n", timestamp(d.RevokedAt), ago(now, d.RevokedAt), d.RevocationReason)
	}
	fmt.Fprintf(tw, "connected:\t%s\n", yesNo(d.Connected))
	fmt.Fprintf(tw, "current serial:\t%s\n", orDash(d.CurrentSerial))
	fmt.Fprintf(tw, "cert expires:\t%s (%s)\n", timestamp(d.CertNotAfter), expires(now, d.CertNotAfter))
	fmt.Fprintf(tw, "enrolled:\t%s (%s)\n", timestamp(d.EnrolledAt), ago(now, d.EnrolledAt))
	if !d.RenewedAt.IsZero() {
		fmt.Fprintf(tw, "renewed:\t%s (%s)\n", timestamp(d.RenewedAt), ago(now, d.RenewedAt))
	}
	fmt.Fprintf(tw, "last seen:\t%s\n", ago(now, d.LastSeen))
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(d.Certificates) == 0 {
		return nil
	}
	fmt.Fprintln(a.stdout)
	tw = newTable(a.stdout)
	fmt.Fprintln(tw, "SERIAL\tNOT BEFORE\tNOT AFTER\tREVOKED")
	for _, c := range d.Certificates {
		mark := ""
		if c.Serial == d.CurrentSerial {
			mark = " (current)"
		}
		fmt.Fprintf(tw, "%s%s\t%s\t%s\t%s\n", c.Serial, mark, timestamp(c.NotBefore), timestamp(c.NotAfter), yesNo(c.Revoked))
	}
	return tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
