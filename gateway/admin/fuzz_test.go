package admin_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/gateway/admin"
	"github.com/fleetgate/fleetgate/gateway/authority"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
	"github.com/fleetgate/fleetgate/pkg/registry"
	"github.com/fleetgate/fleetgate/pkg/registry/boltdb"
)

// fixture is an admin handler over the real authority and a real bbolt
// registry in a temp dir, with one enrolled device, one issued service
// certificate and a client certificate per role.
type fixture struct {
	h       *admin.Handler
	store   *boltdb.Store
	callers []*x509.Certificate // operator, service, device, none (nil)
	serial  string              // the service certificate's serial
	csrPEM  string              // a valid CSR for service "backend-2"
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	ctx := context.Background()
	store, err := boltdb.Open(filepath.Join(t.TempDir(), "registry.db"), boltdb.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// bbolt's habit: every test ends with a consistency check.
		if err := store.Check(); err != nil {
			t.Errorf("registry after the test: %v", err)
		}
		store.Close()
	})
	fx := pkitest.NewDomain(t, pki.DefaultTrustDomain)
	ca, err := authority.New(ctx, authority.Config{Issuer: fx.Issuer, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	grants, err := ca.CreateTokens(ctx, []string{"sensor-1", "sensor-2"}, 0, "fuzz", "operator:admin")
	if err != nil {
		t.Fatal(err)
	}
	devCSR, err := x509.ParseCertificateRequest(pkitest.CSR(t, pkitest.Key(t), "sensor-1"))
	if err != nil {
		t.Fatal(err)
	}
	dev, err := ca.Enroll(ctx, "sensor-1", grants[0].Token, devCSR)
	if err != nil {
		t.Fatal(err)
	}
	svcCSR, err := x509.ParseCertificateRequest(pkitest.CSR(t, pkitest.Key(t), "backend"))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := ca.IssueIdentity(ctx, identity.Service(pki.DefaultTrustDomain, "backend"), svcCSR, 0, "operator:admin")
	if err != nil {
		t.Fatal(err)
	}
	op, _ := fx.Identity(t, identity.Operator(pki.DefaultTrustDomain, "admin"), 0)
	return &fixture{
		h:       admin.NewHandler(admin.Config{Authority: ca, Store: store}),
		store:   store,
		callers: []*x509.Certificate{op, svc, dev, nil},
		serial:  pki.SerialHex(svc),
		csrPEM:  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: pkitest.CSR(t, pkitest.Key(t), "backend-2")})),
	}
}

// routes are the requests the fuzzer can build: a method and a path
// around one fuzzed path segment.
var routes = []struct{ method, prefix, suffix string }{
	{http.MethodPost, adminapi.PathTokens, ""},
	{http.MethodGet, adminapi.PathDevices, ""},
	{http.MethodGet, adminapi.PathDevices + "/", ""},
	{http.MethodPost, adminapi.PathDevices + "/", "/revoke"},
	{http.MethodPost, adminapi.PathCertificates, ""},
	{http.MethodPost, adminapi.PathCertificates + "/", "/revoke"},
	{http.MethodGet, adminapi.PathAudit, ""},
	{http.MethodGet, adminapi.PathCRL, ""},
	{http.MethodPost, "/v1/", ""},
	{http.MethodGet, "/", ""},
}

// serve sends one request as caller (an index into callers) and returns
// the recorded answer.
func (fx *fixture) serve(caller, route uint8, arg, query string, body []byte) (*httptest.ResponseRecorder, string) {
	rt := routes[int(route)%len(routes)]
	u := &url.URL{Path: rt.prefix + arg + rt.suffix, RawQuery: query}
	if rt.prefix == adminapi.PathTokens || rt.prefix == adminapi.PathDevices || rt.prefix == adminapi.PathCertificates ||
		rt.prefix == adminapi.PathAudit || rt.prefix == adminapi.PathCRL {
		u.Path = rt.prefix // no path argument on these routes
	}
	r := httptest.NewRequest(rt.method, "/", bytes.NewReader(body))
	r.URL = u
	r.RequestURI = u.RequestURI()
	r.Header.Set("Content-Type", "application/json")
	r.TLS = &tls.ConnectionState{}
	if c := fx.callers[int(caller)%len(fx.callers)]; c != nil {
		r.TLS.PeerCertificates = []*x509.Certificate{c}
	}
	w := httptest.NewRecorder()
	fx.h.ServeHTTP(w, r)
	return w, rt.method + " " + u.String()
}

