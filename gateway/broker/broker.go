// Package broker is the gateway's MQTT broker: mochi-mqtt behind a mutual
// TLS listener, with hooks that bind each session to the identity in its
// certificate, enforce the topic ACL, keep presence topics and cut revoked
// devices off.
package broker

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/metrics"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/topic"
)

// Defaults.
const (
	DefaultConnectTimeout = 10 * time.Second
	// DefaultMaxKeepalive caps the keepalive a client may ask for; 0
	// (no keepalive) is raised to it, so dead peers are always found.
	DefaultMaxKeepalive = 5 * time.Minute
	// DefaultMaxPacketSize bounds every MQTT packet.
	DefaultMaxPacketSize = 256 << 10
	// DefaultMaxSessionExpiry bounds how long an offline session is kept.
	DefaultMaxSessionExpiry = 24 * time.Hour
	// DefaultMaxPayload bounds the payload of a device's PUBLISH:
	// telemetry and state are small JSON documents.
	DefaultMaxPayload = 64 << 10
)

// Default abuse limits. A site behind one NAT address is many devices, so
// the per-source connect rate is generous: it only stops one address from
// spending the gateway's CPU on handshakes (a full mutual-TLS connect costs
// ~0.35 ms). A device publishes a sample every few seconds; 100 messages a
// second with bursts of 200 leaves room for catching up after an outage.
var (
	DefaultConnectRate = limit.Rate{PerSecond: 100, Burst: 200}
	DefaultPublishRate = limit.Rate{PerSecond: 100, Burst: 200}
)

// Config configures a Broker.
type Config struct {
	// Listener is where MQTT clients connect (raw TCP; the broker adds TLS).
	Listener net.Listener
	// TLS must require and verify client certificates.
	TLS *tls.Config
	// TrustDomain of the identities admitted.
	TrustDomain string
	// ConnectTimeout bounds the TLS handshake plus the CONNECT packet.
	ConnectTimeout time.Duration
	// MaxKeepalive caps client keepalives.
	MaxKeepalive time.Duration
	// MaxPacketSize bounds every packet; a larger one closes the
	// connection.
	MaxPacketSize uint32
	// MaxInflight is each session's store of unacknowledged QoS 1/2
	// messages (mochi's default, 8192, when 0).
	MaxInflight uint16
	// DeviceWriteQueue and ServiceWriteQueue are the messages waiting to
	// be written to one device or service session
	// (DefaultDeviceWriteQueue and DefaultServiceWriteQueue when 0). A
	// message that finds its subscriber's queue full is dropped and
	// counted (fleetgate_mqtt_queue_dropped_total); device QoS 1
	// publishes wait for a congested service instead (see backpressure).
	DeviceWriteQueue  int
	ServiceWriteQueue int
	// MaxPayload bounds the payload of a device's PUBLISH
	// (DefaultMaxPayload when 0, none when negative).
	MaxPayload int
	// ConnectRate limits new connections per source address
	// (DefaultConnectRate when zero; limit.Off for none). Connections over
	// it are closed before the TLS handshake. With it off, one source's
	// handshakes in flight are not capped either.
	ConnectRate limit.Rate
	// MaxHandshakes bounds the TLS handshakes in flight
	// (limit.DefaultMaxHandshakes when 0).
	MaxHandshakes int
	// PublishRate limits each device session's publishes
	// (DefaultPublishRate when zero; limit.Off for none).
	PublishRate limit.Rate
	// OnSeen is called when a device connects or disconnects.
	OnSeen func(deviceID string, t time.Time)
	// Revoked reports whether a certificate is revoked; it closes the gap
	// between a session's handshake and its registration for Disconnect.
	Revoked func(*x509.Certificate) bool
	Logger  *slog.Logger
	Metrics *metrics.Metrics
}

// Broker is the MQTT side of the gateway.
type Broker struct {
	srv  *mqtt.Server
	hook *hook
	addr net.Addr
	log  *slog.Logger
}

