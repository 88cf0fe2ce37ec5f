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

// TestManyPublishersLoseNoQoS1 has many devices publish QoS 1 at once to a
// slow service subscriber through a tiny in-flight store. Devices released
// together must not overshoot the store: the gate admits exactly, so every
// acknowledged message arrives and mochi counts no drop.
func TestManyPublishersLoseNoQoS1(t *testing.T) {
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
	if tok := sub.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
		time.Sleep(200 * time.Microsecond)
		mu.Lock()
		got[string(m.Payload())] = true
		mu.Unlock()
	}); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	const devices, each = 24, 25
	var wg sync.WaitGroup
	errs := make(chan error, devices)
	start := make(chan struct{})
	for d := range devices {
		id := fmt.Sprintf("dev-%02d", d)
		key := pkitest.Key(t)
		cert, err := e.est(nil).SimpleEnroll(ctx, pkitest.CSR(t, key, id), id, e.token(t, id, ""))
		if err != nil {
			t.Fatal(err)
		}
		dev := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID(id).
			SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.ca.Cert)}}).
			SetProtocolVersion(4).SetAutoReconnect(false).SetWriteTimeout(30 * time.Second))
		if tok := dev.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("device %s: %v", id, tok.Error())
		}
		defer dev.Disconnect(50)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			toks := make([]paho.Token, each)
			for i := range each {
				toks[i] = dev.Publish("devices/"+id+"/telemetry", 1, false, fmt.Sprintf("%s-%d", id, i))
			}
			for i, tok := range toks {
				if !tok.WaitTimeout(60*time.Second) || tok.Error() != nil {
					errs <- fmt.Errorf("%s publish %d not acknowledged: %v", id, i, tok.Error())
					return
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		have := len(got)
		mu.Unlock()
		if have == devices*each {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("subscriber received %d of %d acknowledged messages", have, devices*each)
		}
		time.Sleep(20 * time.Millisecond)
	}
	m := e.srv.Metrics()
	if n := value(m.PublishesBackpressured); n == 0 {
		t.Error("no publish was held: the test did not congest the subscriber")
	}
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		switch mf.GetName() {
		case "fleetgate_mqtt_inflight_dropped_total", "fleetgate_mqtt_queue_dropped_total":
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != 0 {
				t.Errorf("%s = %v, want 0", mf.GetName(), v)
			}
		}
	}
}
