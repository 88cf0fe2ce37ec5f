package server_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/adminapi"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// rawConnect dials the broker with TLS, sends one CONNECT of the given
// protocol version and returns the CONNACK reason code and the open
// connection.
func (e *env) rawConnect(t testing.TB, version byte, clientID string, conf *tls.Config) (byte, *tls.Conn, error) {
	t.Helper()
	conf = conf.Clone()
	conf.RootCAs = e.pool
	conf.ServerName = "localhost"
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", e.srv.Addr("mqtt"), conf)
	if err != nil {
		return 0, nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	name := []byte("MQTT")
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: version,
		Connect:         packets.ConnectParams{ProtocolName: name, ClientIdentifier: clientID, Keepalive: 30, Clean: true},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(buf.Bytes()); err != nil {
		conn.Close()
		return 0, nil, err
	}
	r := bufio.NewReader(conn)
	first, err := r.ReadByte()
	if err != nil {
		conn.Close()
		return 0, nil, err
	}
	if first>>4 != packets.Connack {
		conn.Close()
		return 0, nil, fmt.Errorf("first packet type %d, want CONNACK", first>>4)
	}
	n, mul := 0, 1
	for {
		b, err := r.ReadByte()
		if err != nil {
			conn.Close()
			return 0, nil, err
		}
		n += int(b&127) * mul
		mul *= 128
		if b&128 == 0 {
			break
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil || n < 2 {
		conn.Close()
		return 0, nil, fmt.Errorf("short CONNACK: %v", err)
	}
	_ = conn.SetDeadline(time.Time{})
	return body[1], conn, nil
}

func TestConnackCodes(t *testing.T) {
	e := newEnv(t)
	dev, devKey := e.deviceCert(t, "dev-1", e.issuer(time.Now()), time.Hour)
	devConf := &tls.Config{Certificates: []tls.Certificate{pkitest.TLSCert(dev, devKey, e.ca.Cert)}}
	opCert, err := tls.LoadX509KeyPair(e.layout.OperatorCert(), e.layout.OperatorKey())
	if err != nil {
		t.Fatal(err)
	}
	opConf := &tls.Config{Certificates: []tls.Certificate{opCert}}
	cases := []struct {
		name     string
		version  byte
		clientID string
		conf     *tls.Config
		want     byte
	}{
		{"device accepted over MQTT 3.1.1", 4, "dev-1", devConf, 0x00},
		{"device accepted over MQTT 5", 5, "dev-1", devConf, 0x00},
		{"device with empty client ID gets its device ID", 4, "", devConf, 0x00},
		{"operator refused with 3.1.1 not authorized (0x05)", 4, "admin", opConf, 0x05},
		{"operator refused with MQTT 5 not authorized (0x87)", 5, "admin", opConf, 0x87},
		{"foreign client ID refused with 3.1.1 identifier rejected (0x02)", 4, "dev-2", devConf, 0x02},
		{"foreign client ID refused with MQTT 5 client identifier not valid (0x85)", 5, "dev-2", devConf, 0x85},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, conn, err := e.rawConnect(t, tc.version, tc.clientID, tc.conf)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if code != tc.want {
				t.Fatalf("CONNACK code 0x%02x, want 0x%02x", code, tc.want)
			}
		})
	}
}

func TestConnectDeadline(t *testing.T) {
	e := newEnv(t, func(c *server.Config) { c.ConnectTimeout = 300 * time.Millisecond })
	dev, devKey := e.deviceCert(t, "dev-1", e.issuer(time.Now()), time.Hour)

	t.Run("idle TCP connection is closed", func(t *testing.T) {
		c, err := net.Dial("tcp", e.srv.Addr("mqtt"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
			t.Fatalf("read = %v, want the gateway to close the connection", err)
		}
	})
	t.Run("TLS session that never sends CONNECT is closed", func(t *testing.T) {
		conf := &tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(dev, devKey, e.ca.Cert)}}
		c, err := tls.Dial("tcp", e.srv.Addr("mqtt"), conf)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("gateway kept a silent TLS session open for 10s")
		}
	})
	t.Run("garbage instead of TLS is closed", func(t *testing.T) {
		c, err := net.Dial("tcp", e.srv.Addr("mqtt"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadAll(c); err != nil && !isReset(err) {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("connection left open")
			}
		}
	})
}

func isReset(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "closed"))
}