// New builds a broker on cfg.Listener. Call Serve to start it.
func New(cfg Config) (*Broker, error) {
	if cfg.Listener == nil || cfg.TLS == nil {
		return nil, errors.New("broker: listener and TLS config are required")
	}
	if cfg.TLS.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, errors.New("broker: TLS config must require and verify client certificates")
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.MaxKeepalive <= 0 {
		cfg.MaxKeepalive = DefaultMaxKeepalive
	}
	if cfg.MaxPacketSize == 0 {
		cfg.MaxPacketSize = DefaultMaxPacketSize
	}
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.DeviceWriteQueue <= 0 {
		cfg.DeviceWriteQueue = DefaultDeviceWriteQueue
	}
	if cfg.ServiceWriteQueue <= 0 {
		cfg.ServiceWriteQueue = DefaultServiceWriteQueue
	}
	cfg.ConnectRate = cfg.ConnectRate.Or(DefaultConnectRate)
	cfg.PublishRate = cfg.PublishRate.Or(DefaultPublishRate)
	for name, r := range map[string]limit.Rate{"connect rate": cfg.ConnectRate, "publish rate": cfg.PublishRate} {
		if err := r.Validate(); err != nil {
			return nil, fmt.Errorf("broker: %s: %w", name, err)
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New()
	}
	log := cfg.Logger.With("component", "broker")

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = cfg.MaxPacketSize
	caps.MaximumSessionExpiryInterval = uint32(DefaultMaxSessionExpiry / time.Second)
	// No cap on retained messages' age: mochi would otherwise delete a
	// device's retained "online" presence after a day online.
	caps.MaximumMessageExpiryInterval = 0
	if cfg.MaxInflight > 0 {
		caps.MaximumInflight = cfg.MaxInflight
	}
	const serviceWriteBatch = 16 << 10
	srv := mqtt.New(&mqtt.Options{
		Capabilities: caps,
		InlineClient: true,
		// mochi gathers a client's writes while more are queued for it, up
		// to this many bytes per write: a service receiving the fleet's
		// telemetry gets it in one TLS record and one system call per
		// 16 KiB instead of per 2 KiB. The buffer exists only while
		// writes are queued.
		ClientNetWriteBufferSize: serviceWriteBatch,
		// mochi logs every client error at warn; ours are counted in
		// metrics, so keep its own log to errors.
		Logger: slog.New(quietHandler{log.Handler()}),
	})
	h := &hook{
		srv:          srv,
		td:           cfg.TrustDomain,
		maxKeepalive: uint16(min(cfg.MaxKeepalive/time.Second, 65535)),
		onSeen:       cfg.OnSeen,
		revoked:      cfg.Revoked,
		log:          log,
		m:            cfg.Metrics,
		current:      make(map[string]*mqtt.Client),
		maxPayload:   cfg.MaxPayload,
		publishRate:  cfg.PublishRate,
		// A service counts as congested with half its in-flight store or
		// write queue taken: the other half absorbs presence and QoS 0.
		gate: newGate(min(int(caps.MaximumInflight), cfg.ServiceWriteQueue) / 2),
	}
	h.gate.onStuck = func(cl *mqtt.Client) {
		log.Warn("service stopped acknowledging; device publishes no longer wait for it", "client", cl.ID, "unacknowledged", cl.State.Inflight.Len())
	}
	if err := setHousekeeping(srv, housekeepingPeriod); err != nil {
		// Not fatal: mochi keeps its one-second sweeps, which cost CPU,
		// not correctness.
		log.Warn("cannot slow mochi's expiry sweeps; an idle gateway spends more CPU", "error", err)
	}
	if err := srv.AddHook(h, nil); err != nil {
		return nil, fmt.Errorf("broker: add hook: %w", err)
	}
	// mochi counts the messages it drops for a subscriber without calling
	// a hook: expose its counters so no drop is silent.
	for name, v := range map[string]*int64{
		"fleetgate_mqtt_inflight_dropped_total": &srv.Info.InflightDropped,
		"fleetgate_mqtt_queue_dropped_total":    &srv.Info.MessagesDropped,
	} {
		_ = cfg.Metrics.Registry.Register(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: name, Help: "Messages the broker dropped for a subscriber (in-flight store or write queue full).",
		}, func() float64 { return float64(atomic.LoadInt64(v)) }))
	}
	// The handshake deadline stays on the connection, so the TLS handshake
	// and the CONNECT packet together must arrive within ConnectTimeout
	// (mochi sets no deadline before CONNECT: an idle socket would stay
	// open forever, and a CONNECT trickled one byte at a time would too).
	m := cfg.Metrics
	l := limit.NewListener(cfg.Listener, limit.ListenerConfig{
		Name:          "mqtt",
		TLS:           pki.LeafClientAuth(cfg.TLS),
		Timeout:       cfg.ConnectTimeout,
		KeepDeadline:  true,
		WrapConn:      func(c net.Conn) net.Conn { return newBatchConn(c) },
		ConnectRate:   cfg.ConnectRate,
		MaxHandshakes: cfg.MaxHandshakes,
		MaxPerSource:  perSource(cfg.ConnectRate),
		OnHandshakeError: func(_ net.Addr, err error) {
			m.HandshakeFailures.WithLabelValues(HandshakeFailureReason(err)).Inc()
		},
		Logger:  log,
		Metrics: m,
	})
	sl := &sessionListener{
		Net:    listeners.NewNet("mqtt-tls", l),
		caps:   caps,
		td:     cfg.TrustDomain,
		device: int32(min(cfg.DeviceWriteQueue, math.MaxInt32)),
		server: int32(min(cfg.ServiceWriteQueue, math.MaxInt32)),
	}
	if err := srv.AddListener(sl); err != nil {
		return nil, fmt.Errorf("broker: add listener: %w", err)
	}
	return &Broker{srv: srv, hook: h, addr: cfg.Listener.Addr(), log: log}, nil
}

