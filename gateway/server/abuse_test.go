package server_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// value reads a counter or gauge.
func value(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		panic(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

// waitFor polls cond; the timeout only bounds a hung test, it asserts no
// speed.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// keepAlive returns an EST client that reuses its connection, so a test
// of per-request limits is not also a test of the per-connection one.
func (e *env) keepAlive(t testing.TB, cert *tls.Certificate) *est.Client {
	c := e.est(cert)
	c.HTTP.Transport.(*http.Transport).DisableKeepAlives = false
	t.Cleanup(c.HTTP.CloseIdleConnections)
	return c
}

func (e *env) deviceTLS(t testing.TB, id string) *tls.Config {
	t.Helper()
	c, k := e.deviceCert(t, id, e.issuer(time.Now()), time.Hour)
	return &tls.Config{Certificates: []tls.Certificate{pkitest.TLSCert(c, k, e.ca.Cert)}}
}

func limits(mod func(*server.Limits)) func(*server.Config) {
	return func(c *server.Config) { mod(&c.Limits) }
}

// A flood of EST requests from one address: the requests within the
// burst are answered as usual, every other one gets 429 with Retry-After
// and a reason, and enrollment and read budgets are separate.
func TestESTRateLimit(t *testing.T) {
	e := newEnv(t, limits(func(l *server.Limits) {
		l.EnrollRate = limit.Rate{PerSecond: 0.001, Burst: 5}
		l.ESTReadRate = limit.Rate{PerSecond: 0.001, Burst: 3}
	}))
	ctx := context.Background()
	c := e.keepAlive(t, nil)
	csr := pkitest.CSR(t, pkitest.Key(t), "flood-0")
	var unauthorized, limited int
	for i := range 12 {
		// A device ID each: bad tokens for one ID would lock it out.
		_, err := c.SimpleEnroll(ctx, csr, fmt.Sprintf("flood-%d", i), "bad-token")
		var ee *est.Error
		if !errors.As(err, &ee) {
			t.Fatalf("request %d: %v", i, err)
		}
		switch ee.StatusCode {
		case http.StatusUnauthorized:
			unauthorized++
		case http.StatusTooManyRequests:
			limited++
			if ee.RetryAfter < time.Second || !strings.Contains(ee.Message, "too many requests") {
				t.Errorf("429 with Retry-After %v and reason %q", ee.RetryAfter, ee.Message)
			}
		default:
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if unauthorized != 5 || limited != 7 {
		t.Fatalf("12 enrollments: %d answered, %d got 429; want 5 and 7", unauthorized, limited)
	}
	// Reads have their own budget, untouched by the enrollment flood.
	for i := range 4 {
		_, err := c.CACerts(ctx)
		if i < 3 && err != nil {
			t.Fatalf("cacerts %d: %v", i, err)
		}
		if i == 3 && !est.IsStatus(err, http.StatusTooManyRequests) {
			t.Fatalf("4th cacerts: %v, want 429", err)
		}
	}
	resp, err := c.HTTP.Get("https://" + e.srv.Addr("est") + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz under the limit: %v", err)
	}
	resp.Body.Close()
	m := e.srv.Metrics()
	if n := value(m.RateLimited.WithLabelValues("est_enroll")); n != 7 {
		t.Errorf("est_enroll rate-limited counter %v, want 7", n)
	}
	if n := value(m.RateLimited.WithLabelValues("est_read")); n != 1 {
		t.Errorf("est_read rate-limited counter %v, want 1", n)
	}
}

// A client that ignores 429 and opens a connection per request is refused
// before the TLS handshake once it exceeds both budgets together.
func TestESTConnectionRate(t *testing.T) {
	e := newEnv(t, limits(func(l *server.Limits) {
		l.EnrollRate = limit.Rate{PerSecond: 0.001, Burst: 2}
		l.ESTReadRate = limit.Rate{PerSecond: 0.001, Burst: 2}
	}))
	ctx := context.Background()
	var answered, refused int
	for range 8 {
		_, err := e.est(nil).CACerts(ctx) // a connection each
		var ee *est.Error
		switch {
		case err == nil || errors.As(err, &ee):
			answered++
		default:
			refused++
		}
	}
	if answered != 4 || refused != 4 {
		t.Fatalf("8 connections: %d answered, %d refused; want 4 and 4", answered, refused)
	}
	if n := value(e.srv.Metrics().RateLimited.WithLabelValues("est_connect")); n != 4 {
		t.Errorf("est_connect counter %v, want 4", n)
	}
}

// The default limits under a flood from one address, for the record: how
// many of N enrollment attempts were answered and how many got 429. The
// bound is the token bucket's, computed from the elapsed time (no speed is
// asserted).
func TestESTFloodWithDefaults(t *testing.T) {
	if testing.Short() {
		t.Skip("flood")
	}
	e := newEnv(t)
	ctx := context.Background()
	const n, workers = 600, 8
	csr := pkitest.CSR(t, pkitest.Key(t), "x")
	var answered, limited, other atomic.Int64
	next := make(chan int, n)
	for i := range n {
		next <- i
	}
	close(next)
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			c := e.keepAlive(t, nil)
			for i := range next {
				_, err := c.SimpleEnroll(ctx, csr, fmt.Sprintf("flood-%d", i), "bad-token")
				switch {
				case est.IsStatus(err, http.StatusUnauthorized):
					answered.Add(1)
				case est.IsStatus(err, http.StatusTooManyRequests):
					limited.Add(1)
				default:
					other.Add(1)
					t.Errorf("request %d: %v", i, err)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	t.Logf("flood of %d enrollments in %v from one address: %d answered (401), %d refused with 429",
		n, elapsed.Round(time.Millisecond), answered.Load(), limited.Load())
	// At most the burst plus the refill during the flood get through.
	if bound := int64(100 + 50*elapsed.Seconds() + 1); answered.Load() > bound {
		t.Errorf("%d answered, more than the bucket allows (%d)", answered.Load(), bound)
	}
	if limited.Load() == 0 {
		t.Error("no request was rate limited")
	}
}

func TestMQTTConnectRateLimit(t *testing.T) {
	e := newEnv(t, limits(func(l *server.Limits) { l.MQTTConnectRate = limit.Rate{PerSecond: 0.001, Burst: 3} }))
	conf := e.deviceTLS(t, "dev-1")
	ok := 0
	for range 6 {
		s, code, err := e.dialMQTT(t, 4, "dev-1", conf)
		if err == nil {
			s.conn.Close()
			if code == 0 {
				ok++
			}
		}
	}
	if ok != 3 {
		t.Fatalf("%d of 6 connects admitted, want the burst of 3", ok)
	}
	if n := value(e.srv.Metrics().RateLimited.WithLabelValues("mqtt_connect")); n != 3 {
		t.Fatalf("mqtt_connect counter %v, want 3", n)
	}
	if n := value(e.srv.Metrics().HandshakeFailures.WithLabelValues("closed")); n != 0 {
		t.Errorf("%v refused connects reached a TLS handshake", n)
	}
}

// dialFrom opens a raw TCP connection from a loopback address of its own
// (all of 127.0.0.0/8 is loopback on Linux): many sources on one machine.
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Skipf("cannot dial from %s: %v", src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Connections that never speak hold handshake slots until the connect
// deadline; the gateway runs at most MaxHandshakes handshakes, queues a
// few more and sheds the rest at once, and one address can hold only a
// quarter of the slots. Devices connect again when the flood ends.
func TestMQTTHandshakesBounded(t *testing.T) {
	e := newEnv(t, limits(func(l *server.Limits) { l.MaxHandshakes = 4 }), func(c *server.Config) { c.ConnectTimeout = time.Minute })
	m := e.srv.Metrics()
	busy := m.HandshakesShed.WithLabelValues("mqtt", "busy")
	sourceBusy := m.HandshakesShed.WithLabelValues("mqtt", "source_busy")
	inFlight := m.HandshakesInFlight.WithLabelValues("mqtt")

	// One address: one slot (4/4); the second and third are shed.
	var silent []net.Conn
	for range 3 {
		silent = append(silent, dialFrom(t, "127.0.0.1", e.srv.Addr("mqtt")))
	}
	waitFor(t, "2 connections of one source shed", func() bool { return value(sourceBusy) == 2 })
	// Many addresses: 4 run, 16 (4×4) wait, the rest are shed.
	const sources = 40
	for i := range sources {
		silent = append(silent, dialFrom(t, fmt.Sprintf("127.0.1.%d", i+1), e.srv.Addr("mqtt")))
	}
	// 1 + 40 connections want slots: 4 run, 16 wait, 21 are shed.
	waitFor(t, "the surplus shed", func() bool { return value(busy) == 1+sources-4-16 })
	if g := value(inFlight); g != 4 {
		t.Fatalf("%v handshakes in flight, want the cap of 4", g)
	}
	t.Logf("%d silent connections from %d addresses: %v handshakes in flight, %v shed as busy, %v shed as one source's surplus",
		len(silent), sources+1, value(inFlight), value(busy), value(sourceBusy))
	shedBefore := value(busy) + value(sourceBusy)
	if err := e.mqttConnect("dev-1", e.deviceTLS(t, "dev-1")); err == nil {
		t.Fatal("a device got through while every slot and the queue were taken")
	}
	if value(busy)+value(sourceBusy) != shedBefore+1 {
		t.Error("the refused device was not counted as shed")
	}
	for _, c := range silent {
		c.Close()
	}
	waitFor(t, "the slots to drain", func() bool { return value(inFlight) == 0 })
	if err := e.mqttConnect("dev-1", e.deviceTLS(t, "dev-1")); err != nil {
		t.Fatalf("device after the flood: %v", err)
	}
}

// trickle writes data one byte per step until the peer closes the
// connection; it returns how many bytes went out. A concurrent reader
// notices the close.
func trickle(c net.Conn, data []byte, step time.Duration) int {
	closed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, c)
		close(closed)
	}()
	for i := range data {
		select {
		case <-closed:
			return i
		case <-time.After(step):
		}
		if _, err := c.Write(data[i : i+1]); err != nil {
			return i
		}
	}
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
	}
	return len(data)
}

// Slow clients are cut by deadlines that each byte does not extend.
func TestSlowClientsAreCut(t *testing.T) {
	e := newEnv(t, func(c *server.Config) {
		c.ReadHeaderTimeout = 500 * time.Millisecond
		c.ReadTimeout = time.Second
		c.ConnectTimeout = time.Second
	})
	const step = 100 * time.Millisecond
	estTLS := &tls.Config{RootCAs: e.pool, ServerName: "localhost"}

	t.Run("EST request headers trickled byte by byte", func(t *testing.T) {
		c, err := tls.Dial("tcp", e.srv.Addr("est"), estTLS)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		head := []byte("GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + strings.Repeat("a", 300) + "\r\n\r\n")
		if sent := trickle(c, head, step); sent == len(head) {
			t.Fatalf("headers trickled over %v were never cut", time.Duration(len(head))*step)
		} else {
			t.Logf("cut after %d of %d header bytes", sent, len(head))
		}
	})
	t.Run("EST request body trickled byte by byte", func(t *testing.T) {
		c, err := tls.Dial("tcp", e.srv.Addr("est"), estTLS)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		body := []byte(strings.Repeat("A", 300))
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic ZGV2OnRvaw==\r\nContent-Type: application/pkcs10\r\nContent-Length: %d\r\n\r\n", est.PathEnroll, len(body))
		if sent := trickle(c, body, step); sent == len(body) {
			t.Fatalf("a body trickled over %v was never cut", time.Duration(len(body))*step)
		} else {
			t.Logf("cut after %d of %d body bytes", sent, len(body))
		}
	})
	t.Run("MQTT CONNECT trickled byte by byte after the TLS handshake", func(t *testing.T) {
		conf := e.deviceTLS(t, "slow-1")
		conf.RootCAs, conf.ServerName = e.pool, "localhost"
		c, err := tls.Dial("tcp", e.srv.Addr("mqtt"), conf)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var buf bytes.Buffer
		pk := packets.Packet{
			FixedHeader:     packets.FixedHeader{Type: packets.Connect},
			ProtocolVersion: 4,
			Connect:         packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "slow-1", Keepalive: 30, Clean: true, Username: []byte(strings.Repeat("u", 100)), UsernameFlag: true},
		}
		if err := pk.ConnectEncode(&buf); err != nil {
			t.Fatal(err)
		}
		if sent := trickle(c, buf.Bytes(), step); sent == buf.Len() {
			t.Fatalf("a CONNECT trickled over %v was never cut", time.Duration(buf.Len())*step)
		} else {
			t.Logf("cut after %d of %d CONNECT bytes", sent, buf.Len())
		}
	})
}

// readPacket reads one MQTT packet: the first byte and the rest.
func readPacket(r *bufio.Reader) (byte, []byte, error) {
	first, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mul := 0, 1
	for {
		b, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(b&127) * mul
		mul *= 128
		if b&128 == 0 {
			break
		}
	}
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	return first, body, err
}

func publishPacket(t testing.TB, version, qos byte, id uint16, topic string, payload []byte) []byte {
	t.Helper()
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: qos},
		ProtocolVersion: version,
		TopicName:       topic,
		Payload:         payload,
		PacketID:        id,
	}
	var buf bytes.Buffer
	if err := pk.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// mqttSession is a raw MQTT session after CONNACK.
type mqttSession struct {
	conn *tls.Conn
	r    *bufio.Reader
}

// dialMQTT opens a raw MQTT session: TLS, CONNECT, and the CONNACK's
// reason code. Its timeouts only bound a hung test: on a loaded machine a
// connect may take seconds.
func (e *env) dialMQTT(t testing.TB, version byte, id string, conf *tls.Config) (*mqttSession, byte, error) {
	t.Helper()
	conf = conf.Clone()
	conf.RootCAs, conf.ServerName = e.pool, "localhost"
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 30 * time.Second}, "tcp", e.srv.Addr("mqtt"), conf)
	if err != nil {
		return nil, 0, err
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: version,
		Connect:         packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: id, Keepalive: 60, Clean: true},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(buf.Bytes()); err != nil {
		return nil, 0, err
	}
	s := &mqttSession{conn: conn, r: bufio.NewReader(conn)}
	typ, body, err := readPacket(s.r)
	if err != nil {
		return nil, 0, err
	}
	if typ>>4 != packets.Connack || len(body) < 2 {
		return nil, 0, fmt.Errorf("packet type %d body %x, want CONNACK", typ>>4, body)
	}
	return s, body[1], nil
}

// session connects a device that must be admitted.
func (e *env) session(t *testing.T, version byte, id string) *mqttSession {
	t.Helper()
	s, code, err := e.dialMQTT(t, version, id, e.deviceTLS(t, id))
	if err != nil || code != 0 {
		t.Fatalf("connect %s: code %#x, %v", id, code, err)
	}
	return s
}

// Size limits: EST and admin bodies, HTTP headers, MQTT packets and
// device payloads.
func TestSizeLimits(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()

	t.Run("EST body over 64 KiB gets 413", func(t *testing.T) {
		big := bytes.Repeat([]byte("A"), est.MaxRequestSize+1)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+e.srv.Addr("est")+est.PathEnroll, bytes.NewReader(big))
		req.SetBasicAuth("dev-1", "token")
		resp, err := e.est(nil).HTTP.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("status %d, want 413", resp.StatusCode)
		}
	})
	t.Run("admin body over 1 MiB gets 413", func(t *testing.T) {
		tlsConf, err := adminapi.OperatorTLS(e.layout)
		if err != nil {
			t.Fatal(err)
		}
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}
		body := `{"device_ids":["` + strings.Repeat("a", adminapi.MaxBodySize) + `"]}`
		resp, err := c.Post("https://"+e.srv.Addr("admin")+adminapi.PathTokens, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("status %d (%s), want 413", resp.StatusCode, msg)
		}
	})
	t.Run("HTTP headers over 32 KiB get 431", func(t *testing.T) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+e.srv.Addr("est")+est.PathCACerts, nil)
		req.Header.Set("X-Big", strings.Repeat("b", server.MaxHeaderBytes+8<<10))
		resp, err := e.est(nil).HTTP.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("status %d, want 431", resp.StatusCode)
		}
	})
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("MQTT %d packet over 256 KiB closes the connection", v), func(t *testing.T) {
			s := e.session(t, v, fmt.Sprintf("big-%d", v))
			_, _ = s.conn.Write(publishPacket(t, v, 0, 0, fmt.Sprintf("devices/big-%d/telemetry", v), make([]byte, 300<<10)))
			for {
				typ, _, err := readPacket(s.r)
				if err != nil {
					break // closed
				}
				if typ>>4 != packets.Disconnect {
					t.Fatalf("packet type %d after an oversized packet", typ>>4)
				}
			}
		})
	}

	refusals := e.srv.Metrics().PublishRefusals.WithLabelValues("payload_too_large")
	limit := 64 << 10
	t.Run("MQTT 5 QoS 1 payload over the limit gets PUBACK 0x95, session stays", func(t *testing.T) {
		s := e.session(t, 5, "pl-5")
		_, _ = s.conn.Write(publishPacket(t, 5, 1, 7, "devices/pl-5/telemetry", make([]byte, limit+1)))
		typ, body, err := readPacket(s.r)
		if err != nil || typ>>4 != packets.Puback || len(body) < 3 || body[2] != 0x95 {
			t.Fatalf("answer type %d body %x, %v; want PUBACK 0x95", typ>>4, body[:min(len(body), 3)], err)
		}
		_, _ = s.conn.Write(publishPacket(t, 5, 1, 8, "devices/pl-5/telemetry", make([]byte, limit)))
		typ, body, err = readPacket(s.r)
		if err != nil || typ>>4 != packets.Puback || (len(body) > 2 && body[2] != 0) {
			t.Fatalf("payload at the limit: type %d body %x, %v; want PUBACK success", typ>>4, body, err)
		}
	})
	t.Run("MQTT 5 QoS 0 payload over the limit gets DISCONNECT 0x95", func(t *testing.T) {
		s := e.session(t, 5, "pl-5b")
		_, _ = s.conn.Write(publishPacket(t, 5, 0, 0, "devices/pl-5b/telemetry", make([]byte, limit+1)))
		typ, body, err := readPacket(s.r)
		if err != nil || typ>>4 != packets.Disconnect || len(body) < 1 || body[0] != 0x95 {
			t.Fatalf("answer type %d body %x, %v; want DISCONNECT 0x95", typ>>4, body, err)
		}
	})
	t.Run("MQTT 3.1.1 payload over the limit closes the connection", func(t *testing.T) {
		s := e.session(t, 4, "pl-4")
		_, _ = s.conn.Write(publishPacket(t, 4, 1, 9, "devices/pl-4/telemetry", make([]byte, limit+1)))
		// mochi writes a bare DISCONNECT before closing, even to 3.1.1
		// clients; what matters is that no PUBACK comes and the
		// connection ends.
		for {
			typ, _, err := readPacket(s.r)
			if err != nil {
				break
			}
			if typ>>4 != packets.Disconnect {
				t.Fatalf("got packet type %d, want the connection closed", typ>>4)
			}
		}
	})
	if n := value(refusals); n != 3 {
		t.Errorf("payload refusals counted %v, want 3", n)
	}
}

