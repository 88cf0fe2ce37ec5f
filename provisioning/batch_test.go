package main

import (
	"context"
	"encoding/csv"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/pkg/adminapi"
)

func TestSequenceIDs(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name                 string
		prefix               string
		start, count, digits int
		want                 []string
		wantErr              string
	}{
		{name: "zero padded from one", prefix: "sensor-", start: 1, count: 3, digits: 4, want: []string{"sensor-0001", "sensor-0002", "sensor-0003"}},
		{name: "custom start", prefix: "pi.", start: 98, count: 3, digits: 3, want: []string{"pi.098", "pi.099", "pi.100"}},
		{name: "no prefix", start: 0, count: 2, digits: 2, want: []string{"00", "01"}},
		{name: "last number exactly fills the width", prefix: "s", start: 1, count: 9999, digits: 4},
		{name: "number wider than digits", prefix: "s", start: 1, count: 10000, digits: 4, wantErr: "does not fit in 4 digits"},
		{name: "upper-case prefix", prefix: "Sensor-", start: 1, count: 1, digits: 4, wantErr: "--prefix"},
		{name: "prefix too long", prefix: strings.Repeat("a", 60), start: 1, count: 1, digits: 4, wantErr: "--prefix"},
		{name: "negative start", prefix: "s", start: -1, count: 1, digits: 4, wantErr: "--start"},
		{name: "no devices", prefix: "s", start: 1, count: 0, digits: 4, wantErr: "--count"},
		{name: "too many", prefix: "s", start: 1, count: maxBatch + 1, digits: 8, wantErr: "at most"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := sequenceIDs(tt.prefix, tt.start, tt.count, tt.digits)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != tt.count {
				t.Fatalf("%d IDs, want %d", len(got), tt.count)
			}
			if tt.want != nil && !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseIDs(t *testing.T) {
	t.Parallel()
	t.Run("comments and blank lines are skipped", func(t *testing.T) {
		in := "# line 3, order 17\nsensor-a\n\n  sensor-b   # spare\r\n#sensor-c\nsensor-d\n"
		got, err := parseIDs(strings.NewReader(in))
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"sensor-a", "sensor-b", "sensor-d"}; !reflect.DeepEqual(got, want) {
			t.Errorf("got %v, want %v", got, want)
		}
	})
	for name, tc := range map[string]struct{ in, want string }{
		"invalid ID names its line": {"ok\nNOT-OK\n", "line 2"},
		"repeat names both lines":   {"a\nb\na\n", "line 3: device a already listed on line 1"},
		"only comments":             {"# nothing yet\n\n", "no device IDs"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := parseIDs(strings.NewReader(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		_, err := readIDsFile(filepath.Join(t.TempDir(), "nope.txt"))
		if !errors.Is(err, os.ErrNotExist) {
			t.Errorf("error %v, want not exist", err)
		}
	})
}

// fakeMinter answers like the gateway, recording each request, and fails
// the request numbered failAt (1-based) when set.
type fakeMinter struct {
	requests [][]string
	failAt   int
}

func (f *fakeMinter) CreateTokens(_ context.Context, req adminapi.TokenRequest) (adminapi.TokenResponse, error) {
	f.requests = append(f.requests, req.DeviceIDs)
	if len(f.requests) == f.failAt {
		return adminapi.TokenResponse{}, &adminapi.Error{StatusCode: 503, Message: "registry unavailable; try again later"}
	}
	out := adminapi.TokenResponse{}
	for _, id := range req.DeviceIDs {
		out.Tokens = append(out.Tokens, adminapi.Token{DeviceID: id, Token: "tok-" + id, ExpiresAt: time.Unix(1e9, 0)})
	}
	return out, nil
}

func TestMintTokensChunks(t *testing.T) {
	t.Parallel()
	ids, err := sequenceIDs("s-", 1, 25, 3)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("at most chunk per request, in order", func(t *testing.T) {
		m := &fakeMinter{}
		var progress []int
		got, err := mintTokens(context.Background(), m, ids, "72h", "line-3", 10, func(done, total int) {
			if total != 25 {
				t.Errorf("progress total %d", total)
			}
			progress = append(progress, done)
		})
		if err != nil {
			t.Fatal(err)
		}
		var sizes []int
		for _, r := range m.requests {
			sizes = append(sizes, len(r))
		}
		if !reflect.DeepEqual(sizes, []int{10, 10, 5}) {
			t.Errorf("request sizes %v, want [10 10 5]", sizes)
		}
		if !reflect.DeepEqual(progress, []int{10, 20, 25}) {
			t.Errorf("progress %v", progress)
		}
		for i, tok := range got {
			if tok.DeviceID != ids[i] {
				t.Fatalf("token %d for %s, want %s", i, tok.DeviceID, ids[i])
			}
		}
	})

	t.Run("failure keeps the tokens already minted", func(t *testing.T) {
		m := &fakeMinter{failAt: 3}
		got, err := mintTokens(context.Background(), m, ids, "", "", 10, nil)
		if !adminapi.IsStatus(err, 503) {
			t.Fatalf("error %v, want the gateway's 503", err)
		}
		if len(got) != 20 {
			t.Errorf("kept %d tokens, want 20", len(got))
		}
	})

	t.Run("answer for the wrong devices is refused", func(t *testing.T) {
		bad := minterFunc(func(_ context.Context, req adminapi.TokenRequest) (adminapi.TokenResponse, error) {
			return adminapi.TokenResponse{Tokens: []adminapi.Token{{DeviceID: "other", Token: "t"}}}, nil
		})
		if _, err := mintTokens(context.Background(), bad, []string{"a"}, "", "", 10, nil); err == nil {
			t.Error("mismatched answer accepted")
		}
	})
}

type minterFunc func(context.Context, adminapi.TokenRequest) (adminapi.TokenResponse, error)

func (f minterFunc) CreateTokens(ctx context.Context, req adminapi.TokenRequest) (adminapi.TokenResponse, error) {
	return f(ctx, req)
}

func TestCSVOutput(t *testing.T) {
	t.Parallel()
	tokens := []adminapi.Token{
		{DeviceID: "sensor-0001", Token: "abc", ExpiresAt: time.Date(2025, 6, 1, 12, 0, 0, 0, time.FixedZone("CEST", 7200))},
		{DeviceID: "sensor-0002", Token: "d,e\"f", ExpiresAt: time.Date(2025, 6, 1, 10, 0, 0, 0, time.UTC)},
	}

	t.Run("header, rows, mode 0600", func(t *testing.T) {
		t.Parallel()
		path := filepath.Join(t.TempDir(), "tokens.csv")
		out := &csvOutput{path: path}
		if err := out.check(); err != nil {
			t.Fatal(err)
		}
		if err := out.write(tokens); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("mode %04o, want 0600", st.Mode().Perm())
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		rows, err := csv.NewReader(f).ReadAll()
		if err != nil {
			t.Fatal(err)
		}
		want := [][]string{
			{"device_id", "token", "expires_at"},
			{"sensor-0001", "abc", "2025-06-01T10:00:00Z"},
			{"sensor-0002", "d,e\"f", "2025-06-01T10:00:00Z"},
		}
		if !reflect.DeepEqual(rows, want) {
			t.Errorf("rows %v, want %v", rows, want)
		}
	})

	t.Run("existing file needs force", func(t *testing.T) {
		t.Parallel()
		path := filepath.Join(t.TempDir(), "tokens.csv")
		if err := os.WriteFile(path, []byte("unused tokens\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := (&csvOutput{path: path}).check(); err == nil || !strings.Contains(err.Error(), "--force") {
			t.Errorf("error %v, want a refusal naming --force", err)
		}
		if err := (&csvOutput{path: path, force: true}).check(); err != nil {
			t.Errorf("with force: %v", err)
		}
	})

	t.Run("missing directory is found before minting", func(t *testing.T) {
		t.Parallel()
		path := filepath.Join(t.TempDir(), "no", "such", "tokens.csv")
		if err := (&csvOutput{path: path}).check(); err == nil {
			t.Error("missing directory accepted")
		}
	})
}

func TestTokenCreateChecksOutputBeforeMinting(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	csvPath := filepath.Join(dir, "line.csv")
	if err := os.WriteFile(csvPath, []byte("old\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The gateway address is closed: had the command tried to mint, the
	// error would be about reaching it.
	r := runCLI(t, "token", "create", "--count", "3", "--prefix", "s-", "--csv", csvPath, "--data-dir", dir, "--gateway", "https://"+closedAddr(t))
	wantError(t, r, exitFailure, csvPath, "--force")
}

func TestBatchSummary(t *testing.T) {
	t.Parallel()
	toks := []adminapi.Token{
		{DeviceID: "sensor-0001", ExpiresAt: time.Date(2025, 6, 4, 0, 0, 0, 0, time.UTC)},
		{DeviceID: "sensor-0002", ExpiresAt: time.Date(2025, 6, 4, 0, 0, 0, 0, time.UTC)},
	}
	got := batchSummary(toks, "line-3", []string{"/x/line.csv (mode 0600)"})
	want := `minted 2 tokens for batch "line-3" (sensor-0001 ... sensor-0002), expiring 2025-06-04T00:00:00Z; saved to /x/line.csv (mode 0600)`
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}
