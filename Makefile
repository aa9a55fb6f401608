# ublkimg: `make test` is the one test command (CI runs it through .ci/run).
GO          ?= go
STATICCHECK := $(CURDIR)/.cache/bin/staticcheck
VM_PKGS     := ./vmtest/ ./ublk/...

.PHONY: all build test deps check unit vmtest fuzz bench demo clean

all: build

build:
	$(GO) build -o ublkimg ./cmd/ublkimg

# Everything: tools, static checks, unit tests with the race detector, then
# the ublk end-to-end tests in a VM (the host kernel has no ublk).
test: deps check unit vmtest
	@echo "make test: all passed"

deps:
	@scripts/deps.sh

check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

# The stack-move stress test runs again without the race detector, whose
# instrumentation keeps append's arrays off the stack and so hides the bug
# class it guards against (an SQE pointing into a goroutine stack).
unit:
	$(GO) test -race -count=1 -timeout 20m ./...
	$(GO) test -count=1 -run 'UnderStackMoves|IOMemoryIsHeap' ./drivers/file/ ./coroutine/

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
