package topic_test

import (
	"testing"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/topic"
)

func TestAllowed(t *testing.T) {
	const (
		dev = identity.RoleDevice
		svc = identity.RoleService
		op  = identity.RoleOperator
		pub = topic.Publish
		sub = topic.Subscribe
	)
	tests := []struct {
		name  string
		role  identity.Role
		topic string
		act   topic.Action
		want  bool
	}{
		{"device publishes own telemetry", dev, "devices/a/telemetry", pub, true},
		{"device publishes own telemetry subtopic", dev, "devices/a/telemetry/temp/1", pub, true},
		{"device publishes own state", dev, "devices/a/state", pub, true},
		{"device may not publish below state", dev, "devices/a/state/x", pub, false},
		{"device may not publish another device's telemetry", dev, "devices/b/telemetry", pub, false},
		{"device may not publish presence", dev, "devices/a/presence", pub, false},
		{"device may not publish commands", dev, "devices/a/commands", pub, false},
		{"device may not publish outside devices/", dev, "a/telemetry", pub, false},
		{"device may not publish $SYS", dev, "$SYS/broker/uptime", pub, false},
		{"device subscribes own commands", dev, "devices/a/commands", sub, true},
		{"device subscribes own commands subtree", dev, "devices/a/commands/#", sub, true},
		{"device subscribes own commands with +", dev, "devices/a/commands/+", sub, true},
		{"device may not subscribe another device's commands", dev, "devices/b/commands", sub, false},
		{"device may not wildcard the device level", dev, "devices/+/commands", sub, false},
		{"device may not subscribe devices/#", dev, "devices/#", sub, false},
		{"device may not subscribe #", dev, "#", sub, false},
		{"device may not subscribe its whole subtree", dev, "devices/a/#", sub, false},
		{"device may not wildcard the kind level", dev, "devices/a/+", sub, false},
		{"device may not read its own telemetry", dev, "devices/a/telemetry", sub, false},
		{"device may not use shared subscriptions", dev, "$share/g/devices/a/commands", sub, false},
		{"device may not subscribe $SYS", dev, "$SYS/#", sub, false},
		{"device name prefix is not the device", dev, "devices/ab/commands", sub, false},

		{"service subscribes all telemetry", svc, "devices/+/telemetry", sub, true},
		{"service subscribes all telemetry subtrees", svc, "devices/+/telemetry/#", sub, true},
		{"service subscribes one device's telemetry", svc, "devices/a/telemetry", sub, true},
		{"service subscribes state", svc, "devices/+/state", sub, true},
		{"service subscribes presence", svc, "devices/+/presence", sub, true},
		{"service subscribes presence with trailing #", svc, "devices/+/presence/#", sub, true},
		{"service shared subscription", svc, "$share/workers/devices/+/telemetry", sub, true},
		{"service shared subscription without group", svc, "$share//devices/+/telemetry", sub, false},
		{"service shared subscription to #", svc, "$share/g/#", sub, false},
		{"service may not subscribe devices/#", svc, "devices/#", sub, false},
		{"service may not subscribe #", svc, "#", sub, false},
		{"service may not wildcard the kind", svc, "devices/+/+", sub, false},
		{"service may not read commands", svc, "devices/+/commands", sub, false},
		{"service may not subscribe $SYS", svc, "$SYS/#", sub, false},
		{"service may not use an invalid device level", svc, "devices/A/telemetry", sub, false},
		{"service publishes commands", svc, "devices/a/commands", pub, true},
		{"service publishes command subtopic", svc, "devices/a/commands/reboot", pub, true},
		{"service may not publish telemetry", svc, "devices/a/telemetry", pub, false},
		{"service may not publish presence", svc, "devices/a/presence", pub, false},
		{"service may not publish commands to an invalid id", svc, "devices/../commands", pub, false},

		{"operator has no MQTT rights", op, "devices/+/telemetry", sub, false},
		{"empty topic", dev, "", pub, false},
		{"two levels only", dev, "devices/a", pub, false},
		{"empty device level", svc, "devices//telemetry", sub, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := topic.Allowed(tc.role, "a", tc.topic, tc.act); got != tc.want {
				t.Errorf("Allowed(%s a, %q, %v) = %v, want %v", tc.role, tc.topic, tc.act, got, tc.want)
			}
		})
	}
}

func TestTopicNames(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{topic.Telemetry("s-1"), "devices/s-1/telemetry"},
		{topic.State("s-1"), "devices/s-1/state"},
		{topic.Commands("s-1"), "devices/s-1/commands"},
		{topic.Presence("s-1"), "devices/s-1/presence"},
	} {
		if tc.got != tc.want {
			t.Errorf("%q, want %q", tc.got, tc.want)
		}
	}
	if !topic.Allowed(identity.RoleDevice, "s-1", topic.Telemetry("s-1"), topic.Publish) {
		t.Error("device may not publish to its own telemetry topic")
	}
}

func BenchmarkAllowedDelivery(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		topic.Allowed(identity.RoleService, "backend", "devices/sensor-0042/telemetry", topic.Subscribe)
	}
}

// FuzzAllowed checks the ACL's safety property on arbitrary topics: a device
// is never allowed anything outside its own subtree, and nothing panics.
func FuzzAllowed(f *testing.F) {
	for _, s := range []string{"devices/a/telemetry", "devices/+/commands", "#", "$share/g/devices/+/telemetry", "devices/a/commands/#", "devices//state"} {
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, s string, publish bool) {
		act := topic.Subscribe
		if publish {
			act = topic.Publish
		}
		if topic.Allowed(identity.RoleDevice, "a", s, act) {
			if len(s) < len("devices/a/") || s[:len("devices/a/")] != "devices/a/" {
				t.Fatalf("device a allowed %q", s)
			}
		}
		topic.Allowed(identity.RoleService, "svc", s, act)
		if topic.Allowed(identity.RoleOperator, "op", s, act) {
			t.Fatalf("operator allowed %q", s)
		}
	})
}
