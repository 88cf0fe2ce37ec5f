// Package metrics holds the gateway's Prometheus collectors. One Metrics is
// made per gateway and handed to each component, so tests can run several
// gateways in one process without a global registry.
package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the gateway's collectors.
type Metrics struct {
	Registry *prometheus.Registry

	// MQTT
	Sessions          prometheus.Gauge
	Connects          *prometheus.CounterVec // by role
	ConnectRefusals   *prometheus.CounterVec // by reason
	HandshakeFailures *prometheus.CounterVec // by reason
	MessagesIn        prometheus.Counter
	MessagesOut       prometheus.Counter
	MessagesDropped   prometheus.Counter
	ACLDenials        *prometheus.CounterVec // by action
	// PublishesThrottled counts device publishes held back by the
	// per-session publish rate; PublishRefusals those refused outright.
	PublishesThrottled prometheus.Counter
	PublishRefusals    *prometheus.CounterVec // by reason
	// PublishesBackpressured counts device QoS 1 publishes held back
	// because a service subscriber had too many messages unacknowledged.
	PublishesBackpressured prometheus.Counter

	// Abuse controls
	RateLimited        *prometheus.CounterVec // by surface
	HandshakesShed     *prometheus.CounterVec // by listener and reason
	HandshakesInFlight *prometheus.GaugeVec   // by listener
	EnrollLockouts     prometheus.Counter

	// Enrollment and revocation
	Enrollments      *prometheus.CounterVec // by result
	Renewals         *prometheus.CounterVec // by result
	EnrollDuration   prometheus.Histogram
	Revocations      prometheus.Counter
	RevokedSerials   prometheus.Gauge
	RevokeDisconnect prometheus.Histogram
	CRLNumber        prometheus.Gauge
}

// New creates the collectors and registers them, with the Go runtime and
// process collectors, in a fresh registry.
func New() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Sessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fleetgate_mqtt_sessions", Help: "Live MQTT sessions.",
		}),
		Connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_connects_total", Help: "Accepted MQTT connections by client role.",
		}, []string{"role"}),
		ConnectRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_connect_refusals_total", Help: "MQTT CONNECTs refused after the TLS handshake, by reason.",
		}, []string{"reason"}),
		HandshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_tls_handshake_failures_total", Help: "Failed TLS handshakes on the MQTT listener by reason.",
		}, []string{"reason"}),
		MessagesIn: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_messages_in_total", Help: "PUBLISH packets accepted from clients.",
		}),
		MessagesOut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_messages_out_total", Help: "PUBLISH packets sent to clients.",
		}),
		MessagesDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_messages_dropped_total", Help: "Messages dropped because a subscriber's queue was full.",
		}),
		ACLDenials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_acl_denials_total", Help: "Publishes and subscriptions denied by the topic ACL.",
		}, []string{"action"}),
		PublishesThrottled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_publishes_throttled_total", Help: "Device publishes delayed because the session exceeded its publish rate.",
		}),
		PublishesBackpressured: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_publishes_backpressured_total", Help: "Device QoS 1 publishes delayed until a congested service subscriber caught up.",
		}),
		PublishRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_mqtt_publish_refusals_total", Help: "Device publishes refused, by reason.",
		}, []string{"reason"}),
		RateLimited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_rate_limited_total", Help: "Requests and connections refused by a per-source rate limit, by surface.",
		}, []string{"surface"}),
		HandshakesShed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_tls_handshakes_shed_total", Help: "Connections closed before their TLS handshake because too many handshakes were in flight, by listener and reason.",
		}, []string{"listener", "reason"}),
		HandshakesInFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fleetgate_tls_handshakes_in_flight", Help: "TLS handshakes running, by listener.",
		}, []string{"listener"}),
		EnrollLockouts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetgate_enroll_lockouts_total", Help: "Device IDs locked out of enrollment after repeated bad tokens.",
		}),
		Enrollments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_enrollments_total", Help: "EST simpleenroll requests by result.",
		}, []string{"result"}),
		Renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetgate_renewals_total", Help: "EST simplereenroll requests by result.",
		}, []string{"result"}),
		EnrollDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "fleetgate_enroll_duration_seconds", Help: "Time to answer a successful enrollment or renewal.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		Revocations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetgate_revocations_total", Help: "Devices revoked.",
		}),
		RevokedSerials: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fleetgate_revoked_serials", Help: "Serials in the in-memory revocation set.",
		}),
		RevokeDisconnect: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "fleetgate_revoke_disconnect_seconds", Help: "Time from a revocation request to its live sessions being closed.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 14),
		}),
		CRLNumber: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fleetgate_crl_number", Help: "Number of the CRL being served.",
		}),
	}
	m.Registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.Sessions, m.Connects, m.ConnectRefusals, m.HandshakeFailures,
		m.MessagesIn, m.MessagesOut, m.MessagesDropped, m.ACLDenials,
		m.PublishesThrottled, m.PublishesBackpressured, m.PublishRefusals,
		m.RateLimited, m.HandshakesShed, m.HandshakesInFlight, m.EnrollLockouts,
		m.Enrollments, m.Renewals, m.EnrollDuration,
		m.Revocations, m.RevokedSerials, m.RevokeDisconnect, m.CRLNumber,
	)
	return m
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{})
}