// FuzzAdminAPI sends arbitrary JSON bodies, path segments and queries to
// every admin endpoint as every kind of caller: no panic, no 5xx; a refusal
// is a one-line plain-text reason, a success is JSON.
func FuzzAdminAPI(f *testing.F) {
	fx := newFixture(f)
	tok := func(v any) []byte {
		b, _ := json.Marshal(v)
		return b
	}
	f.Add(uint8(0), uint8(0), "", "", tok(adminapi.TokenRequest{DeviceIDs: []string{"sensor-3"}, TTL: "1h", Batch: "line 1"}))
	f.Add(uint8(0), uint8(0), "", "", []byte(`{"device_ids":["sensor-1","sensor-1"]}`))
	f.Add(uint8(0), uint8(0), "", "", []byte(`{"device_ids":["Sensor 1"],"ttl":"-1h"}`))
	f.Add(uint8(0), uint8(0), "", "", []byte(`{"device_ids":["a"],"ttl":"100000h"}`))
	f.Add(uint8(0), uint8(0), "", "", []byte(`{"device_ids":["a"],"unknown":1}`))
	f.Add(uint8(0), uint8(0), "", "", []byte(`{"device_ids":["a"]} {"device_ids":["b"]}`))
	f.Add(uint8(0), uint8(0), "", "", []byte(`{"device_ids":null,"batch":"x\ny"}`))
	f.Add(uint8(0), uint8(0), "", "", []byte(`[`))
	f.Add(uint8(0), uint8(1), "", "status=revoked&limit=10&prefix=sensor&after=sensor-0", []byte{})
	f.Add(uint8(0), uint8(1), "", "limit=0&status=%zz", []byte{})
	f.Add(uint8(0), uint8(2), "sensor-1", "", []byte{})
	f.Add(uint8(0), uint8(2), "..", "", []byte{})
	f.Add(uint8(0), uint8(3), "sensor-1", "", []byte(`{"reason":"keyCompromise"}`))
	f.Add(uint8(0), uint8(3), "sensor-2", "", []byte(`{"reason":"removeFromCRL"}`))
	f.Add(uint8(0), uint8(3), "nobody", "", []byte(`{}`))
	f.Add(uint8(0), uint8(4), "", "", tok(adminapi.CertificateRequest{Role: "service", Name: "backend-2", CSR: fx.csrPEM, TTL: "1h"}))
	f.Add(uint8(0), uint8(4), "", "", tok(adminapi.CertificateRequest{Role: "device", Name: "backend-2", CSR: fx.csrPEM}))
	f.Add(uint8(0), uint8(4), "", "", tok(adminapi.CertificateRequest{Role: "operator", Name: "root", CSR: fx.csrPEM}))
	f.Add(uint8(0), uint8(4), "", "", tok(adminapi.CertificateRequest{Role: "service", Name: "backend-2", CSR: "garbage"}))
	f.Add(uint8(0), uint8(5), fx.serial, "", []byte(`{"reason":"superseded"}`))
	f.Add(uint8(0), uint8(5), "00:"+strings.ToUpper(fx.serial), "", []byte(`{}`))
	f.Add(uint8(0), uint8(5), "000", "", []byte(`{}`))
	f.Add(uint8(0), uint8(6), "", "after=18446744073709551615&device=sensor-1&limit=10000", []byte{})
	f.Add(uint8(0), uint8(6), "", "after=-1", []byte{})
	f.Add(uint8(0), uint8(7), "", "", []byte{})
	f.Add(uint8(0), uint8(8), "backup", "", []byte{})
	f.Add(uint8(1), uint8(1), "", "", []byte{})
	f.Add(uint8(2), uint8(0), "", "", tok(adminapi.TokenRequest{DeviceIDs: []string{"sensor-9"}}))
	f.Add(uint8(3), uint8(3), "sensor-1", "", []byte(`{}`))

	f.Fuzz(func(t *testing.T, caller, route uint8, arg, query string, body []byte) {
		w, req := fx.serve(caller, route, arg, query, body)
		res := w.Result()
		got, ctype := w.Body.String(), res.Header.Get("Content-Type")
		switch {
		case res.StatusCode >= 500:
			t.Fatalf("%s: %d %q", req, res.StatusCode, got)
		case res.StatusCode >= 400:
			if !strings.HasPrefix(ctype, "text/plain") || !strings.HasSuffix(got, "\n") || strings.Count(got, "\n") != 1 {
				t.Fatalf("%s: refusal %d is not one line of text: %s %q", req, res.StatusCode, ctype, got)
			}
		case res.StatusCode >= 300:
			// ServeMux redirects unclean paths; nothing reached a handler.
		case ctype == "application/json":
			if !json.Valid(w.Body.Bytes()) {
				t.Fatalf("%s: %d with invalid JSON %q", req, res.StatusCode, got)
			}
		}
		if int(caller)%len(fx.callers) != 0 && strings.HasPrefix(req, "POST") && res.StatusCode < 300 {
			t.Fatalf("%s: a non-operator changed state: %d %q", req, res.StatusCode, got)
		}
	})
}

