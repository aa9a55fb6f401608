// Package fuzzlimit bounds what one fuzz input may cost, so that an input
// that makes the code under test allocate without bound or hang is a
// finding (a failing input the fuzzer records), not a slow test or an
// exhausted machine. It works the same for the seed corpora that `go test`
// runs and under `go test -fuzz`, with or without the race detector: the
// bounds are on the Go heap, which is where every buffer of this module
// lives (bdrv.AlignedBuffer allocates from it too).
//
// Two checks cover an input:
//
//   - when it ends, the bytes it allocated in all (runtime/metrics
//     /gc/heap/allocs:bytes): a huge allocation fails the input however
//     short-lived it was;
//   - while it runs, a watchdog samples the heap and the time taken: an
//     input that grows the heap past Limits.Heap or runs past Limits.Time
//     panics the process (with every goroutine's stack), which the fuzzer
//     reports as a crash with that input, before the machine runs out of
//     memory or the test its time.
//
// The process-wide measures are the input's own because fuzz inputs run
// one at a time, after every ordinary test of the package has finished.
package fuzzlimit

import (
	"fmt"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Limits are the bounds of one input; zero fields take the defaults.
type Limits struct {
	// Alloc bounds the bytes the input allocates (default 256 MiB).
	Alloc uint64
	// Heap bounds how far the heap may grow while the input runs
	// (default 1 GiB).
	Heap uint64
	// Time bounds how long the input may run (default 60 s: the race
	// detector on a loaded machine is slow).
	Time time.Duration
}

// Defaults, scaled by the environment variable FUZZ_LIMIT_SCALE (a
// positive integer, e.g. for a slower machine).
const (
	defaultAlloc = 256 << 20
	defaultHeap  = 1 << 30
	defaultTime  = 60 * time.Second
)

// ScaleEnv is the environment variable that multiplies every limit.
const ScaleEnv = "FUZZ_LIMIT_SCALE"

// ReportEnv, when set, has every input print the bytes it allocated on
// stderr, for choosing a target's limits.
const ReportEnv = "FUZZ_LIMIT_REPORT"

func (l Limits) withDefaults() Limits {
	if l.Alloc == 0 {
		l.Alloc = defaultAlloc
	}
	if l.Heap == 0 {
		l.Heap = defaultHeap
	}
	if l.Time == 0 {
		l.Time = defaultTime
	}
	if s, err := strconv.Atoi(os.Getenv(ScaleEnv)); err == nil && s > 0 {
		l.Alloc *= uint64(s)
		l.Heap *= uint64(s)
		l.Time *= time.Duration(s)
	}
	return l
}

// input is the input being run, for the watchdog.
type input struct {
	name     string
	start    time.Time
	heapBase uint64
	l        Limits
}

var (
	watchOnce sync.Once
	current   atomic.Pointer[input]
)

// watchEvery is the watchdog's sampling period: a runaway allocation
// touching its memory grows by well under a GiB in that time.
const watchEvery = 5 * time.Millisecond

// Guard puts the rest of the calling fuzz input (t is the input's test)
// under the limits l. Call it first in the fuzz function.
func Guard(t testing.TB, l Limits) {
	t.Helper()
	l = l.withDefaults()
	in := &input{name: t.Name(), start: time.Now(), heapBase: read(heapObjects), l: l}
	watchOnce.Do(func() { go watch() })
	allocs := read(heapAllocs)
	current.Store(in)
	t.Cleanup(func() {
		current.CompareAndSwap(in, nil)
		if os.Getenv(ReportEnv) != "" {
			fmt.Fprintf(os.Stderr, "fuzzlimit: %s allocated %d bytes\n", t.Name(), read(heapAllocs)-allocs)
		}
		if n := read(heapAllocs) - allocs; n > l.Alloc {
			t.Errorf("fuzzlimit: the input allocated %d MiB, more than its %d MiB", n>>20, l.Alloc>>20)
		}
	})
}

// watch panics when the running input exceeds its heap or time limit.
func watch() {
	tick := time.NewTicker(watchEvery)
	for range tick.C {
		in := current.Load()
		if in == nil {
			continue
		}
		var why string
		if h := read(heapObjects); h > in.heapBase+in.l.Heap {
			why = fmt.Sprintf("the heap grew by %d MiB, more than %d MiB", (h-in.heapBase)>>20, in.l.Heap>>20)
		} else if d := time.Since(in.start); d > in.l.Time {
			why = fmt.Sprintf("the input has run for %v, more than %v", d.Round(time.Millisecond), in.l.Time)
		}
		if why != "" && current.Load() == in {
			debug.SetTraceback("all")
			panic(fmt.Sprintf("fuzzlimit: %s: %s", in.name, why))
		}
	}
}

const (
	heapAllocs  = "/gc/heap/allocs:bytes"
	heapObjects = "/memory/classes/heap/objects:bytes"
)

// read returns one runtime metric.
func read(name string) uint64 {
	s := []metrics.Sample{{Name: name}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}
