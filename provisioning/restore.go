package main

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/registry"
	"github.com/fleetgate/fleetgate/pkg/registry/boltdb"
)

// restoreLockTimeout is how long restore waits for the registry's file
// lock: a running gateway holds it for good, so waiting longer gains
// nothing.
const restoreLockTimeout = time.Second

// maxCRLNumberGap bounds how far restore advances the CRL number.
const maxCRLNumberGap = 1 << 20

// Audit actions restore appends to the restored registry: the restore
// itself, and each certificate recorded only to carry its revocation over.
const (
	actionRestore = "registry.restore"
	actionCarry   = "cert.carry-over"
)

type restoreOptions struct {
	from  string
	force bool
}

func (a *app) restoreCommand() *cobra.Command {
	var o restoreOptions
	cmd := &cobra.Command{
		Use:   "restore --from FILE --data-dir DIR",
		Short: "Put a registry backup back in place (gateway stopped)",
		Long: `restore replaces DIR/registry.db with a copy made by 'provisioning backup'.
It works offline: it refuses while a gateway holds the registry, so stop the
gateway first and start it again afterwards. The backup is checked
(complete, consistent, a fleetgate registry, made by DIR's issuing CA) before
anything changes; the registry it replaces is kept as
DIR/registry.db.bak-<UTC time>. Revocations the replaced registry holds and
the backup predates are carried over, so no revoked device gets back in. The
CRL number moves past the last CRL the gateway published (DIR/crl.pem), so
relying parties see CRL numbers keep increasing, and the restore is written
to the audit log.

Run it as the user the gateway runs as: the restored file is mode 0600 and
belongs to whoever runs restore.`,
		Args: noArgs,
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runRestore(cmd.Context(), o)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&o.from, "from", "", "backup file written by 'provisioning backup' (required)")
	f.BoolVar(&o.force, "force", false, "restore even if the backup's certificates were not issued by DIR's issuing CA")
	return cmd
}

func (a *app) runRestore(ctx context.Context, o restoreOptions) error {
	if o.from == "" {
		return usageErrorf("--from FILE is required")
	}
	from, err := filepath.Abs(o.from)
	if err != nil {
		return usageErrorf("--from: %w", err)
	}
	sum, err := restoreRegistry(ctx, a.layout(), from, o.force, time.Now())
	if err != nil {
		return err
	}
	if sum.oldUnreadable != nil {
		fmt.Fprintf(a.stdout, "warning: the registry it replaced could not be read (%v): revocations made after the backup could not be carried over\n", sum.oldUnreadable)
	}
	fmt.Fprintf(a.stdout, "restored %s (%d revoked) and %s from %s into %s\n",
		plural(sum.devices, "device"), sum.revoked, plural(sum.revocations, "revoked certificate"), from, a.layout().Registry())
	if sum.foreign > 0 {
		fmt.Fprintf(a.stdout, "warning: %s not issued by %s (--force)\n", plural(sum.foreign, "device certificate"), a.layout().IssuingCert())
	}
	if sum.carried > 0 {
		fmt.Fprintf(a.stdout, "carried over %s made after the backup\n", plural(sum.carried, "revocation"))
	}
	if n := len(sum.unknown); n > 0 {
		shown := sum.unknown[:min(n, 10)]
		more := ""
		if n > len(shown) {
			more = fmt.Sprintf(" and %d more", n-len(shown))
		}
		verb := "are"
		if n == 1 {
			verb = "is"
		}
		fmt.Fprintf(a.stdout, "warning: %s enrolled after the backup %s not in the restored registry: %s%s; their certificates stay valid until they expire, and they must enroll again (new tokens) before they can renew\n",
			plural(n, "device"), verb, strings.Join(shown, ", "), more)
	}
	if sum.backup != "" {
		fmt.Fprintf(a.stdout, "the previous registry is kept as %s\n", sum.backup)
	}
	fmt.Fprintln(a.stdout, "start the gateway to serve it")
	return nil
}

// restoreSummary is what restoreRegistry did.
type restoreSummary struct {
	devices, revoked, revocations int
	// foreign counts device certificates not signed by the data dir's
	// issuing CA (restored only with force).
	foreign int
	// backup is where the replaced registry went; empty when there was none.
	backup string
	// oldUnreadable is why the replaced registry could not be opened (it
	// is kept all the same).
	oldUnreadable error
	// carried counts revocations of the replaced registry the backup
	// predates, applied to the restored one.
	carried int
	// unknown lists active devices of the replaced registry the backup
	// does not know (enrolled after it).
	unknown []string
}