// TestAdminAPIRefusesGarbageWith4xx pins a few refusals the fuzzer
// starts from, with their exact status codes.
func TestAdminAPIRefusesGarbageWith4xx(t *testing.T) {
	fx := newFixture(t)
	cases := []struct {
		name          string
		caller, route uint8
		arg, query    string
		body          string
		want          int
	}{
		{"empty body", 0, 0, "", "", "", http.StatusBadRequest},
		{"unknown field", 0, 0, "", "", `{"device_ids":["a"],"admin":true}`, http.StatusBadRequest},
		{"trailing object", 0, 0, "", "", `{"device_ids":["a"]}{}`, http.StatusBadRequest},
		{"invalid device id", 0, 0, "", "", `{"device_ids":["../etc"]}`, http.StatusBadRequest},
		{"token ttl beyond the maximum", 0, 0, "", "", `{"device_ids":["a"],"ttl":"100000h"}`, http.StatusBadRequest},
		{"oversized body", 0, 0, "", "", `{"batch":"` + strings.Repeat("x", adminapi.MaxBodySize) + `"}`, http.StatusRequestEntityTooLarge},
		{"limit out of range", 0, 1, "", "limit=10001", "", http.StatusBadRequest},
		{"unknown device", 0, 2, "nobody", "", "", http.StatusNotFound},
		{"unknown revocation reason", 0, 3, "sensor-1", "", `{"reason":"certificateHold"}`, http.StatusBadRequest},
		{"revoke an invalid id", 0, 3, "A B", "", `{}`, http.StatusBadRequest},
		{"certificate for a device role", 0, 4, "", "", `{"role":"device","name":"x","csr":""}`, http.StatusBadRequest},
		{"certificate with a garbage csr", 0, 4, "", "", `{"role":"service","name":"x","csr":"nope"}`, http.StatusBadRequest},
		{"revoke a serial of zeros", 0, 5, "0000", "", `{}`, http.StatusBadRequest},
		{"revoke a non-hex serial", 0, 5, "xyz", "", `{}`, http.StatusBadRequest},
		{"audit cursor not a number", 0, 6, "", "after=x", "", http.StatusBadRequest},
		{"service on the admin API", 1, 1, "", "", "", http.StatusForbidden},
		{"device on the admin API", 2, 0, "", "", `{"device_ids":["a"]}`, http.StatusForbidden},
		{"no client certificate", 3, 1, "", "", "", http.StatusUnauthorized},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w, req := fx.serve(tc.caller, tc.route, tc.arg, tc.query, []byte(tc.body))
			if w.Code != tc.want {
				t.Fatalf("%s: %d %q, want %d", req, w.Code, w.Body.String(), tc.want)
			}
		})
	}
	// None of the refusals above changed the registry: one enrolled device.
	devs, err := fx.store.Devices(context.Background(), registry.DeviceFilter{})
	if err != nil || len(devs) != 1 || devs[0].Status != registry.StatusActive {
		t.Fatalf("devices after refusals: %+v %v", devs, err)
	}
}
