# ublkimg: `make test` is the one test command (CI runs it through .ci/run).
GO          ?= go
STATICCHECK := $(CURDIR)/.cache/bin/staticcheck
VM_PKGS     := ./vmtest/ ./ublk/...

.PHONY: all build test deps check unit unit-norace vmtest fuzz bench demo clean

all: build

build:
	$(GO) build -o ublkimg ./cmd/ublkimg

# Everything: tools, static checks, unit tests with the race detector, the
# tests the race detector shortens run in full without it, then the ublk
# end-to-end tests in a VM (the host kernel has no ublk). The tests run
# against one throwaway Ceph cluster (for the rbd driver), started before
# them and stopped after them (scripts/ceph-cluster.sh; internal/cephtest).
test: deps check
	@scripts/ceph-cluster.sh run $(MAKE) --no-print-directory unit unit-norace vmtest
	@echo "make test: all passed"

# In the test targets a test whose oracle (qemu-img, qemu-io) is missing
# fails instead of skipping (internal/qemutest).
unit unit-norace vmtest: export UBLKIMG_REQUIRE_ORACLES = 1

deps:
	@scripts/deps.sh

check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

# The tests that run fewer cases under the race detector (raceEnabled in
# drivers/qcow2); TestRaceReducedRunWithoutRace keeps this list complete.
NORACE_TESTS := TestAmendRefcountBits|TestAmendRefcountCrash|TestWriteStreams|TestCrashConsistency

unit-norace:
	$(GO) test -count=1 -timeout 10m -run '^($(NORACE_TESTS))$$' ./drivers/qcow2/

vmtest:
	UBLKIMG_VM=1 $(GO) test -count=1 -p 1 -timeout 40m $(VM_PKGS)

# Long fuzzing (not part of `make test`, which runs the seed corpora).
FUZZTIME ?= 60s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
			echo "fuzz $$pkg $$f"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

# Micro-benchmarks of the engine (not tests: they report, never fail).
bench:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./uring/ ./coroutine/

# The README's first command: build, create an image, attach it as
# /dev/ublkbN, mkfs, mount, use it, list, detach, check the image; natively
# where the kernel has ublk (as root), else inside the test VM.
demo:
	@scripts/demo.sh

clean:
	rm -f ublkimg
