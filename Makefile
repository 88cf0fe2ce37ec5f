# fleetgate — build, test and demo targets. See README.md.

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/fleetgate/fleetgate/pkg/cli.Version=$(VERSION)
BINARIES  := gateway agent provisioning firmware-sim
FUZZTIME  ?= 10s

.PHONY: all build test test-short demo bench bench-smoke bench-go fuzz fuzz-smoke dist lint clean

all: build

## build: the four programs into bin/ (static, CGO off)
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ $(addprefix ./,$(BINARIES))

## test: vet, the race-enabled test suite (end-to-end tests included), TPM simulator tests and a short fuzz run
test: lint
	$(GO) test -race -count=1 -timeout 20m ./...
	@if [ -n "$$(ls pkg/keystore/tpm*_test.go 2>/dev/null)" ]; then \
		CGO_ENABLED=1 $(GO) test -race -count=1 -tags tpmsimulator ./pkg/keystore/; fi
	$(MAKE) --no-print-directory fuzz-smoke FUZZTIME=2000x

## test-short: the suite without -race, for a quick loop
test-short:
	$(GO) test -count=1 ./...

## demo: build, then run a dev gateway with a few agents, revoke one, stop everything
demo: build
	./bin/firmware-sim demo

## fuzz-smoke: every fuzz target for FUZZTIME (default 10s; a count such as 2000x avoids Go 1.26's spurious
## "context deadline exceeded" at the end of timed runs, golang/go#75804)
fuzz-smoke:
	@set -e; for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
			echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg > /tmp/fleetgate-fuzz.log 2>&1 || { cat /tmp/fleetgate-fuzz.log; exit 1; }; \
		done; \
	done

## fuzz: every fuzz target for 5 minutes
fuzz:
	$(MAKE) fuzz-smoke FUZZTIME=5m

## bench: fleetgate against Debian's Mosquitto under the same simulated fleet (firmware-sim bench, a few minutes); results in firmware-sim/bench-results/, method in BENCHMARKS.md
bench: build
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto; }; \
		else echo "bench: mosquitto is not installed; run: sudo apt-get install -y mosquitto"; exit 1; fi; \
	fi
	./bin/firmware-sim bench $(BENCHFLAGS)

## bench-smoke: the short bench for CI (small sizes, under a minute; fleetgate alone, with a note, when Mosquitto is absent)
bench-smoke: build
	./bin/firmware-sim bench --smoke $(BENCHFLAGS)

## bench-go: Go benchmarks of the hot paths
bench-go:
	$(GO) test -run '^$$' -bench . -benchmem ./...

## dist: the agent cross-compiled (static, stripped) for Raspberry Pi (armv6, armv7, arm64) and amd64, and fleetgate-agent .deb packages for armhf (the armv6 build), arm64 and amd64
dist:
	rm -rf dist
	mkdir -p dist
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=6 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o dist/agent-linux-armv6 ./agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o dist/agent-linux-armv7 ./agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o dist/agent-linux-arm64 ./agent
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o dist/agent-linux-amd64 ./agent
	$(GO) run ./agent/packaging/mkdeb -version '$(VERSION)' -out dist \
		-bin armhf=dist/agent-linux-armv6 -bin arm64=dist/agent-linux-arm64 -bin amd64=dist/agent-linux-amd64
	cd dist && sha256sum agent-linux-* *.deb > SHA256SUMS

## lint: gofmt and go vet
lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt: not formatted: $$unformatted"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin dist
