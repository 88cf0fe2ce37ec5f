package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// sequenceIDs names count devices prefix + a number from start on,
// zero-padded to digits: sensor-0001, sensor-0002, ... Every number must
// fit in digits, so the IDs of one batch sort in numeric order.
func sequenceIDs(prefix string, start, count, digits int) ([]string, error) {
	switch {
	case count <= 0:
		return nil, fmt.Errorf("--count %d: must be positive", count)
	case count > maxBatch:
		return nil, fmt.Errorf("--count %d: at most %d per run", count, maxBatch)
	case start < 0:
		return nil, fmt.Errorf("--start %d: must not be negative", start)
	case digits < 1 || digits > 18:
		return nil, fmt.Errorf("--digits %d: want 1 to 18", digits)
	}
	last := start + count - 1
	if len(strconv.Itoa(last)) > digits {
		return nil, fmt.Errorf("number %d does not fit in %d digits: raise --digits or lower --start or --count", last, digits)
	}
	ids := make([]string, count)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%0*d", prefix, digits, start+i)
	}
	// All IDs share the prefix and the length: the first and the last
	// stand for the rest.
	for _, id := range []string{ids[0], ids[count-1]} {
		if err := identity.ValidateName(id); err != nil {
			return nil, fmt.Errorf("--prefix %q makes device ID %s: %w", prefix, id, err)
		}
	}
	return ids, nil
}

// checkIDs validates device IDs and refuses repeats and empty lists.
func checkIDs(ids []string) error {
	if len(ids) == 0 {
		return errors.New("no device IDs")
	}
	if len(ids) > maxBatch {
		return fmt.Errorf("%d device IDs: at most %d per run", len(ids), maxBatch)
	}
	seen := make(map[string]bool, len(ids))
	for _, id := range ids {
		if err := identity.ValidateName(id); err != nil {
			return err
		}
		if seen[id] {
			return fmt.Errorf("device %s is listed twice", id)
		}
		seen[id] = true
	}
	return nil
}

// readIDsFile reads a list of device IDs, one per line; blank lines and
// everything after a # are ignored.
func readIDsFile(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("device IDs file: %w", err)
	}
	defer f.Close()
	ids, err := parseIDs(f)
	if err != nil {
		return nil, fmt.Errorf("device IDs file %s: %w", path, err)
	}
	return ids, nil
}

func parseIDs(r io.Reader) ([]string, error) {
	var ids []string
	seen := map[string]int{}
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		s := sc.Text()
		if i := strings.IndexByte(s, '#'); i >= 0 {
			s = s[:i]
		}
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if err := identity.ValidateName(s); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if first, ok := seen[s]; ok {
			return nil, fmt.Errorf("line %d: device %s already listed on line %d", line, s, first)
		}
		seen[s] = line
		ids = append(ids, s)
		if len(ids) > maxBatch {
			return nil, fmt.Errorf("more than %d device IDs", maxBatch)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(ids) == 0 {
		return nil, errors.New("no device IDs")
	}
	return ids, nil
}

// tokenMinter is what token create needs of the admin API.
type tokenMinter interface {
	CreateTokens(ctx context.Context, req adminapi.TokenRequest) (adminapi.TokenResponse, error)
}

// mintTokens mints a token for each ID in order, at most chunk per
// request. On failure it returns the tokens minted so far along with the
// error: they are valid, and shown nowhere else, so the caller saves them.
func mintTokens(ctx context.Context, m tokenMinter, ids []string, ttl, batch string, chunk int, progress func(done, total int)) ([]adminapi.Token, error) {
	if chunk <= 0 {
		return nil, fmt.Errorf("chunk size %d: must be positive", chunk)
	}
	out := make([]adminapi.Token, 0, len(ids))
	for start := 0; start < len(ids); start += chunk {
		part := ids[start:min(start+chunk, len(ids))]
		resp, err := m.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: part, TTL: ttl, Batch: batch})
		if err != nil {
			return out, err
		}
		if err := checkGrants(part, resp.Tokens); err != nil {
			return out, err
		}
		out = append(out, resp.Tokens...)
		if progress != nil {
			progress(len(out), len(ids))
		}
	}
	return out, nil
}

