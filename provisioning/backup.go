package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/pkg/registry/boltdb"
)

type backupOptions struct{ out string }

func (a *app) backupCommand() *cobra.Command {
	var o backupOptions
	cmd := &cobra.Command{
		Use:   "backup --out FILE",
		Short: "Save a consistent copy of the gateway's registry",
		Long: `backup streams a consistent copy of the registry (a bbolt file) to FILE,
mode 0600. The copy is checked (complete, consistent, a fleetgate registry)
before it replaces FILE. --timeout bounds each pause in the stream, not the
whole copy.`,
		Args: noArgs,
		RunE: a.action(func(cmd *cobra.Command, args []string) error {
			return a.runBackup(cmd.Context(), o)
		}),
	}
	cmd.Flags().StringVar(&o.out, "out", "", "file to write the registry copy to (required)")
	return cmd
}

// Sentinels of backupTo.
var (
	// errStalled cancels a backup whose stream paused longer than --timeout.
	errStalled     = errors.New("backup stalled")
	errEmptyBackup = errors.New("empty backup")
)

func (a *app) runBackup(ctx context.Context, o backupOptions) error {
	if o.out == "" {
		return usageErrorf("--out FILE is required")
	}
	path, err := filepath.Abs(o.out)
	if err != nil {
		return usageErrorf("--out: %w", err)
	}
	g, err := a.gateway()
	if err != nil {
		return err
	}
	n, err := backupTo(ctx, g, path)
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "wrote %d bytes to %s\n", n, path)
	return nil
}

// backupTo streams the backup into a new file next to path, checks it is
// a complete, consistent registry (the gateway streams without a length,
// so a copy cut short would otherwise pass for a good one) and renames it
// over path.
func backupTo(ctx context.Context, g *gateway, path string) (int64, error) {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp-"+rand.Text()[:10])

	// A whole-copy deadline would cut big registries: cancel only when no
	// byte arrived for --timeout.
	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stall := time.AfterFunc(g.timeout, func() { cancel(errStalled) })
	defer stall.Stop()

	pr, pw := io.Pipe()
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := g.api.Backup(sctx, &progressWriter{w: pw, progress: func() { stall.Reset(g.timeout) }})
		if err == nil && n == 0 {
			err = errEmptyBackup
		}
		pw.CloseWithError(err) // nil closes with io.EOF
		done <- result{n, err}
	}()
	// Restore writes the file (mode 0600, synced), verifies it and removes
	// it again when anything is wrong.
	restoreErr := boltdb.Restore(pr, tmp)
	pr.CloseWithError(errors.New("backup file closed")) // unblocks the stream if Restore gave up early
	res := <-done
	stall.Stop()

	switch {
	case errors.Is(context.Cause(sctx), errStalled):
		return res.n, fmt.Errorf("backup: the gateway at %s sent nothing for %v after %d bytes (raise --timeout)", g.url, g.timeout, res.n)
	case errors.Is(res.err, errEmptyBackup):
		return 0, fmt.Errorf("backup: the gateway at %s sent an empty registry copy", g.url)
	case res.err != nil:
		return res.n, g.explain(ctx, "backup", res.err)
	case restoreErr != nil:
		return res.n, fmt.Errorf("backup from %s is not a sound registry, nothing written to %s: %w", g.url, path, restoreErr)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return res.n, fmt.Errorf("backup: %w", err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return res.n, nil
}

// progressWriter calls progress after every write.
type progressWriter struct {
	w        io.Writer
	progress func()
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.progress()
	return n, err
}