func TestMetricsCountRefusalsAndEnrollments(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	// One handshake without a client certificate, one enrollment.
	if _, _, err := e.rawConnect(t, 4, "x", &tls.Config{}); err == nil {
		t.Fatal("connected without a client certificate")
	}
	key := pkitest.Key(t)
	if _, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(t, key, "m-1"), "m-1", e.token(t, "m-1", "")); err != nil {
		t.Fatal(err)
	}
	tlsConf, err := adminapi.OperatorTLS(e.layout)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}
	var body string
	for range 50 { // the handshake failure is counted on the server's goroutine
		resp, err := c.Get("https://" + e.srv.Addr("admin") + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		if strings.Contains(body, `fleetgate_tls_handshake_failures_total{reason="no_client_cert"} 1`) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, want := range []string{
		`fleetgate_tls_handshake_failures_total{reason="no_client_cert"} 1`,
		`fleetgate_enrollments_total{result="ok"} 1`,
		`fleetgate_crl_number`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// limitsOff switches the per-source abuse limits off: benchmarks load the
// gateway from one address on purpose.
func limitsOff(c *server.Config) {
	c.Limits.EnrollRate, c.Limits.ESTReadRate, c.Limits.MQTTConnectRate, c.Limits.PublishRate = limit.Off, limit.Off, limit.Off, limit.Off
}

// BenchmarkEnroll measures whole EST enrollments over HTTPS: TLS, token
// check, CSR verification, issuance and a durable registry commit.
func BenchmarkEnroll(b *testing.B) {
	e := newEnv(b, limitsOff)
	ctx := context.Background()
	ids := make([]string, b.N)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-%d", i)
	}
	toks := map[string]string{}
	for start := 0; start < len(ids); start += adminapi.MaxTokensPerRequest {
		resp, err := e.admin.CreateTokens(ctx, adminapi.TokenRequest{DeviceIDs: ids[start:min(start+adminapi.MaxTokensPerRequest, len(ids))]})
		if err != nil {
			b.Fatal(err)
		}
		for _, tk := range resp.Tokens {
			toks[tk.DeviceID] = tk.Token
		}
	}
	csrs := make([][]byte, b.N)
	for i := range csrs {
		csrs[i] = pkitest.CSR(b, pkitest.Key(b), ids[i])
	}
	client := e.est(nil)
	client.HTTP.Transport.(*http.Transport).DisableKeepAlives = false
	next := make(chan int, b.N)
	for i := range b.N {
		next <- i
	}
	close(next)
	b.ResetTimer()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := <-next
			if _, err := client.SimpleEnroll(ctx, csrs[i], ids[i], toks[ids[i]]); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "enrollments/s")
}

// BenchmarkMQTTConnect measures full mutual-TLS MQTT connects: handshake,
// CONNECT, CONNACK, close.
func BenchmarkMQTTConnect(b *testing.B) {
	for _, resumed := range []bool{false, true} {
		name := "full handshake"
		if resumed {
			name = "resumed session"
		}
		b.Run(name, func(b *testing.B) {
			e := newEnv(b, limitsOff)
			// One device per goroutine: devices sharing a client ID would
			// take over each other's sessions.
			const workers = 8
			confs := make(chan *tls.Config, workers)
			for i := range workers {
				dev, key := e.deviceCert(b, fmt.Sprintf("bench-dev-%d", i), e.issuer(time.Now()), time.Hour)
				conf := &tls.Config{Certificates: []tls.Certificate{pkitest.TLSCert(dev, key, e.ca.Cert)}}
				if resumed {
					conf.ClientSessionCache = tls.NewLRUClientSessionCache(4)
				}
				confs <- conf
			}
			b.ResetTimer()
			b.SetParallelism(workers / 2)
			b.RunParallel(func(pb *testing.PB) {
				conf := <-confs
				for pb.Next() {
					code, conn, err := e.rawConnect(b, 4, "", conf)
					if err != nil || code != 0 {
						b.Errorf("connect: code %d, %v", code, err)
						return
					}
					conn.Close()
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "connects/s")
		})
	}
}

// BenchmarkRevokeDisconnect measures the time from a revoke request (admin
// API over mTLS) until the device's live MQTT connection is closed.
func BenchmarkRevokeDisconnect(b *testing.B) {
	e := newEnv(b, limitsOff)
	ctx := context.Background()
	var total time.Duration
	for i := range b.N {
		b.StopTimer()
		id := fmt.Sprintf("victim-%d", i)
		key := pkitest.Key(b)
		cert, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(b, key, id), id, e.token(b, id, ""))
		if err != nil {
			b.Fatal(err)
		}
		code, conn, err := e.rawConnect(b, 4, id, &tls.Config{Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.ca.Cert)}})
		if err != nil || code != 0 {
			b.Fatalf("connect: %d %v", code, err)
		}
		for !e.srv.Broker().Connected(id) {
			time.Sleep(time.Millisecond)
		}
		closed := make(chan time.Time, 1)
		go func() {
			_, _ = io.Copy(io.Discard, conn)
			closed <- time.Now()
		}()
		b.StartTimer()
		start := time.Now()
		if _, err := e.admin.Revoke(ctx, id, "keyCompromise"); err != nil {
			b.Fatal(err)
		}
		at := <-closed
		total += at.Sub(start)
		conn.Close()
	}
	b.ReportMetric(float64(total.Microseconds())/float64(b.N), "µs/revoke→disconnect")
}
