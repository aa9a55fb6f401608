# ublkimg: `make test` is the one test command (CI runs it through .ci/run).
GO          ?= go
STATICCHECK := $(CURDIR)/.cache/bin/staticcheck
VM_PKGS     := ./vmtest/ ./ublk/...

.PHONY: all build test deps check unit unit-norace vmtest vmtest-race fuzz bench demo clean

all: build

build:
	$(GO) build -o ublkimg ./cmd/ublkimg

# Everything: tools, static checks, unit tests with the race detector, the
# tests the race detector shortens run in full without it, then the ublk
# end-to-end tests in a VM (the host kernel has no ublk), then ublk
# scenarios with race-enabled servers. The tests run against one throwaway
# Ceph cluster (for the rbd driver, the VM scenarios included, race-enabled
# or not), started before them and stopped after them
# (scripts/ceph-cluster.sh; internal/cephtest).
test: deps check
	@scripts/ceph-cluster.sh run $(MAKE) --no-print-directory unit unit-norace vmtest vmtest-race
	@echo "make test: all passed"

# In the test targets a test whose oracle (qemu-img, qemu-io) is missing
# fails instead of skipping (internal/qemutest).
unit unit-norace vmtest vmtest-race: export UBLKIMG_REQUIRE_ORACLES = 1

deps:
	@scripts/deps.sh

check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) mod tidy -diff
	$(GO) vet ./...
	$(STATICCHECK) ./...

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

# The tests that run fewer cases under the race detector (they read
# raceEnabled) run in full without it: qcow2's refcount widths and crash
# rounds, and the stack-move stress tests, whose bug class (an SQE pointing
# into a goroutine stack) the race detector's instrumentation hides by
# keeping append's arrays off the stack. TestRaceReducedRunWithoutRace
# (drivers/qcow2) keeps both lists complete.
NORACE_PKGS  := ./drivers/qcow2/ ./drivers/file/ ./coroutine/
NORACE_TESTS := TestAmendRefcountBits|TestAmendRefcountCrash|TestWriteStreams|TestCrashConsistency|TestVectoredIOUnderStackMoves|TestIOMemoryIsHeap

unit-norace:
	$(GO) test -count=1 -timeout 10m -run '^($(NORACE_TESTS))$$' $(NORACE_PKGS)

vmtest:
	UBLKIMG_VM=1 $(GO) test -count=1 -p 1 -timeout 40m $(VM_PKGS)

# The ublk VM scenarios with the race detector in the guest's ublkimg and
# test binaries: a race report from any process fails the scenario. The
# race runtime costs 1.5-2x per scenario, so the race run takes the
# scenarios whose concurrency is ublkimg's own (queues sharing an image's
# metadata, recovery, live jobs, restart), about 7 minutes on this 2-core
# machine, and leaves out the RBD ones (5 minutes of waiting on the OSD;
# drivers/rbd's completions run under -race in `unit`) and the encrypted
# live scenario, whose LUKS copies under the race runtime in TCG stalled a
# guest write past the 30 s hung-task limit (see docs/control.md).
VM_RACE_TESTS := TestVMLifecycleRaw|TestVMLifecycleQcow2|TestVMQcow2Features|TestVMMisc|TestVMKill|TestVMGuestTests|TestVMRecovery|TestVMDetach|TestVMJobs|TestVMStatsRestart

vmtest-race:
	UBLKIMG_VM=1 UBLKIMG_VM_RACE=1 $(GO) test -count=1 -p 1 -timeout 60m -run '^($(VM_RACE_TESTS))$$' ./ublk/

# Long fuzzing (not part of `make test`, which runs the seed corpora):
# every Fuzz target of every package for FUZZTIME, among them the parsers,
# the qcow2 driver (FuzzImage) and the verbs (img FuzzVerbs: info, check,
# map, convert on mutated images). Each input runs under the bounds of
# internal/fuzzlimit (heap growth, bytes allocated, time), so a blow-up is
# a failing input the fuzzer saves; ulimit -v (FUZZMEM KiB) caps every
# process besides, for a blow-up that outruns the watchdog.
FUZZTIME ?= 60s
FUZZMEM  ?= 8388608
fuzz:
	@ulimit -v $(FUZZMEM); \
	for pkg in $$($(GO) list ./...); do \
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
