package main

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

func (a *app) certCommand() *cobra.Command {
	return group(&cobra.Command{
		Use:   "cert",
		Short: "Issue and revoke service and operator certificates",
	}, a.certIssueCommand(), a.certRevokeCommand())
}

type certIssueOptions struct {
	role  string
	name  string
	out   string
	ttl   time.Duration
	force bool
}

func (a *app) certIssueCommand() *cobra.Command {
	var o certIssueOptions
	cmd := &cobra.Command{
		Use:   "issue --role service|operator --name NAME --out OUTDIR [--ttl 8760h]",
		Short: "Issue a certificate for a backend service or an operator",
		Long: `issue makes a P-256 key here, sends only a CSR to the gateway and writes
OUTDIR/NAME.crt (certificate and issuing CA) and OUTDIR/NAME.key (mode 0600).
A service certificate may subscribe to every device's telemetry and publish
commands; an operator certificate may use the admin API.`,
		Example: `  provisioning cert issue --role service --name ingest --out ./certs`,
		Args:    noArgs,
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runCertIssue(cmd, o)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&o.role, "role", string(identity.RoleService), "service or operator")
	f.StringVar(&o.name, "name", "", "name of the service or operator (required)")
	f.StringVar(&o.out, "out", "", "directory for NAME.crt and NAME.key, created with mode 0700 if missing (required)")
	f.DurationVar(&o.ttl, "ttl", 0, "certificate lifetime (default: the gateway's, 8760h)")
	f.BoolVar(&o.force, "force", false, "replace existing NAME.crt and NAME.key")
	return cmd
}

func (a *app) runCertIssue(cmd *cobra.Command, o certIssueOptions) error {
	role := identity.Role(o.role)
	if role != identity.RoleService && role != identity.RoleOperator {
		return usageErrorf("--role %q: want service or operator", o.role)
	}
	if o.name == "" {
		return usageErrorf("--name is required")
	}
	if err := identity.ValidateName(o.name); err != nil {
		return &usageError{err: fmt.Errorf("--name: %w", err)}
	}
	if o.out == "" {
		return usageErrorf("--out is required: the directory for %s.crt and %s.key", o.name, o.name)
	}
	if cmd.Flags().Changed("ttl") && o.ttl <= 0 {
		return usageErrorf("--ttl %v: must be positive", o.ttl)
	}
	dir, err := filepath.Abs(o.out)
	if err != nil {
		return usageErrorf("--out: %w", err)
	}
	certPath := filepath.Join(dir, o.name+".crt")
	keyPath := filepath.Join(dir, o.name+".key")
	if !o.force {
		for _, p := range []string{certPath, keyPath} {
			if _, err := os.Lstat(p); err == nil {
				return fmt.Errorf("%s exists: pass --force to replace it", p)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	// Before the certificate exists: a key that cannot be saved is lost.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("--out: %w", err)
	}

	key, err := pki.GenerateKey(pki.P256)
	if err != nil {
		return err
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: o.name}}, key)
	if err != nil {
		return fmt.Errorf("create CSR: %w", err)
	}
	req := adminapi.CertificateRequest{
		Role: o.role,
		Name: o.name,
		CSR:  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
	}
	if o.ttl > 0 {
		req.TTL = o.ttl.String()
	}
	res, err := call(cmd.Context(), g, "issue certificate", func(ctx context.Context) (adminapi.CertificateResponse, error) {
		return g.api.IssueCertificate(ctx, req)
	})
	if err != nil {
		return err
	}
	chain, err := pki.ParseCertsPEM([]byte(res.Chain))
	if err != nil {
		return fmt.Errorf("gateway's certificate: %w", err)
	}
	if err := pki.KeyMatches(chain[0], key); err != nil {
		return fmt.Errorf("gateway's certificate is not for the key made here: %w", err)
	}

	if err := pki.WriteKeyFile(keyPath, key); err != nil {
		return err
	}
	if err := pki.WriteFileAtomic(certPath, []byte(res.Chain), 0o644); err != nil {
		return err
	}

	spiffe := make([]string, 0, len(chain[0].URIs))
	for _, u := range chain[0].URIs {
		spiffe = append(spiffe, u.String())
	}
	fmt.Fprintf(a.stdout, "issued %s certificate for %s\n", o.role, o.name)
	tw := newTable(a.stdout)
	fmt.Fprintf(tw, "  identity:\t%s\n", strings.Join(spiffe, ", "))
	fmt.Fprintf(tw, "  serial:\t%s\n", res.Serial)
	fmt.Fprintf(tw, "  expires:\t%s (%s)\n", timestamp(res.NotAfter), expires(time.Now(), res.NotAfter))
	fmt.Fprintf(tw, "  certificate:\t%s\n", certPath)
	fmt.Fprintf(tw, "  key:\t%s (mode 0600)\n", keyPath)
	fmt.Fprintf(tw, "  CA bundle to trust:\t%s\n", a.caFile)
	return tw.Flush()
}

type certRevokeOptions struct {
	reason string
	json   bool
}

func (a *app) certRevokeCommand() *cobra.Command {
	var o certRevokeOptions
	cmd := &cobra.Command{
		Use:   "revoke SERIAL [--reason keyCompromise]",
		Short: "Revoke one certificate by serial number (hex)",
		Args:  exactArgs("SERIAL"),
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runCertRevoke(cmd.Context(), args[0], o)
		}),
	}
	addReasonFlag(cmd, &o.reason)
	cmd.Flags().BoolVar(&o.json, "json", false, "print the revoked certificate as JSON")
	return cmd
}

// normalizeSerial accepts a hex serial with or without colons, 0x or
// leading zeros, and returns it the way the gateway prints serials.
func normalizeSerial(s string) (string, error) {
	t := strings.ToLower(strings.ReplaceAll(strings.TrimSpace(s), ":", ""))
	t = strings.TrimPrefix(t, "0x")
	if t == "" {
		return "", usageErrorf("serial %q is empty", s)
	}
	for _, c := range t {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return "", usageErrorf("serial %q: want hexadecimal digits", s)
		}
	}
	if t = strings.TrimLeft(t, "0"); t == "" {
		return "", usageErrorf("serial %q: zero is no serial", s)
	}
	return t, nil
}

func (a *app) runCertRevoke(ctx context.Context, serialArg string, o certRevokeOptions) error {
	serial, err := normalizeSerial(serialArg)
	if err != nil {
		return err
	}
	reason, err := canonicalReason(o.reason)
	if err != nil {
		return err
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	c, err := call(ctx, g, "revoke certificate "+serial, func(ctx context.Context) (adminapi.Certificate, error) {
		return g.api.RevokeCertificate(ctx, serial, reason)
	})
	if adminapi.IsStatus(err, http.StatusNotFound) {
		return fmt.Errorf("the gateway issued no certificate with serial %s", serial)
	}
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(a.stdout, c)
	}
	fmt.Fprintf(a.stdout, "revoked certificate %s (%s); the CRL lists it\n", c.Serial, c.Subject)
	return nil
}
