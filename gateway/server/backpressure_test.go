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

// backpressureEnv is a gateway with a tiny in-flight store (16) and no
// publish pacing, so one slow subscriber congests at once.
func backpressureEnv(t *testing.T) *env {
	return newEnv(t, func(c *server.Config) {
		c.MQTTMaxInflight = 16
		c.Limits.PublishRate = limit.Off
	})
}

// slowSubscriber connects a service subscribed to every device's
// telemetry at QoS 1 that takes delay over each message (paho acknowledges
// when the handler returns), and returns the count of distinct payloads it
// has received.
func (e *env) slowSubscriber(t *testing.T, delay time.Duration) func() int {
	t.Helper()
	key := pkitest.Key(t)
	cert, err := e.issuer(time.Now()).IssueIdentity(key.Public(), identity.Service(e.td, "slow"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := map[string]bool{}
	sub := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID("slow").
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.ca.Cert)}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetOrderMatters(true))
	if tok := sub.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscriber: %v", tok.Error())
	}
	t.Cleanup(func() { sub.Disconnect(50) })
	if tok := sub.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
		time.Sleep(delay)
		mu.Lock()
		got[string(m.Payload())] = true
		mu.Unlock()
	}); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(got)
	}
}

// pahoDevice enrolls device id over EST and connects it with paho.
func (e *env) pahoDevice(t *testing.T, id string) paho.Client {
	t.Helper()
	key := pkitest.Key(t)
	cert, err := e.est(nil).SimpleEnroll(context.Background(), pkitest.CSR(t, key, id), id, e.token(t, id, ""))
	if err != nil {
		t.Fatal(err)
	}
	dev := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + e.srv.Addr("mqtt")).SetClientID(id).
		SetTLSConfig(&tls.Config{RootCAs: e.pool, ServerName: "localhost", Certificates: []tls.Certificate{pkitest.TLSCert(cert, key, e.ca.Cert)}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetWriteTimeout(30 * time.Second))
	if tok := dev.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("device %s: %v", id, tok.Error())
	}
	t.Cleanup(func() { dev.Disconnect(50) })
	return dev
}

// publishAll publishes n QoS 1 messages "ID-i" as fast as paho allows and
// waits for every acknowledgement.
func publishAll(dev paho.Client, id string, n int) error {
	toks := make([]paho.Token, n)
	for i := range n {
		toks[i] = dev.Publish("devices/"+id+"/telemetry", 1, false, fmt.Sprintf("%s-%d", id, i))
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(60*time.Second) || tok.Error() != nil {
			return fmt.Errorf("%s publish %d not acknowledged: %v", id, i, tok.Error())
		}
	}
	return nil
}

// waitReceived fails unless received reaches want within 30 s.
func waitReceived(t *testing.T, received func() int, want int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for received() != want {
		if time.Now().After(deadline) {
			t.Fatalf("subscriber received %d of %d acknowledged messages", received(), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSlowSubscriberLosesNoQoS1 floods a slow service subscriber with a
// device's QoS 1 publishes through a tiny in-flight store. mochi
// acknowledges a publish before delivering it and drops it for a
// subscriber whose store is full; the gateway's backpressure makes the
// device wait instead, so every message arrives.
func TestSlowSubscriberLosesNoQoS1(t *testing.T) {
	e := backpressureEnv(t)
	received := e.slowSubscriber(t, 2*time.Millisecond)
	const n = 400
	if err := publishAll(e.pahoDevice(t, "fast"), "fast", n); err != nil {
		t.Fatal(err)
	}
	waitReceived(t, received, n)
}

// TestManyPublishersLoseNoQoS1 has many devices publish QoS 1 at once to a
// slow service subscriber through a tiny in-flight store. Devices released
// together must not overshoot the store: the gate admits exactly, so every
// acknowledged message arrives and mochi counts no drop.
func TestManyPublishersLoseNoQoS1(t *testing.T) {
	e := backpressureEnv(t)
	received := e.slowSubscriber(t, 200*time.Microsecond)
	const devices, each = 24, 25
	var wg sync.WaitGroup
	errs := make(chan error, devices)
	start := make(chan struct{})
	for d := range devices {
		id := fmt.Sprintf("dev-%02d", d)
		dev := e.pahoDevice(t, id)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if err := publishAll(dev, id, each); err != nil {
				errs <- err
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	waitReceived(t, received, devices*each)
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
