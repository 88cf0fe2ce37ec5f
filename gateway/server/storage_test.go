package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
	"github.com/fleetgate/fleetgate/pkg/registry"
	"github.com/fleetgate/fleetgate/pkg/registry/boltdb"
)

// faultStore is the real registry with storage faults injected into every
// write while a fault is set, the way bbolt reports them: its transaction
// fails with the write error, so nothing of it is committed. Reads pass.
type faultStore struct {
	registry.Store
	fault atomic.Pointer[error]
}

func (f *faultStore) set(err error) { f.fault.Store(&err) }
func (f *faultStore) clear()        { f.fault.Store(nil) }

func (f *faultStore) err(op string) error {
	if p := f.fault.Load(); p != nil && *p != nil {
		return fmt.Errorf("%s: %w", op, *p)
	}
	return nil
}

func (f *faultStore) CreateTokens(ctx context.Context, t []registry.Token, actor string) error {
	if err := f.err("create tokens"); err != nil {
		return err
	}
	return f.Store.CreateTokens(ctx, t, actor)
}

func (f *faultStore) Enroll(ctx context.Context, e registry.Enrollment) (registry.Device, error) {
	if err := f.err("enroll device " + e.DeviceID); err != nil {
		return registry.Device{}, err
	}
	return f.Store.Enroll(ctx, e)
}

func (f *faultStore) Renew(ctx context.Context, r registry.Renewal) (registry.Device, error) {
	if err := f.err("renew device " + r.DeviceID); err != nil {
		return registry.Device{}, err
	}
	return f.Store.Renew(ctx, r)
}

func (f *faultStore) RevokeDevice(ctx context.Context, id string, reason int, now time.Time, actor string) (registry.RevokeResult, error) {
	if err := f.err("revoke device " + id); err != nil {
		return registry.RevokeResult{}, err
	}
	return f.Store.RevokeDevice(ctx, id, reason, now, actor)
}

func (f *faultStore) AppendAudit(ctx context.Context, ev registry.AuditEvent) error {
	if err := f.err("append audit event"); err != nil {
		return err
	}
	return f.Store.AppendAudit(ctx, ev)
}

func (f *faultStore) TouchLastSeen(ctx context.Context, seen map[string]time.Time) error {
	if err := f.err("touch last seen"); err != nil {
		return err
	}
	return f.Store.TouchLastSeen(ctx, seen)
}

// diskError is what a failed bbolt write looks like: a *PathError naming
// the file, which must not reach clients.
func diskError(errno syscall.Errno) error {
	return &fs.PathError{Op: "write", Path: "/secret/fleetgate/registry.db", Err: errno}
}

