package server

import (
	"io/fs"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

func TestCheckDataDir(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("permission bits are not enforced on Windows")
	}
	cases := []struct {
		name string
		// prepare breaks a freshly initialized data dir.
		prepare func(t *testing.T, l pki.Layout)
		// want is "" for success, else substrings of the error.
		want []string
	}{
		{"fresh data dir passes", nil, nil},
		{"registry readable by its group passes", chmod(pki.Layout.Registry, 0o640), nil},
		{"world-readable data dir passes", chmod(func(l pki.Layout) string { return l.Dir }, 0o755), nil},
		{"root key kept offline passes", remove(pki.Layout.RootKey), nil},
		{"no registry yet passes", remove(pki.Layout.Registry), nil},
		{"data dir writable by its group refused", chmod(func(l pki.Layout) string { return l.Dir }, 0o770),
			[]string{"data dir", "mode 0770", "its group may write", "chmod 0750"}},
		{"data dir writable by everyone refused", chmod(func(l pki.Layout) string { return l.Dir }, 0o777),
			[]string{"its group and every other user may write", "chmod 0755"}},
		{"issuing key readable by its group refused", chmod(pki.Layout.IssuingKey, 0o640),
			[]string{"issuing.key", "mode 0640", "its group has access", "chmod 0600"}},
		{"server key readable by everyone refused", chmod(pki.Layout.ServerKey, 0o604),
			[]string{"server.key", "every other user has access", "chmod 0600"}},
		{"root key left readable refused", chmod(pki.Layout.RootKey, 0o644),
			[]string{"root.key", "chmod 0600"}},
		{"operator key readable by its group refused", chmod(pki.Layout.OperatorKey, 0o660),
			[]string{"operator.key", "chmod 0600"}},
		{"registry readable by everyone refused", chmod(pki.Layout.Registry, 0o644),
			[]string{"registry", "registry.db", "mode 0644", "every other user has access", "chmod 0640"}},
		{"missing issuing key refused", remove(pki.Layout.IssuingKey), []string{"key file", "issuing.key"}},
		{"missing server key refused", remove(pki.Layout.ServerKey), []string{"key file", "server.key"}},
		{"registry that is a directory refused", func(t *testing.T, l pki.Layout) {
			if err := os.Remove(l.Registry()); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(l.Registry(), 0o700); err != nil {
				t.Fatal(err)
			}
		}, []string{"registry.db is not a regular file"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := pki.Layout{Dir: t.TempDir()}
			if err := pki.Init(l, pki.InitOptions{Hosts: []string{"localhost"}}); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(l.Registry(), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if tc.prepare != nil {
				tc.prepare(t, l)
			}
			err := checkDataDir(l)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

func chmod(path func(pki.Layout) string, mode fs.FileMode) func(*testing.T, pki.Layout) {
	return func(t *testing.T, l pki.Layout) {
		t.Helper()
		if err := os.Chmod(path(l), mode); err != nil {
			t.Fatal(err)
		}
		// t.TempDir's cleanup needs to walk the directory again.
		t.Cleanup(func() { _ = os.Chmod(l.Dir, 0o700) })
	}
}

func remove(path func(pki.Layout) string) func(*testing.T, pki.Layout) {
	return func(t *testing.T, l pki.Layout) {
		t.Helper()
		if err := os.Remove(path(l)); err != nil {
			t.Fatal(err)
		}
	}
}
