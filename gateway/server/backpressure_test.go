package server_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/gateway/limit"
	"github.com/fleetgate/fleetgate/gateway/server"
	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki/pkitest"
)

// TestSlowSubscriberLosesNoQoS1 floods a slow service subscriber with a
// device's QoS 1 publishes through a tiny in-flight store. mochi
// acknowledges a publish before delivering it and drops it for a
// subscriber whose store is full; the gateway's backpressure makes the
// device wait instead, so every message arrives.
func TestSlowSubscriberLosesNoQoS1(t *testing.T) {
	e := newEnv(t, func(c *server.Config) {
		c.MQTTMaxInflight = 16
		c.Limits.PublishRate = limit.Off
	})
	ctx := context.Background()
	svcKey := pkitest.Key(t)
	svcCert, err := e.issuer(time.Now()).IssueIdentity(svcKey.Public(), identity.Service(e.td, "slow"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := map[string]bool{}
	sub := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID("slow").
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(svcCert, svcKey, e.ca.Cert)}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetOrderMatters(true))
	if tok := sub.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscriber: %v", tok.Error())
	}
	defer sub.Disconnect(50)
	// The handler acknowledges only when it returns: a slow consumer.
	if tok := sub.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
		time.Sleep(2 * time.Millisecond)
		mu.Lock()
		got[string(m.Payload())] = true
		mu.Unlock()
	}); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	key := pkitest.Key(t)
	cert, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(t, key, "fast"), "fast", e.token(t, "fast", ""))
	if err != nil {
		t.Fatal(err)
	}
	dev := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID("fast").
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.ca.Cert)}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetWriteTimeout(30 * time.Second))
	if tok := dev.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("device: %v", tok.Error())
	}
	defer dev.Disconnect(50)
	const n = 400
	toks := make([]paho.Token, n)
	for i := range n {
		toks[i] = dev.Publish("devices/fast/telemetry", 1, false, fmt.Sprintf("m-%d", i))
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(60*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d not acknowledged: %v", i, tok.Error())
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		have := len(got)
		mu.Unlock()
		if have == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("subscriber received %d of %d acknowledged messages", have, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
