package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/cli"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

type initOptions struct {
	hosts       string
	trustDomain string
	caKey       string
	rootKeyOut  string
	operator    string
	crlURL      string
}

func (a *app) initCommand() *cobra.Command {
	var o initOptions
	cmd := &cobra.Command{
		Use:   "init --hosts HOST,... [--data-dir DIR]",
		Short: "Create the fleet's CA, the gateway's server certificate and a first operator certificate",
		Long: `init creates, under the data directory, a root CA and an issuing CA, the
gateway's TLS server certificate (names from --hosts) and a first operator
client certificate. DIR/ca.pem is the CA bundle devices and services trust.
The root key is needed only to make a new issuing CA: write it elsewhere with
--root-key-out, or move it offline afterwards. init never overwrites a CA.`,
		Args: noArgs,
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runInit(o)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&o.hosts, "hosts", "", "comma-separated DNS names and IP addresses of the gateway (required)")
	f.StringVar(&o.trustDomain, "trust-domain", pki.DefaultTrustDomain, "SPIFFE trust domain of the fleet")
	f.StringVar(&o.caKey, "ca-key", string(pki.P256), "CA key algorithm: p256 or p384")
	f.StringVar(&o.rootKeyOut, "root-key-out", "", "where to write the root CA key (default DIR/root.key); keep it offline")
	f.StringVar(&o.operator, "operator", pki.DefaultOperator, "name of the first operator certificate")
	f.StringVar(&o.crlURL, "crl-url", "", "CRL distribution point for the server and operator certificates (default https://<first host>:8443/crl)")
	return cmd
}

func (a *app) runInit(o initOptions) error {
	hosts := cli.SplitList(o.hosts)
	if len(hosts) == 0 {
		return usageErrorf("--hosts is required: the DNS names and IP addresses devices use to reach the gateway")
	}
	alg := pki.KeyAlgorithm(strings.ToLower(o.caKey))
	if alg != pki.P256 && alg != pki.P384 {
		return usageErrorf("--ca-key %q: want p256 or p384", o.caKey)
	}
	if err := identity.ValidateTrustDomain(o.trustDomain); err != nil {
		return &usageError{err: fmt.Errorf("--trust-domain: %w", err)}
	}
	if err := identity.ValidateName(o.operator); err != nil {
		return &usageError{err: fmt.Errorf("--operator: %w", err)}
	}
	l := a.layout()
	rootKey := l.RootKey()
	if o.rootKeyOut != "" {
		abs, err := filepath.Abs(o.rootKeyOut)
		if err != nil {
			return usageErrorf("--root-key-out: %w", err)
		}
		rootKey = abs
	}
	alreadyInitialized := fmt.Errorf("%w: %s; refusing to overwrite it (use another --data-dir to start a new fleet)", pki.ErrAlreadyInitialized, l.Dir)
	// pki.Init checks the CA files inside DIR but would replace a root key
	// elsewhere, which may be another fleet's only copy.
	for _, p := range []string{l.IssuingKey(), l.IssuingCert(), l.RootCert(), rootKey} {
		if _, err := os.Lstat(p); err == nil {
			if p == rootKey {
				return fmt.Errorf("%s exists: refusing to overwrite a root CA key (choose another --root-key-out)", rootKey)
			}
			return alreadyInitialized
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("init: %w", err)
		}
	}

	err := pki.Init(l, pki.InitOptions{
		Hosts:        hosts,
		TrustDomain:  o.trustDomain,
		KeyAlgorithm: alg,
		RootKeyPath:  rootKey,
		Operator:     o.operator,
		CRLURL:       o.crlURL,
	})
	if errors.Is(err, pki.ErrAlreadyInitialized) {
		return alreadyInitialized
	}
	if err != nil {
		return err
	}

	fmt.Fprintf(a.stdout, "initialized fleet %s in %s (CA keys %s)\n", o.trustDomain, l.Dir, alg)
	tw := newTable(a.stdout)
	fmt.Fprintf(tw, "  CA bundle devices and services trust:\t%s\n", l.CABundle())
	fmt.Fprintf(tw, "  root CA certificate:\t%s\n", l.RootCert())
	if rootKey == l.RootKey() {
		fmt.Fprintf(tw, "  root CA key:\t%s  <- move it offline: the gateway does not need it\n", rootKey)
	} else {
		fmt.Fprintf(tw, "  root CA key:\t%s  <- keep it offline: the gateway does not need it\n", rootKey)
	}
	fmt.Fprintf(tw, "  issuing CA (the gateway signs with it):\t%s, %s\n", l.IssuingCert(), l.IssuingKey())
	fmt.Fprintf(tw, "  gateway server certificate:\t%s, %s (%s)\n", l.ServerCert(), l.ServerKey(), strings.Join(hosts, ", "))
	fmt.Fprintf(tw, "  operator %q certificate:\t%s, %s\n", o.operator, l.OperatorCert(), l.OperatorKey())
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "next: gateway --data-dir %s\n", l.Dir)
	return nil
}