// perSource is the listener's cap on one source's handshakes in flight:
// the default, or none when per-source limits are off (a load generator,
// or clients behind a balancer that hides their addresses).
func perSource(connectRate limit.Rate) int {
	if connectRate.IsOff() {
		return -1
	}
	return 0
}

// Serve starts accepting clients; it returns at once.
func (b *Broker) Serve() error { return b.srv.Serve() }

// Addr is the listener's address.
func (b *Broker) Addr() net.Addr { return b.addr }

// Close disconnects every client and stops the broker.
func (b *Broker) Close() error { return b.srv.Close() }

// Disconnect closes the live session of a device, if any, with MQTT 5
// reason 0x98 (administrative action). It reports whether a live session
// was found.
func (b *Broker) Disconnect(deviceID string) bool {
	b.hook.mu.Lock()
	cl := b.hook.current[deviceID]
	b.hook.mu.Unlock()
	if cl == nil {
		return false
	}
	_ = b.srv.DisconnectClient(cl, packets.ErrAdministrativeAction)
	b.log.Info("session closed", "device", deviceID, "reason", "revoked")
	return true
}

// Revoke closes the live session of a revoked device, like Disconnect, and
// also forgets its stored session (subscriptions, queued and in-flight
// messages), so nothing waits for a device that may never come back. It
// reports whether a live session was closed.
func (b *Broker) Revoke(deviceID string) bool {
	live := b.Disconnect(deviceID)
	if cl, ok := b.srv.Clients.Get(deviceID); ok {
		b.srv.UnsubscribeClient(cl)
		cl.ClearInflights()
		b.srv.Clients.Delete(deviceID)
	}
	return live
}

// HasSession reports whether the broker holds a session for a device, live
// or stored for a client that asked for a persistent one.
func (b *Broker) HasSession(deviceID string) bool {
	_, ok := b.srv.Clients.Get(deviceID)
	return ok
}

// Connected reports whether a device has a live session.
func (b *Broker) Connected(deviceID string) bool {
	b.hook.mu.Lock()
	defer b.hook.mu.Unlock()
	return b.hook.current[deviceID] != nil
}

// Sessions returns the number of live sessions.
func (b *Broker) Sessions() int {
	b.hook.mu.Lock()
	defer b.hook.mu.Unlock()
	return b.hook.sessions
}

// Presence is the payload of a device's retained presence topic.
type Presence struct {
	State string    `json:"state"` // "online" or "offline"
	Time  time.Time `json:"time"`
}

type hook struct {
	mqtt.HookBase
	srv          *mqtt.Server
	td           string
	maxKeepalive uint16
	onSeen       func(string, time.Time)
	revoked      func(*x509.Certificate) bool
	log          *slog.Logger
	m            *metrics.Metrics

	// mu guards current and sessions and orders presence publishes, so
	// the retained presence of a device always ends with its latest state.
	mu sync.Mutex
	// current is each device's live session, so a late disconnect of a
	// taken-over session neither publishes "offline" nor hides the new one.
	current  map[string]*mqtt.Client
	sessions int

	// maxPayload bounds device payloads (<= 0: none).
	maxPayload int
	// publishRate is each device session's publish bucket; devices holds
	// each live device session's *deviceSession by *mqtt.Client (a
	// sync.Map: read on every publish without a shared lock, written once
	// per session).
	publishRate limit.Rate
	devices     sync.Map
	// gate holds device QoS 1/2 publishes while a service is congested.
	gate *gate
}