// One device floods QoS 0 publishes as fast as its socket takes them while
// another publishes at its normal pace: every message of the good device
// reaches a service subscriber, and the flooder's deliveries never exceed
// its token bucket (burst + rate × elapsed). Nothing is dropped anywhere:
// the flooder is paced, not discarded.
func TestPublishFloodIsPaced(t *testing.T) {
	const rate, burst, good = 20, 20, 40
	e := newEnv(t, limits(func(l *server.Limits) { l.PublishRate = limit.Rate{PerSecond: rate, Burst: burst} }))

	var got sync.Map // device → *atomic.Int64
	count := func(id string) *atomic.Int64 {
		v, _ := got.LoadOrStore(id, new(atomic.Int64))
		return v.(*atomic.Int64)
	}
	svcCert, svcKey := e.deviceCertFor(t, identity.Service(e.td, "backend"))
	sub := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID("sub-1").
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(svcCert, svcKey, e.ca.Cert)}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetOrderMatters(false))
	if tok := sub.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscriber connect: %v", tok.Error())
	}
	defer sub.Disconnect(50)
	if tok := sub.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
		count(strings.Split(m.Topic(), "/")[1]).Add(1)
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	flooder := e.session(t, 4, "flooder")
	_ = flooder.conn.SetDeadline(time.Time{})
	start := time.Now()
	var written atomic.Int64
	msg := publishPacket(t, 4, 0, 0, "devices/flooder/telemetry", []byte(`{"cpu":99}`))
	go func() {
		for {
			if _, err := flooder.conn.Write(msg); err != nil {
				return
			}
			written.Add(1)
		}
	}()
	throttled := e.srv.Metrics().PublishesThrottled
	waitFor(t, "the flooder to be paced", func() bool { return value(throttled) > 0 })

	dev := e.session(t, 4, "good-1")
	for i := range good {
		if _, err := dev.conn.Write(publishPacket(t, 4, 1, uint16(i+1), "devices/good-1/telemetry", []byte(`{"n":1}`))); err != nil {
			t.Fatal(err)
		}
		if typ, _, err := readPacket(dev.r); err != nil || typ>>4 != packets.Puback {
			t.Fatalf("publish %d: type %d, %v", i, typ>>4, err)
		}
	}
	waitFor(t, "every message of the good device", func() bool { return count("good-1").Load() == good })
	elapsed := time.Since(start)
	delivered := count("flooder").Load()
	t.Logf("in %v: flooder wrote %d publishes into its socket, %d delivered (bucket %d + %d/s), %v paced; good device %d of %d delivered; %v dropped",
		elapsed.Round(time.Millisecond), written.Load(), delivered, burst, rate, value(throttled),
		count("good-1").Load(), good, value(e.srv.Metrics().MessagesDropped))
	if bound := int64(burst + rate*elapsed.Seconds() + 1); delivered > bound {
		t.Errorf("flooder delivered %d messages in %v, more than its bucket allows (%d)", delivered, elapsed, bound)
	}
	if written.Load() <= delivered {
		t.Errorf("the flooder wrote %d and got %d delivered: it was not held back", written.Load(), delivered)
	}
	if n := value(e.srv.Metrics().MessagesDropped); n != 0 {
		t.Errorf("%v messages dropped", n)
	}
}

