package identity_test

import (
	"errors"
	"net/url"
	"testing"

	"github.com/fleetgate/fleetgate/pkg/identity"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		uri  string
		want identity.Identity
		err  error
	}{
		{"device", "spiffe://fleet.example/device/sensor-1", identity.Device("fleet.example", "sensor-1"), nil},
		{"service", "spiffe://fleet.example/service/backend", identity.Service("fleet.example", "backend"), nil},
		{"operator", "spiffe://fleet.example/operator/admin", identity.Operator("fleet.example", "admin"), nil},
		{"percent-encoded slash refused", "spiffe://fleet.example/device%2Fx", identity.Identity{}, identity.ErrNoIdentity},
		{"percent-encoded name refused", "spiffe://fleet.example/device/sensor%2D1", identity.Identity{}, identity.ErrNoIdentity},
		{"unknown role refused", "spiffe://fleet.example/admin/x", identity.Identity{}, identity.ErrNoIdentity},
		{"extra path level refused", "spiffe://fleet.example/device/a/b", identity.Identity{}, identity.ErrInvalidName},
		{"other scheme refused", "https://fleet.example/device/a", identity.Identity{}, identity.ErrNoIdentity},
		{"port refused", "spiffe://fleet.example:8443/device/a", identity.Identity{}, identity.ErrNoIdentity},
		{"query refused", "spiffe://fleet.example/device/a?x=1", identity.Identity{}, identity.ErrNoIdentity},
		{"upper-case name refused", "spiffe://fleet.example/device/Sensor", identity.Identity{}, identity.ErrInvalidName},
		{"bad trust domain refused", "spiffe://Fleet.Example/device/a", identity.Identity{}, identity.ErrInvalidTrustDomain},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u, err := url.Parse(tc.uri)
			if err != nil {
				t.Fatal(err)
			}
			got, err := identity.Parse(u)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Parse = %+v, %v; want %+v", got, err, tc.want)
			}
			if got.String() != tc.uri {
				t.Errorf("String() = %q, want %q", got.String(), tc.uri)
			}
		})
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "sensor-0042", "pi_4.b", "0", "a234567890123456789012345678901234567890123456789012345678901234"[:63]} {
		if err := identity.ValidateName(ok); err != nil || !identity.ValidDeviceID(ok) {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", ".a", "A", "a/b", "a+", "a#", "a b", "é", "a234567890123456789012345678901234567890123456789012345678901234"} {
		if err := identity.ValidateName(bad); err == nil || identity.ValidDeviceID(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
}