// A full, read-only or failing disk (or a closed registry) answers writes
// with 503, Retry-After and a plain-text reason without paths; nothing is
// recorded, the gateway keeps serving, and the same request succeeds once
// the fault clears.
func TestStorageFaults(t *testing.T) {
	fault := &faultStore{}
	e := newEnv(t, func(c *server.Config) {
		c.WrapStore = func(s registry.Store) registry.Store { fault.Store = s; return fault }
	})
	ctx := context.Background()
	key := pkitest.Key(t)
	enrolled, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(t, key, "online-1"), "online-1", e.token(t, "online-1", ""))
	if err != nil {
		t.Fatal(err)
	}
	online := &tls.Config{Certificates: []tls.Certificate{pkitest.TLSCert(enrolled, key, e.ca.Cert)}}

	cases := []struct {
		name   string
		err    error
		reason string
	}{
		{"disk full", diskError(syscall.ENOSPC), "no space left on device"},
		{"disk read-only", diskError(syscall.EROFS), "read-only file system"},
		{"disk failing", diskError(syscall.EIO), "input/output error"},
		{"quota exceeded", diskError(syscall.EDQUOT), "disk quota exceeded"},
		{"registry closed", registry.ErrClosed, "registry closed"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := fmt.Sprintf("dev-%d", i)
			tok := e.token(t, id, "")
			csr := pkitest.CSR(t, pkitest.Key(t), id)
			before := e.snapshot(t)
			fault.set(tc.err)
			defer fault.clear()

			_, err := e.est(nil).SimpleEnroll(ctx, csr, id, tok)
			checkUnavailable(t, "EST simpleenroll", err, tc.reason)
			_, err = e.admin.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: []string{"later-" + id}})
			checkUnavailable(t, "admin token create", err, tc.reason)
			_, err = e.admin.Revoke(ctx, "online-1", "keyCompromise")
			checkUnavailable(t, "admin revoke", err, tc.reason)
			if ra := e.adminRetryAfter(t, `{"device_ids":["raw-`+id+`"]}`); ra != "30" {
				t.Errorf("admin 503 with Retry-After %q, want 30", ra)
			}

			// Still serving: health, the CRL, MQTT for enrolled devices.
			if _, err := e.est(nil).CRL(ctx); err != nil {
				t.Errorf("CRL during the fault: %v", err)
			}
			if err := e.mqttConnect("online-1", online.Clone()); err != nil {
				t.Errorf("MQTT during the fault: %v", err)
			}
			fault.clear()
			if after := e.snapshot(t); after != before {
				t.Errorf("failed writes changed the registry:\nbefore %s\nafter  %s", before, after)
			}
			// The token was not consumed: the same request now succeeds.
			if _, err := e.est(nil).SimpleEnroll(ctx, csr, id, tok); err != nil {
				t.Fatalf("enroll after the fault cleared: %v", err)
			}
		})
	}
	if n := value(e.srv.Metrics().Enrollments.WithLabelValues("registry_unavailable")); n != float64(len(cases)) {
		t.Errorf("registry_unavailable enrollments %v, want %d", n, len(cases))
	}
}

func checkUnavailable(t *testing.T, what string, err error, reason string) {
	t.Helper()
	var (
		estErr   *est.Error
		adminErr *adminapi.Error
		status   int
		msg      string
		retry    time.Duration
	)
	switch {
	case errors.As(err, &estErr):
		status, msg, retry = estErr.StatusCode, estErr.Message, estErr.RetryAfter
	case errors.As(err, &adminErr):
		// The admin client keeps no Retry-After; adminRetryAfter checks it.
		status, msg, retry = adminErr.StatusCode, adminErr.Message, time.Second
	default:
		t.Fatalf("%s: %v, want HTTP 503", what, err)
	}
	if status != http.StatusServiceUnavailable || retry <= 0 {
		t.Errorf("%s: status %d, Retry-After %v; want 503 with Retry-After", what, status, retry)
	}
	if !strings.Contains(msg, "registry unavailable: "+reason) {
		t.Errorf("%s: reason %q does not say %q", what, msg, reason)
	}
	if strings.Contains(msg, "/secret") || strings.Contains(msg, "registry.db") {
		t.Errorf("%s: reason %q leaks a path", what, msg)
	}
}

