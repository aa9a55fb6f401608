package fuzzlimit

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// recorder is a testing.TB that records what Guard reports.
type recorder struct {
	testing.TB
	cleanups []func()
	errs     []string
}

func (r *recorder) Helper()           {}
func (r *recorder) Name() string      { return "recorder" }
func (r *recorder) Cleanup(fn func()) { r.cleanups = append(r.cleanups, fn) }
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func (r *recorder) end() {
	for _, fn := range r.cleanups {
		fn()
	}
}

var sink []byte

// TestAllocLimit: an input that allocates more than its limit fails, even
// when the memory is garbage by the time it ends; one within it passes.
func TestAllocLimit(t *testing.T) {
	for _, tc := range []struct {
		alloc int
		fail  bool
	}{{1 << 20, false}, {32 << 20, true}} {
		r := &recorder{TB: t}
		Guard(r, Limits{Alloc: 8 << 20})
		sink = make([]byte, tc.alloc)
		sink = nil
		r.end()
		if fail := len(r.errs) > 0; fail != tc.fail || fail && !strings.Contains(r.errs[0], "more than its 8 MiB") {
			t.Errorf("allocating %d bytes: %q", tc.alloc, r.errs)
		}
	}
}

// TestWatchdog: an input that grows the heap past its limit, or runs past
// its time, panics the process (run in a child: the panic ends it).
func TestWatchdog(t *testing.T) {
	if what := os.Getenv("FUZZLIMIT_WATCHDOG"); what != "" {
		Guard(t, Limits{Heap: 64 << 20, Time: 2 * time.Second})
		if what == "heap" {
			var keep [][]byte
			for range 1000 {
				b := make([]byte, 1<<20)
				for i := range b {
					b[i] = 1
				}
				keep = append(keep, b)
				time.Sleep(time.Millisecond)
			}
			sink = keep[0]
		}
		time.Sleep(time.Minute)
		return
	}
	for what, want := range map[string]string{"heap": "the heap grew by", "time": "the input has run for"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestWatchdog$")
		cmd.Env = append(os.Environ(), "FUZZLIMIT_WATCHDOG="+what)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "fuzzlimit: TestWatchdog: "+want) {
			t.Errorf("%s: %v\n%.2000s", what, err, out)
		}
	}
}
