// Package topic names fleetgate's MQTT topics and decides who may publish
// or subscribe to what.
//
//	devices/{id}/telemetry[/...]  device publishes (own id); services subscribe
//	devices/{id}/state            device publishes, retained (own id); services subscribe
//	devices/{id}/commands[/...]   services publish; device subscribes (own id)
//	devices/{id}/presence         the gateway publishes online/offline; services subscribe
//
// Everything else is denied, including every $-topic. A subscription is
// allowed only if every topic it could ever match is allowed, so a device can
// never use a wildcard that reaches another device.
package topic

import (
	"strings"

	"github.com/fleetgate/fleetgate/pkg/identity"
)

// Prefix is the first level of every device topic.
const Prefix = "devices"

// Kinds of device topic (the third level).
const (
	KindTelemetry = "telemetry"
	KindState     = "state"
	KindCommands  = "commands"
	KindPresence  = "presence"
)

// Telemetry is the topic a device publishes telemetry to.
func Telemetry(id string) string { return Prefix + "/" + id + "/" + KindTelemetry }

// State is the retained state topic of a device.
func State(id string) string { return Prefix + "/" + id + "/" + KindState }

// Commands is the topic a device receives commands on.
func Commands(id string) string { return Prefix + "/" + id + "/" + KindCommands }

// Presence is the retained online/offline topic the gateway keeps for a device.
func Presence(id string) string { return Prefix + "/" + id + "/" + KindPresence }

// Action is what a client wants to do with a topic.
type Action uint8

// Actions checked by Allowed.
const (
	Publish Action = iota + 1
	// Subscribe covers both the subscription filter and each delivery of a
	// message (whose topic name is a filter without wildcards).
	Subscribe
)

// levels walks the levels of a topic or filter without allocating.
type levels struct {
	s    string
	done bool
}

func (l *levels) next() (string, bool) {
	if l.done {
		return "", false
	}
	i := strings.IndexByte(l.s, '/')
	if i < 0 {
		l.done = true
		return l.s, true
	}
	lv := l.s[:i]
	l.s = l.s[i+1:]
	return lv, true
}

// rest returns the levels not yet walked and whether there are any.
func (l *levels) rest() (string, bool) {
	if l.done {
		return "", false
	}
	return l.s, true
}

// Allowed reports whether a client with role and name may perform act on
// topic (a topic name for Publish, a filter for Subscribe).
func Allowed(role identity.Role, name, topic string, act Action) bool {
	if role == identity.RoleService && act == Subscribe {
		if t, ok := strings.CutPrefix(topic, "$share/"); ok {
			group, filter, ok := strings.Cut(t, "/")
			if !ok || group == "" || strings.ContainsAny(group, "+#") {
				return false
			}
			topic = filter
		}
	}
	if topic == "" || topic[0] == '$' {
		return false
	}
	l := levels{s: topic}
	if lv, _ := l.next(); lv != Prefix {
		return false
	}
	id, ok := l.next()
	if !ok {
		return false
	}
	kind, ok := l.next()
	if !ok {
		return false
	}
	rest, hasRest := l.rest()

	switch role {
	case identity.RoleDevice:
		if id != name {
			return false
		}
		switch act {
		case Publish:
			return kind == KindTelemetry || kind == KindState && !hasRest
		case Subscribe:
			return kind == KindCommands
		}
	case identity.RoleService:
		switch act {
		case Publish:
			return kind == KindCommands && identity.ValidDeviceID(id)
		case Subscribe:
			if id != "+" && !identity.ValidDeviceID(id) {
				return false
			}
			switch kind {
			case KindTelemetry:
				return true
			case KindState, KindPresence:
				return !hasRest || rest == "#"
			}
		}
	}
	return false
}