// servicePrefix starts the internal client ID of every service session.
// Device IDs cannot contain ':', so the two namespaces never meet.
const servicePrefix = "service:"

// clientIdentity recovers the role and name of an admitted client from its
// client ID, which OnConnect bound to the certificate: a device's is its
// device ID, a service's is "service:NAME:ID". It allocates nothing, as
// it runs on every ACL check.
func clientIdentity(clientID string) (identity.Role, string) {
	if rest, ok := strings.CutPrefix(clientID, servicePrefix); ok {
		name, _, _ := strings.Cut(rest, ":")
		return identity.RoleService, name
	}
	return identity.RoleDevice, clientID
}

func (h *hook) ID() string { return "fleetgate" }

func (h *hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck,
		mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnPublish, mqtt.OnPublished, mqtt.OnPacketSent, mqtt.OnPublishDropped, mqtt.OnQosComplete:
		return true
	}
	return false
}

type connectionStater interface {
	ConnectionState() tls.ConnectionState
}

// peerIdentity maps the client's verified certificate to its identity.
// A connection from the gateway's listener carries it, worked out once
// after the handshake (sessionConn); any other connection is mapped here.
func (h *hook) peerIdentity(cl *mqtt.Client) (identity.Identity, *x509.Certificate, string, error) {
	if sc, ok := cl.Net.Conn.(*sessionConn); ok {
		return sc.peer.id, sc.peer.cert, sc.peer.reason, sc.peer.err
	}
	p := identify(cl.Net.Conn, h.td)
	return p.id, p.cert, p.reason, p.err
}

// peer is what a connection's certificate says about its client.
type peer struct {
	id     identity.Identity
	cert   *x509.Certificate
	reason string // metric label when err is set
	err    error
}

// identify maps a connection's verified client certificate to an identity
// of trust domain td.
func identify(c net.Conn, td string) peer {
	cs, ok := c.(connectionStater)
	if !ok {
		return peer{reason: "not_tls", err: errors.New("connection is not TLS")}
	}
	st := cs.ConnectionState()
	if len(st.PeerCertificates) == 0 {
		return peer{reason: "no_client_cert", err: errors.New("no client certificate")}
	}
	id, err := identity.FromCertificate(st.PeerCertificates[0], td)
	if err != nil {
		return peer{reason: "no_identity", err: err}
	}
	return peer{id: id, cert: st.PeerCertificates[0]}
}

// OnConnect admits a client only with a device or service certificate of
// our trust domain and binds its client ID to that identity.
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	id, _, reason, err := h.peerIdentity(cl)
	if err != nil {
		return h.refuse(cl, packets.ErrNotAuthorized, reason, err.Error())
	}
	switch id.Role {
	case identity.RoleDevice:
		// A device's client ID is its device ID, so a stolen certificate
		// cannot take over another device's session.
		if pk.Connect.ClientIdentifier == "" {
			cl.ID = id.Name
			if cl.Properties.ProtocolVersion == 5 {
				cl.Properties.Props.AssignedClientID = id.Name
			}
		} else if cl.ID != id.Name {
			return h.refuse(cl, packets.ErrClientIdentifierNotValid, "client_id_mismatch",
				fmt.Sprintf("client ID %q does not match the certificate's device %q", cl.ID, id.Name))
		}
	case identity.RoleService:
		// Services choose their client IDs freely, inside a namespace of
		// their own.
		cl.ID = servicePrefix + id.Name + ":" + cl.ID
	default:
		return h.refuse(cl, packets.ErrNotAuthorized, "role_not_allowed", fmt.Sprintf("role %s may not use MQTT", id.Role))
	}
	if pk.Connect.WillFlag && !topic.Allowed(id.Role, id.Name, pk.Connect.WillTopic, topic.Publish) {
		return h.refuse(cl, packets.ErrNotAuthorized, "will_not_allowed", fmt.Sprintf("will topic %q not allowed", pk.Connect.WillTopic))
	}
	if cl.State.Keepalive == 0 || cl.State.Keepalive > h.maxKeepalive {
		cl.State.Keepalive = h.maxKeepalive
		cl.State.ServerKeepalive = true
	}
	return nil
}