// checkGrants makes sure the gateway answered one token per requested
// device, in order, so no row of a CSV pairs a device with another's token.
func checkGrants(ids []string, tokens []adminapi.Token) error {
	if len(tokens) != len(ids) {
		return fmt.Errorf("gateway answered %d tokens for %d devices", len(tokens), len(ids))
	}
	for i, t := range tokens {
		if t.DeviceID != ids[i] || t.Token == "" {
			return fmt.Errorf("gateway answered a token for %q where %q was asked", t.DeviceID, ids[i])
		}
	}
	return nil
}

// tokenOutput is one destination of minted tokens.
type tokenOutput interface {
	// check runs before anything is minted.
	check() error
	// write saves or shows the tokens.
	write(tokens []adminapi.Token) error
	// describe names the destination for the summary ("" to stay silent).
	describe() string
}

// csvOutput writes device_id,token,expires_at rows to a file only its
// owner can read, atomically: a reader never sees half a batch.
type csvOutput struct {
	path  string
	force bool
}

func (c *csvOutput) check() error {
	st, err := os.Stat(filepath.Dir(c.path))
	if err != nil {
		return fmt.Errorf("--csv: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("--csv: %s is not a directory", filepath.Dir(c.path))
	}
	if _, err := os.Lstat(c.path); err == nil {
		if !c.force {
			return fmt.Errorf("%s exists and may hold unused tokens: choose another --csv or pass --force", c.path)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("--csv: %w", err)
	}
	return nil
}

func (c *csvOutput) write(tokens []adminapi.Token) error {
	data, err := encodeTokensCSV(tokens)
	if err != nil {
		return err
	}
	return pki.WriteFileAtomic(c.path, data, 0o600)
}

func (c *csvOutput) describe() string { return c.path + " (mode 0600)" }

// encodeTokensCSV renders tokens with the header device_id,token,expires_at
// and expiry times in RFC 3339 UTC.
func encodeTokensCSV(tokens []adminapi.Token) ([]byte, error) {
	var buf bytes.Buffer
	w := csv.NewWriter(&buf)
	_ = w.Write([]string{"device_id", "token", "expires_at"})
	for _, t := range tokens {
		_ = w.Write([]string{t.DeviceID, t.Token, t.ExpiresAt.UTC().Format(time.RFC3339)})
	}
	w.Flush()
	if err := w.Error(); err != nil {
		return nil, fmt.Errorf("encode CSV: %w", err)
	}
	return buf.Bytes(), nil
}

// jsonOutput prints the tokens as an adminapi.TokenResponse.
type jsonOutput struct{ w io.Writer }

func (j *jsonOutput) check() error { return nil }
func (j *jsonOutput) write(tokens []adminapi.Token) error {
	return printJSON(j.w, adminapi.TokenResponse{Tokens: tokens})
}
func (j *jsonOutput) describe() string { return "stdout (JSON)" }

// plainOutput shows one token: what it is for on stderr, the token alone on
// the last line of stdout, so TOKEN=$(... | tail -n1) works.
type plainOutput struct{ stdout, stderr io.Writer }

func (p *plainOutput) check() error { return nil }
func (p *plainOutput) write(tokens []adminapi.Token) error {
	for _, t := range tokens {
		fmt.Fprintf(p.stderr, "enrollment token for %s, valid until %s (%s); it is shown only this once\n",
			t.DeviceID, timestamp(t.ExpiresAt), expires(time.Now(), t.ExpiresAt))
		if _, err := fmt.Fprintln(p.stdout, t.Token); err != nil {
			return err
		}
	}
	return nil
}
func (p *plainOutput) describe() string { return "" }
