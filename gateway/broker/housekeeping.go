package broker

import (
	"fmt"
	"reflect"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// housekeepingPeriod is how often mochi sweeps for expired sessions,
// in-flight messages and retained messages.
//
// mochi sweeps every second and each sweep copies whole maps: all
// clients (twice), each client's in-flight messages and every retained
// message (one presence message per device here). With 19,000 idle
// devices that was 7 % of a core, 82 % of the idle gateway's CPU, and it
// grows with the fleet. Every 10 s it is a tenth. What the sweeps expire
// then goes up to 10 s late: an MQTT 5 message expiry on an in-flight or
// retained message, and a disconnected persistent session after its
// expiry interval (24 h by default). The delayed-will sweep, which sees
// only pending wills, keeps mochi's one second.
const housekeepingPeriod = 10 * time.Second

// setHousekeeping sets the period of mochi's expiry sweeps. mochi has no
// option for it: its tickers are unexported fields, reached by reflection
// (TestHousekeeping fails if a mochi upgrade renames them). Call it before
// Serve.
func setHousekeeping(srv *mqtt.Server, every time.Duration) error {
	tickers, err := housekeepingTickers(srv)
	if err != nil {
		return err
	}
	for _, t := range tickers {
		t.Reset(every)
	}
	return nil
}

// housekeepingTickers returns mochi's client, in-flight and retained
// expiry tickers.
func housekeepingTickers(srv *mqtt.Server) ([]*time.Ticker, error) {
	loop := reflect.ValueOf(srv).Elem().FieldByName("loop")
	if loop.Kind() != reflect.Pointer || loop.IsNil() {
		return nil, fmt.Errorf("mochi's server has no event loop settings (field loop)")
	}
	tickerType := reflect.TypeFor[*time.Ticker]()
	var out []*time.Ticker
	for _, name := range []string{"clientExpiry", "inflightExpiry", "retainedExpiry"} {
		f := loop.Elem().FieldByName(name)
		if !f.IsValid() || f.Type() != tickerType || f.IsNil() {
			return nil, fmt.Errorf("mochi's event loop has no %s ticker", name)
		}
		out = append(out, (*time.Ticker)(f.UnsafePointer()))
	}
	return out, nil
}