// restoreRegistry puts the backup at from in place of l's registry. It
// holds the old registry's file lock from the check until the swap, so a
// gateway cannot start on the old file halfway through; a gateway started
// after the swap opens the restored file, which is complete by then.
func restoreRegistry(ctx context.Context, l pki.Layout, from string, force bool, now time.Time) (sum restoreSummary, err error) {
	cas, err := pki.ReadCertsFile(l.IssuingCert())
	if err != nil {
		return sum, fmt.Errorf("data dir %s holds no issuing CA: put the CA files back (or run 'provisioning init') before the registry: %w", l.Dir, err)
	}
	src, err := os.Open(from)
	if err != nil {
		return sum, fmt.Errorf("restore: %w", err)
	}
	defer src.Close()
	srcInfo, err := src.Stat()
	if err != nil {
		return sum, fmt.Errorf("restore: %w", err)
	}

	oldInfo, err := os.Stat(l.Registry())
	hasOld := err == nil
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return sum, fmt.Errorf("restore: %w", err)
	case os.SameFile(oldInfo, srcInfo):
		return sum, fmt.Errorf("restore: %s is the registry itself", from)
	}
	var old *boltdb.Store
	if hasOld {
		old, err = boltdb.Open(l.Registry(), boltdb.Options{ReadOnly: true, Timeout: restoreLockTimeout})
		switch {
		case errors.Is(err, berrors.ErrTimeout):
			return sum, fmt.Errorf("registry %s is in use by a running gateway: stop the gateway first (restore works offline; 'provisioning backup' works while it runs)", l.Registry())
		case err != nil:
			// A damaged registry is the usual reason to restore: keep it
			// aside all the same.
			sum.oldUnreadable = err
			old = nil
		default:
			defer old.Close()
		}
	}

	tmp := l.Registry() + ".restore-" + rand.Text()[:10]
	if err := boltdb.Restore(src, tmp); err != nil {
		return sum, fmt.Errorf("backup %s is not a sound registry, nothing changed: %w", from, err)
	}
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	if hasOld {
		sum.backup = l.Registry() + ".bak-" + now.UTC().Format("20060102T150405Z")
		if _, err := os.Lstat(sum.backup); err == nil {
			sum.backup += "-" + rand.Text()[:6]
		}
	}
	if err := prepareRestored(ctx, l, tmp, old, cas[0], force, from, sum.backup, now, &sum); err != nil {
		return sum, err
	}

	if hasOld {
		if err := os.Rename(l.Registry(), sum.backup); err != nil {
			return sum, fmt.Errorf("restore: keep the old registry: %w", err)
		}
	}
	if err := os.Rename(tmp, l.Registry()); err != nil {
		if hasOld {
			_ = os.Rename(sum.backup, l.Registry())
		}
		return sum, fmt.Errorf("restore: %w", err)
	}
	if d, err := os.Open(l.Dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return sum, nil
}

// prepareRestored checks the restored file at path belongs to this data
// dir's CA, carries over the revocations of old (the registry it replaces,
// nil when unreadable) that the backup predates, counts what it holds,
// moves its CRL number past the last CRL published and records the restore
// in its audit log.
func prepareRestored(ctx context.Context, l pki.Layout, path string, old *boltdb.Store, ca *x509.Certificate, force bool, from, backup string, now time.Time, sum *restoreSummary) error {
	st, err := boltdb.Open(path, boltdb.Options{Timeout: restoreLockTimeout})
	if err != nil {
		return fmt.Errorf("open restored registry: %w", err)
	}
	defer st.Close()
	devs, err := st.Devices(ctx, registry.DeviceFilter{})
	if err != nil {
		return fmt.Errorf("read restored registry: %w", err)
	}
	sum.devices = len(devs)
	for _, d := range devs {
		c, err := st.Certificate(ctx, d.CurrentSerial)
		if err != nil {
			return fmt.Errorf("read restored registry: device %s: %w", d.ID, err)
		}
		cert, err := x509.ParseCertificate(c.DER)
		if err == nil {
			err = cert.CheckSignatureFrom(ca)
		}
		if err != nil {
			if !force {
				return fmt.Errorf("backup %s belongs to another CA: the certificate of device %s was not issued by %s (%v); pass --force to restore it anyway", from, d.ID, l.IssuingCert(), err)
			}
			sum.foreign++
		}
	}
	detail := "restored from " + from
	if backup != "" {
		detail += "; the replaced registry is kept as " + backup
	}
	if err := st.AppendAudit(ctx, registry.AuditEvent{Time: now, Actor: "operator:local", Action: actionRestore, Detail: detail}); err != nil {
		return fmt.Errorf("audit the restore: %w", err)
	}
	if old != nil {
		if err := carryRevocations(ctx, old, st, now, sum); err != nil {
			return err
		}
	}
	devs, err = st.Devices(ctx, registry.DeviceFilter{Status: registry.StatusRevoked})
	if err != nil {
		return fmt.Errorf("read restored registry: %w", err)
	}
	sum.revoked = len(devs)
	revs, err := st.Revocations(ctx)
	if err != nil {
		return fmt.Errorf("read restored registry: %w", err)
	}
	sum.revocations = len(revs)

	// The gateway kept signing CRLs after the backup was made; numbering
	// must not go back (RFC 5280 5.2.3).
	if last := publishedCRLNumber(l.CRL(), ca); last > 0 {
		for range maxCRLNumberGap {
			n, err := st.NextCRLNumber(ctx)
			if err != nil {
				return fmt.Errorf("advance the CRL number: %w", err)
			}
			if n >= last {
				break
			}
		}
	}
	if err := st.Check(); err != nil {
		return err
	}
	return st.Close()
}

