package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/identity"
)

// The gateway's default and largest audit page.
const (
	defaultAuditLimit = 1000
	maxAuditLimit     = 10000
)

type auditOptions struct {
	device string
	after  uint64
	limit  int
	json   bool
}

func (a *app) auditCommand() *cobra.Command {
	var o auditOptions
	cmd := &cobra.Command{
		Use:   "audit [--device ID] [--after SEQ] [--limit N] [--json]",
		Short: "Show the audit log, oldest first",
		Args:  noArgs,
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runAudit(cmd.Context(), o)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&o.device, "device", "", "only events of this device")
	f.Uint64Var(&o.after, "after", 0, "only events after this sequence number")
	f.IntVar(&o.limit, "limit", 0, "at most N events (default: the gateway's, 1000)")
	f.BoolVar(&o.json, "json", false, `print {"events":[...]} as JSON`)
	return cmd
}

func (a *app) runAudit(ctx context.Context, o auditOptions) error {
	if o.device != "" {
		if err := identity.ValidateName(o.device); err != nil {
			return &usageError{err: fmt.Errorf("--device: %w", err)}
		}
	}
	if o.limit < 0 || o.limit > maxAuditLimit {
		return usageErrorf("--limit %d: want 1 to %d", o.limit, maxAuditLimit)
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	list, err := call(ctx, g, "read audit log", func(ctx context.Context) (adminapi.AuditList, error) {
		return g.api.Audit(ctx, o.after, o.device, o.limit)
	})
	if err != nil {
		return err
	}
	if list.Events == nil {
		list.Events = []adminapi.AuditEvent{}
	}
	if o.json {
		return printJSON(a.stdout, list)
	}
	if len(list.Events) == 0 {
		fmt.Fprintln(a.stderr, "no audit events")
		return nil
	}
	tw := newTable(a.stdout)
	fmt.Fprintln(tw, "SEQ\tTIME\tACTOR\tACTION\tDEVICE\tSERIAL\tDETAIL")
	for _, e := range list.Events {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Seq, timestamp(e.Time), orDash(e.Actor), e.Action, orDash(e.DeviceID), orDash(e.Serial), orDash(oneLine(e.Detail)))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	page := o.limit
	if page == 0 {
		page = defaultAuditLimit
	}
	if len(list.Events) >= page {
		fmt.Fprintf(a.stderr, "more events may follow: --after %d\n", list.Events[len(list.Events)-1].Seq)
	}
	return nil
}