// deviceCertFor issues a certificate for any identity with the gateway's CA.
func (e *env) deviceCertFor(t testing.TB, id identity.Identity) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key := pkitest.Key(t)
	c, err := e.issuer(time.Now()).IssueIdentity(key.Public(), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

// Five bad tokens for one device ID lock it out: the right token is then
// refused with 429 and a Retry-After, the lockout is audited once, other
// devices are unaffected, and a token minted by an operator lifts it.
func TestEnrollLockout(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	key := pkitest.Key(t)
	csr := pkitest.CSR(t, key, "lock-1")
	tok := e.token(t, "lock-1", "")
	other := e.token(t, "lock-2", "")
	c := e.keepAlive(t, nil)

	for i := range 5 {
		if _, err := c.SimpleEnroll(ctx, csr, "lock-1", fmt.Sprintf("guess-%d", i)); !est.IsStatus(err, http.StatusUnauthorized) {
			t.Fatalf("bad token %d: %v, want 401", i+1, err)
		}
	}
	for i, token := range []string{tok, "guess-again", tok} {
		_, err := c.SimpleEnroll(ctx, csr, "lock-1", token)
		var ee *est.Error
		if !errors.As(err, &ee) || ee.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("attempt %d during the lockout: %v, want 429", i+1, err)
		}
		if ee.RetryAfter <= 0 || ee.RetryAfter > 15*time.Minute || !strings.Contains(ee.Message, "too many failed enrollment attempts") {
			t.Fatalf("429 with Retry-After %v and reason %q", ee.RetryAfter, ee.Message)
		}
	}
	if _, err := c.SimpleEnroll(ctx, pkitest.CSR(t, pkitest.Key(t), "lock-2"), "lock-2", other); err != nil {
		t.Fatalf("another device during the lockout: %v", err)
	}
	audit, err := e.admin.Audit(ctx, 0, "lock-1", 0)
	if err != nil {
		t.Fatal(err)
	}
	lockouts := 0
	for _, ev := range audit.Events {
		if ev.Action == "device.enroll_lockout" {
			lockouts++
			t.Logf("audit: %s %s %s", ev.Actor, ev.Action, ev.Detail)
		}
	}
	if lockouts != 1 {
		t.Fatalf("%d lockout audit events, want 1", lockouts)
	}
	if n := value(e.srv.Metrics().EnrollLockouts); n != 1 {
		t.Errorf("lockout counter %v, want 1", n)
	}
	if n := value(e.srv.Metrics().Enrollments.WithLabelValues("locked_out")); n != 3 {
		t.Errorf("locked_out enrollments %v, want 3", n)
	}
	// The operator mints a new token: the lockout ends.
	fresh := e.token(t, "lock-1", "")
	if _, err := c.SimpleEnroll(ctx, csr, "lock-1", fresh); err != nil {
		t.Fatalf("enroll with a new token after the lockout was lifted: %v", err)
	}
}

func TestEnrollLockoutOff(t *testing.T) {
	e := newEnv(t, limits(func(l *server.Limits) { l.LockoutFailures = -1 }))
	ctx := context.Background()
	key := pkitest.Key(t)
	tok := e.token(t, "nolock", "")
	c := e.keepAlive(t, nil)
	for range 10 {
		if _, err := c.SimpleEnroll(ctx, pkitest.CSR(t, key, "nolock"), "nolock", "guess"); !est.IsStatus(err, http.StatusUnauthorized) {
			t.Fatalf("bad token: %v", err)
		}
	}
	if _, err := c.SimpleEnroll(ctx, pkitest.CSR(t, key, "nolock"), "nolock", tok); err != nil {
		t.Fatalf("right token with the lockout off: %v", err)
	}
}
