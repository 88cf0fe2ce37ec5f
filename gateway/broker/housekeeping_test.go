package broker

import (
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// The expiry sweeps follow the period set, on the very tickers mochi's
// event loop reads: with an hour, none of them ticks within mochi's own
// one second (and a half to spare).
func TestHousekeeping(t *testing.T) {
	srv := mqtt.New(nil) // not serving: nothing else reads the tickers
	defer srv.Close()
	tickers, err := housekeepingTickers(srv)
	if err != nil {
		t.Fatalf("mochi's event loop changed: %v (revisit setHousekeeping)", err)
	}
	if err := setHousekeeping(srv, time.Hour); err != nil {
		t.Fatal(err)
	}
	// Drain a tick that came before the reset.
	for _, tk := range tickers {
		select {
		case <-tk.C:
		default:
		}
	}
	deadline := time.After(1500 * time.Millisecond)
	for {
		select {
		case <-tickers[0].C:
			t.Fatal("client expiry ticked within 1.5 s with a period of an hour")
		case <-tickers[1].C:
			t.Fatal("in-flight expiry ticked within 1.5 s with a period of an hour")
		case <-tickers[2].C:
			t.Fatal("retained expiry ticked within 1.5 s with a period of an hour")
		case <-deadline:
			return
		}
	}
}