// mountTmpfs mounts a small tmpfs at a new directory, for tests that need
// a real full or read-only file system. It skips without the privilege:
// CI must not depend on it.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// startIn runs a gateway on an existing data dir, like newEnv.
func startIn(t *testing.T, l pki.Layout) (*server.Server, *adminapi.Client, *x509.CertPool) {
	t.Helper()
	srv, err := server.New(context.Background(), server.Config{DataDir: l.Dir, MQTTListen: "127.0.0.1:0", ESTListen: "127.0.0.1:0", AdminListen: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	tlsConf, err := adminapi.OperatorTLS(l)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := pki.ReadCertsFile(l.CABundle())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return srv, adminapi.NewClient("https://"+srv.Addr("admin"), tlsConf), pool
}

// A real full disk (a small tmpfs): bbolt's commit fails with ENOSPC,
// the client gets 503, the registry holds nothing of the failed
// enrollment and passes its consistency check, and the same token
// enrolls once there is space again.
func TestFullDisk(t *testing.T) {
	dir := mountTmpfs(t, "4m")
	l := pki.Layout{Dir: filepath.Join(dir, "data")}
	if err := os.Mkdir(l.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := pki.Init(l, pki.InitOptions{Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	srv, admin, pool := startIn(t, l)
	ctx := context.Background()
	ids := make([]string, 300)
	for i := range ids {
		ids[i] = fmt.Sprintf("full-%03d", i)
	}
	grants, err := admin.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: ids})
	if err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	fill(t, filler)

	client := est.NewClient("https://"+srv.Addr("est"), pool, nil)
	failedAt, ok := -1, 0
	var failedCSR []byte
	for i, g := range grants.Tokens {
		csr := pkitest.CSR(t, pkitest.Key(t), g.DeviceID)
		_, err := client.SimpleEnroll(ctx, csr, g.DeviceID, g.Token)
		if err == nil {
			ok++
			continue
		}
		checkUnavailable(t, "enroll on a full disk", err, "no space left on device")
		failedAt, failedCSR = i, csr
		break
	}
	if failedAt < 0 {
		t.Fatalf("%d enrollments on a full disk all succeeded", ok)
	}
	t.Logf("disk full: %d enrollments fit in the registry's free pages, number %d got 503", ok, failedAt+1)
	victim := grants.Tokens[failedAt]
	if _, err := admin.Device(ctx, victim.DeviceID); !adminapi.IsStatus(err, http.StatusNotFound) {
		t.Fatalf("device of the failed enrollment: %v, want 404", err)
	}
	if _, err := admin.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: []string{"one-more"}}); err == nil {
		t.Log("a token still fit on the full disk")
	} else {
		checkUnavailable(t, "token on a full disk", err, "no space left on device")
	}
	resp, err := client.HTTP.Get("https://" + srv.Addr("est") + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz on a full disk: %v", err)
	}
	resp.Body.Close()

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if _, err := client.SimpleEnroll(ctx, failedCSR, victim.DeviceID, victim.Token); err != nil {
		t.Fatalf("the same token after space came back: %v", err)
	}
	devs, err := admin.Devices(ctx, "", "full-", "", 0)
	if err != nil || len(devs.Devices) != ok+1 {
		t.Fatalf("%d devices recorded (%v), want %d", len(devs.Devices), err, ok+1)
	}
	srv.Close()
	st, err := boltdb.Open(l.Registry(), boltdb.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Check(); err != nil {
		t.Fatalf("registry after the full disk: %v", err)
	}
}

// fill writes path until the file system is full.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := bytes.Repeat([]byte{0xff}, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return
		}
	}
}

// A data dir on a read-only file system is refused at start with a message
// that says so, not with bbolt's error.
func TestReadOnlyDataDirRefusedAtStart(t *testing.T) {
	dir := mountTmpfs(t, "4m")
	l := pki.Layout{Dir: filepath.Join(dir, "data")}
	if err := os.Mkdir(l.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := pki.Init(l, pki.InitOptions{Hosts: []string{"localhost"}}); err != nil {
		t.Fatal(err)
	}
	// A registry exists: the gateway ran here before the disk went read-only.
	srv, _, _ := startIn(t, l)
	srv.Close()
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Skipf("cannot remount read-only: %v", err)
	}
	_, err := server.New(context.Background(), server.Config{DataDir: l.Dir, MQTTListen: "127.0.0.1:0", ESTListen: "127.0.0.1:0", AdminListen: "127.0.0.1:0"}, nil)
	if err == nil || !strings.Contains(err.Error(), "data dir "+l.Dir+" is read-only") {
		t.Fatalf("start on a read-only data dir: %v", err)
	}
	t.Logf("refused: %v", err)
}

// adminRetryAfter posts a token request with a plain HTTP client and
// returns the answer's Retry-After header.
func (e *env) adminRetryAfter(t *testing.T, body string) string {
	t.Helper()
	tlsConf, err := adminapi.OperatorTLS(e.layout)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}
	resp, err := c.Post("https://"+e.srv.Addr("admin")+adminapi.PathTokens, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("raw admin request: status %d, want 503", resp.StatusCode)
	}
	return resp.Header.Get("Retry-After")
}
