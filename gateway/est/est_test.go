package est_test

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/gateway/authority"
	gwest "github.com/fleetgate/fleetgate/gateway/est"
	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
	"github.com/fleetgate/fleetgate/pkg/registry"
)

func TestStatusOf(t *testing.T) {
	disk := func(e syscall.Errno) error {
		return fmt.Errorf("enroll device %q: %w", "d", &fs.PathError{Op: "write", Path: "/data/registry.db", Err: e})
	}
	for _, tc := range []struct {
		err  error
		want int
	}{
		{fmt.Errorf("check: %w", registry.ErrTokenInvalid), http.StatusUnauthorized},
		{&authority.LockoutError{DeviceID: "d", Wait: time.Minute}, http.StatusTooManyRequests},
		{disk(syscall.ENOSPC), http.StatusServiceUnavailable},
		{disk(syscall.EROFS), http.StatusServiceUnavailable},
		{disk(syscall.EIO), http.StatusServiceUnavailable},
		{fmt.Errorf("x: %w", registry.ErrClosed), http.StatusServiceUnavailable},
		{context.DeadlineExceeded, http.StatusServiceUnavailable},
		{disk(syscall.EPERM), http.StatusInternalServerError},
		{errors.New("boom"), http.StatusInternalServerError},
	} {
		if got := gwest.StatusOf(tc.err); got != tc.want {
			t.Errorf("StatusOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

// fakeCA refuses every enrollment with err.
type fakeCA struct {
	certs []*x509.Certificate
	err   error
}

func (f fakeCA) Enroll(context.Context, string, string, *x509.CertificateRequest) (*x509.Certificate, error) {
	return nil, f.err
}

func (f fakeCA) Reenroll(context.Context, *x509.Certificate, *x509.CertificateRequest) (*x509.Certificate, error) {
	return nil, f.err
}
func (f fakeCA) CACerts() []*x509.Certificate { return f.certs }
func (f fakeCA) CRL() *authority.CRL          { return &authority.CRL{} }

func enroll(t *testing.T, h http.Handler, remote string) *httptest.ResponseRecorder {
	t.Helper()
	csr := est.EncodeCSR(pkitest.CSR(t, pkitest.Key(t), "d"))
	r := httptest.NewRequest(http.MethodPost, est.PathEnroll, strings.NewReader(string(csr)))
	r.RemoteAddr = remote
	r.SetBasicAuth("d", "token")
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func TestHandlerAnswers(t *testing.T) {
	f := pkitest.New(t)
	certs := []*x509.Certificate{f.Issuing.Cert}

	t.Run("lockout: 429 with the lockout's Retry-After", func(t *testing.T) {
		h, err := gwest.NewHandler(gwest.Config{Authority: fakeCA{certs, &authority.LockoutError{DeviceID: "d", Wait: 90 * time.Second}}})
		if err != nil {
			t.Fatal(err)
		}
		w := enroll(t, h, "192.0.2.1:1")
		if w.Code != http.StatusTooManyRequests || w.Header().Get("Retry-After") != "90" {
			t.Fatalf("status %d Retry-After %q", w.Code, w.Header().Get("Retry-After"))
		}
	})
	t.Run("full disk: 503 without the path", func(t *testing.T) {
		err := fmt.Errorf("enroll: %w", &fs.PathError{Op: "write", Path: "/secret/registry.db", Err: syscall.ENOSPC})
		h, _ := gwest.NewHandler(gwest.Config{Authority: fakeCA{certs, err}})
		w := enroll(t, h, "192.0.2.1:1")
		body := w.Body.String()
		if w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" ||
			!strings.Contains(body, "registry unavailable: no space left on device") || strings.Contains(body, "/secret") {
			t.Fatalf("status %d Retry-After %q body %q", w.Code, w.Header().Get("Retry-After"), body)
		}
		if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
			t.Errorf("content type %q", ct)
		}
	})
	t.Run("per-source rate", func(t *testing.T) {
		h, _ := gwest.NewHandler(gwest.Config{
			Authority:  fakeCA{certs, registry.ErrTokenInvalid},
			EnrollRate: limit.Rate{PerSecond: 0.001, Burst: 2},
		})
		codes := []int{}
		for range 3 {
			codes = append(codes, enroll(t, h, "192.0.2.1:1000").Code)
		}
		codes = append(codes, enroll(t, h, "192.0.2.2:1000").Code)
		want := []int{401, 401, 429, 401}
		if fmt.Sprint(codes) != fmt.Sprint(want) {
			t.Fatalf("statuses %v, want %v", codes, want)
		}
		w := enroll(t, h, "192.0.2.1:1000")
		if ra := w.Header().Get("Retry-After"); ra == "" || !strings.Contains(w.Body.String(), "too many requests") {
			t.Fatalf("429 with Retry-After %q and body %q", ra, w.Body.String())
		}
		r := httptest.NewRequest(http.MethodGet, "/healthz", nil)
		r.RemoteAddr = "192.0.2.1:1000"
		hw := httptest.NewRecorder()
		h.ServeHTTP(hw, r)
		if hw.Code != http.StatusOK {
			t.Fatalf("healthz rate limited: %d", hw.Code)
		}
	})
}
