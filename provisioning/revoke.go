package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

type revokeOptions struct {
	reason string
	json   bool
}

func (a *app) revokeCommand() *cobra.Command {
	var o revokeOptions
	cmd := &cobra.Command{
		Use:   "revoke ID [--reason keyCompromise] [--json]",
		Short: "Revoke a device for good",
		Long: `revoke marks a device revoked: every unexpired certificate it holds joins the
CRL, its live MQTT session is closed at once, and it can never connect or
enroll again. Revoking a revoked device changes nothing.`,
		Args: exactArgs("ID"),
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runRevoke(cmd.Context(), args[0], o)
		}),
	}
	addReasonFlag(cmd, &o.reason)
	cmd.Flags().BoolVar(&o.json, "json", false, "print the gateway's answer as JSON")
	return cmd
}

func addReasonFlag(cmd *cobra.Command, reason *string) {
	cmd.Flags().StringVar(reason, "reason", "unspecified", "RFC 5280 revocation reason: "+strings.Join(pki.ReasonNames(), ", "))
}

// canonicalReason validates a reason name locally and returns its RFC 5280
// spelling.
func canonicalReason(name string) (string, error) {
	code, err := pki.ParseReason(name)
	if err != nil {
		return "", &usageError{err: fmt.Errorf("--reason: %w", err)}
	}
	return pki.ReasonName(code), nil
}

func (a *app) runRevoke(ctx context.Context, id string, o revokeOptions) error {
	if err := identity.ValidateName(id); err != nil {
		return &usageError{err: fmt.Errorf("device ID: %w", err)}
	}
	reason, err := canonicalReason(o.reason)
	if err != nil {
		return err
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	res, err := call(ctx, g, "revoke "+id, func(ctx context.Context) (adminapi.RevokeResponse, error) {
		return g.api.Revoke(ctx, id, reason)
	})
	if adminapi.IsStatus(err, http.StatusNotFound) {
		return fmt.Errorf("no device %s in the registry", id)
	}
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(a.stdout, res)
	}
	fmt.Fprintln(a.stdout, revokeSummary(id, res, time.Now()))
	return nil
}

// revokeSummary is the one human line of a device revocation.
func revokeSummary(id string, res adminapi.RevokeResponse, now time.Time) string {
	if res.AlreadyRevoked {
		s := fmt.Sprintf("%s already revoked at %s (%s ago)", id, timestamp(res.Device.RevokedAt), shortDuration(now.Sub(res.Device.RevokedAt)))
		if res.Device.RevocationReason != "" {
			s += ", reason " + res.Device.RevocationReason
		}
		return s
	}
	session := "no live session"
	if res.Disconnected {
		session = "live session closed"
	}
	return fmt.Sprintf("revoked %s (%s): %s revoked, %s, CRL #%d",
		id, res.Device.RevocationReason, plural(len(res.RevokedSerials), "certificate"), session, res.CRLNumber)
}