// refuse answers CONNECT with a refusal code the client's protocol version
// understands. MQTT 3.1.1 has no 0x87: paho would read it as success.
func (h *hook) refuse(cl *mqtt.Client, code packets.Code, reason, detail string) error {
	h.m.ConnectRefusals.WithLabelValues(reason).Inc()
	h.log.Info("connect refused", "client", cl.ID, "remote", cl.Net.Remote, "reason", reason, "detail", detail)
	send := code
	if cl.Properties.ProtocolVersion < 5 && code == packets.ErrNotAuthorized {
		send = packets.Err3NotAuthorized
	}
	_ = h.srv.SendConnack(cl, send, false, nil)
	return code
}

// OnConnectAuthenticate runs only after OnConnect admitted the client; it
// re-checks that the client ID still matches the certificate.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	id, _, _, err := h.peerIdentity(cl)
	if err != nil {
		return false
	}
	role, name := clientIdentity(cl.ID)
	return role == id.Role && name == id.Name
}

func (h *hook) OnACLCheck(cl *mqtt.Client, t string, write bool) bool {
	role, name := clientIdentity(cl.ID)
	act := topic.Subscribe
	if write {
		act = topic.Publish
	}
	if topic.Allowed(role, name, t, act) {
		return true
	}
	if write {
		h.m.ACLDenials.WithLabelValues("publish").Inc()
	} else {
		h.m.ACLDenials.WithLabelValues("subscribe").Inc()
	}
	return false
}

func (h *hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	role, name := clientIdentity(cl.ID)
	h.m.Sessions.Inc()
	h.m.Connects.WithLabelValues(string(role)).Inc()
	h.mu.Lock()
	h.sessions++
	if role == identity.RoleDevice {
		h.current[name] = cl
		h.publishPresence(name, "online")
	}
	h.mu.Unlock()
	if role == identity.RoleService {
		h.gate.addService(cl)
	}
	if role != identity.RoleDevice {
		return
	}
	h.devices.Store(cl, &deviceSession{pacer: limit.NewPacer(h.publishRate)})
	if h.onSeen != nil {
		h.onSeen(name, time.Now())
	}
	// A revocation that landed after this client's handshake but before it
	// became current found nothing to disconnect: look again now.
	if _, cert, _, err := h.peerIdentity(cl); err == nil && h.revoked != nil && h.revoked(cert) {
		_ = h.srv.DisconnectClient(cl, packets.ErrAdministrativeAction)
		h.log.Info("session closed", "device", name, "reason", "revoked")
	}
}

func (h *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	role, name := clientIdentity(cl.ID)
	if v, ok := h.devices.LoadAndDelete(cl); ok {
		h.gate.release(v.(*deviceSession))
	}
	h.gate.removeService(cl)
	h.m.Sessions.Dec()
	h.mu.Lock()
	h.sessions--
	last := role == identity.RoleDevice && h.current[name] == cl
	if last {
		delete(h.current, name)
		h.publishPresence(name, "offline")
	}
	h.mu.Unlock()
	if last && h.onSeen != nil {
		h.onSeen(name, time.Now())
	}
	if err != nil && !errors.Is(err, io.EOF) {
		h.log.Debug("session ended", "client", cl.ID, "error", err)
	}
}

// publishPresence publishes a retained presence message; callers hold h.mu.
func (h *hook) publishPresence(deviceID, state string) {
	payload, _ := json.Marshal(Presence{State: state, Time: time.Now().UTC()})
	if err := h.srv.Publish(topic.Presence(deviceID), payload, true, 1); err != nil {
		h.log.Warn("publish presence", "device", deviceID, "error", err)
	}
}

func (h *hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	h.m.MessagesIn.Inc()
	if pk.FixedHeader.Qos > 0 {
		if v, ok := h.devices.Load(cl); ok {
			h.gate.release(v.(*deviceSession))
		}
	}
}

func (h *hook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, b []byte) {
	if pk.FixedHeader.Type == packets.Publish {
		h.m.MessagesOut.Inc()
	}
}

func (h *hook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	h.m.MessagesDropped.Inc()
	h.log.Warn("message dropped: subscriber queue full", "client", cl.ID, "topic", pk.TopicName)
}