// carryRevocations applies to the restored store st every revocation of
// the replaced store old that st lacks, so a restore never lets a revoked
// device back in: a device the backup knows is revoked as it was (same
// reason and time); a certificate the backup never saw (issued after it)
// is recorded from old's copy and revoked by serial. Devices old knows and
// the backup does not are listed in sum.unknown: their certificates are
// valid, but the registry no longer knows them.
func carryRevocations(ctx context.Context, old, st *boltdb.Store, now time.Time, sum *restoreSummary) error {
	const actor = "operator:local"
	have, err := revokedSerials(ctx, st)
	if err != nil {
		return err
	}
	oldRevs, err := old.Revocations(ctx)
	if err != nil {
		return fmt.Errorf("read the replaced registry: %w", err)
	}
	for _, r := range oldRevs {
		if have[r.Serial] || !r.NotAfter.IsZero() && !now.Before(r.NotAfter) {
			continue // revoked in the backup too, or expired: nothing to enforce
		}
		if r.DeviceID != "" {
			d, err := st.Device(ctx, r.DeviceID)
			if err == nil && d.Status == registry.StatusActive && slices.Contains(d.Serials, r.Serial) {
				if _, err := st.RevokeDevice(ctx, r.DeviceID, r.Reason, r.RevokedAt, actor); err != nil {
					return fmt.Errorf("carry over the revocation of device %s: %w", r.DeviceID, err)
				}
				sum.carried++
				if have, err = revokedSerials(ctx, st); err != nil {
					return err
				}
				if have[r.Serial] {
					continue
				}
			}
		}
		if _, err := st.Certificate(ctx, r.Serial); errors.Is(err, registry.ErrNotFound) {
			c, err := old.Certificate(ctx, r.Serial)
			if err != nil {
				return fmt.Errorf("carry over the revocation of %s: %w", r.Serial, err)
			}
			// Recorded without its device, which the backup does not
			// know: the certificate exists only to be revoked.
			c.DeviceID = ""
			ev := registry.AuditEvent{Time: now, Actor: actor, Action: actionCarry, Serial: c.Serial,
				Detail: fmt.Sprintf("certificate of %s revoked after the backup, carried over from the replaced registry", c.Subject)}
			if err := st.RecordCertificate(ctx, c, ev); err != nil {
				return fmt.Errorf("carry over the revocation of %s: %w", r.Serial, err)
			}
		} else if err != nil {
			return fmt.Errorf("read restored registry: %w", err)
		}
		if _, err := st.RevokeCertificate(ctx, r.Serial, r.Reason, r.RevokedAt, actor); err != nil {
			return fmt.Errorf("carry over the revocation of %s: %w", r.Serial, err)
		}
		have[r.Serial] = true
		sum.carried++
	}
	oldDevs, err := old.Devices(ctx, registry.DeviceFilter{Status: registry.StatusActive})
	if err != nil {
		return fmt.Errorf("read the replaced registry: %w", err)
	}
	for _, d := range oldDevs {
		if _, err := st.Device(ctx, d.ID); errors.Is(err, registry.ErrNotFound) {
			sum.unknown = append(sum.unknown, d.ID)
		}
	}
	return nil
}

func revokedSerials(ctx context.Context, st *boltdb.Store) (map[string]bool, error) {
	revs, err := st.Revocations(ctx)
	if err != nil {
		return nil, fmt.Errorf("read restored registry: %w", err)
	}
	set := make(map[string]bool, len(revs))
	for _, r := range revs {
		set[r.Serial] = true
	}
	return set, nil
}

// publishedCRLNumber reads the number of the CRL in path, signed by ca; 0
// when there is none or it cannot be read.
func publishedCRLNumber(path string, ca *x509.Certificate) uint64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return 0
	}
	crl, err := x509.ParseRevocationList(block.Bytes)
	if err != nil || crl.CheckSignatureFrom(ca) != nil || crl.Number == nil || !crl.Number.IsUint64() {
		return 0
	}
	return crl.Number.Uint64()
}
