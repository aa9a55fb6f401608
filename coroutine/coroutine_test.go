package coroutine

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/uring"
)

func startLoops(t testing.TB, n int) []*Loop {
	t.Helper()
	loops := make([]*Loop, n)
	for i := range loops {
		l, err := Start(Config{})
		if err != nil {
			t.Fatal(err)
		}
		loops[i] = l
		t.Cleanup(l.Close)
	}
	return loops
}

func TestRunReturnsError(t *testing.T) {
	want := errors.New("boom")
	if err := Run(func(co *Co) error { return want }); err != want {
		t.Fatalf("Run = %v, want %v", err, want)
	}
}

func TestNopCompletesWithResult(t *testing.T) {
	err := Run(func(co *Co) error {
		for i := range 100 {
			co.SQE().PrepNop()
			if res := co.Wait(); res != 0 {
				t.Errorf("nop %d: res %d", i, res)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestBatchResultsBySlot(t *testing.T) {
	dir := t.TempDir()
	fd, err := unix.Open(dir+"/f", unix.O_RDWR|unix.O_CREAT, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	bufs := [][]byte{make([]byte, 100), make([]byte, 200), make([]byte, 300)}
	err = Run(func(co *Co) error {
		for i, b := range bufs {
			co.Write(int32(fd), b, uint64(i*1000))
		}
		co.Wait()
		got := co.Results()
		if len(got) != 3 || got[0] != 100 || got[1] != 200 || got[2] != 300 {
			t.Errorf("results %v, want [100 200 300]", got)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestFullSQ queues far more operations than the ring has entries from one
// coroutine: Co.SQE must submit to make room and none may be lost.
func TestFullSQ(t *testing.T) {
	l, err := Start(Config{Entries: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	err = l.Call(func(co *Co) error {
		for range 1000 {
			co.SQE().PrepNop()
		}
		co.Wait()
		if n := len(co.Results()); n != 1000 {
			t.Errorf("%d results, want 1000", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestManyCoroutinesInterleave(t *testing.T) {
	var order []int
	err := Run(func(co *Co) error {
		var wg Queue
		done := 0
		for i := range 3 {
			co.Loop().Go(func(c *Co) {
				for j := range 3 {
					order = append(order, i*10+j)
					c.Yield()
				}
				done++
				wg.Next(c)
			})
		}
		for done < 3 {
			wg.Wait(co, nil)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []int{0, 10, 20, 1, 11, 21, 2, 12, 22}
	if len(order) != len(want) {
		t.Fatalf("order %v, want %v", order, want)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("order %v, want %v", order, want)
		}
	}
}

func TestSleep(t *testing.T) {
	start := time.Now()
	if err := Run(func(co *Co) error { co.Sleep(20 * time.Millisecond); return nil }); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 20*time.Millisecond {
		t.Fatalf("slept %v, want >= 20ms", d)
	}
}

// TestOffloadResumesOnLoop: the offloaded function runs on another thread
// while the coroutine is parked (the loop runs its other coroutines
// meanwhile), and the coroutine resumes on the loop's thread.
func TestOffloadResumesOnLoop(t *testing.T) {
	l := startLoops(t, 1)[0]
	err := l.Call(func(co *Co) error {
		tid := unix.Gettid()
		var worker int
		// The new coroutine runs once this one yields, that is once it
		// is parked in Offload: the offloaded function returns after.
		parked := make(chan struct{})
		l.Go(func(*Co) { close(parked) })
		co.Offload(func() { <-parked; worker = unix.Gettid() })
		if got := unix.Gettid(); got != tid {
			t.Errorf("resumed on thread %d, want loop thread %d", got, tid)
		}
		if worker == 0 || worker == tid {
			t.Errorf("offloaded function ran on thread %d, want one other than the loop's %d", worker, tid)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestYieldLetsTheLoopThrough: a coroutine that only yields, waiting for a
// function posted from another goroutine, sees it run: each Yield takes the
// loop through the kernel, where the inbox's eventfd read completes.
func TestYieldLetsTheLoopThrough(t *testing.T) {
	l := startLoops(t, 1)[0]
	done := make(chan error, 1)
	go func() {
		done <- l.Call(func(co *Co) error {
			posted := false // owned by the loop's thread
			go l.Post(func() { posted = true })
			for !posted {
				co.Yield()
			}
			return nil
		})
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		// The coroutine spins on the loop's thread forever: the loop
		// can be neither closed nor left running for the next test,
		// and a panic's traceback would wait for it to stop.
		fmt.Fprintln(os.Stderr, "FAIL TestYieldLetsTheLoopThrough: a coroutine yielding in a loop kept the loop from its posted work")
		os.Exit(1)
	}
}

func TestPostFromManyGoroutines(t *testing.T) {
	l := startLoops(t, 1)[0]
	var count atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 500 {
				done := make(chan struct{})
				l.Post(func() { count.Add(1); close(done) })
				<-done
			}
		}()
	}
	wg.Wait()
	if c := count.Load(); c != 8*500 {
		t.Fatalf("ran %d posted functions, want %d", c, 8*500)
	}
}

func TestGoOffLoopPanics(t *testing.T) {
	l := startLoops(t, 1)[0]
	defer func() {
		if recover() == nil {
			t.Fatal("Loop.Go from a foreign goroutine did not panic")
		}
	}()
	l.Go(func(*Co) {})
}

// TestMutexCrossLoopStress hands one Mutex between coroutines on several
// loops. The protected counter is updated non-atomically across a yield, so
// any break in mutual exclusion loses increments; every waiter must also be
// resumed on its own loop's thread.
func TestMutexCrossLoopStress(t *testing.T) {
	const loops, perLoop, iters = 4, 8, 300
	ls := startLoops(t, loops)
	var mu Mutex
	counter := 0
	var wrongThread atomic.Int64
	var wg sync.WaitGroup
	for _, l := range ls {
		for range perLoop {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := l.Call(func(co *Co) error {
					tid := unix.Gettid()
					for i := range iters {
						mu.Lock(co)
						if unix.Gettid() != tid {
							wrongThread.Add(1)
						}
						v := counter
						if i%3 == 0 {
							co.Yield()
						}
						counter = v + 1
						mu.Unlock(co)
					}
					return nil
				})
				if err != nil {
					t.Error(err)
				}
			}()
		}
	}
	wg.Wait()
	if want := loops * perLoop * iters; counter != want {
		t.Fatalf("counter %d, want %d: mutual exclusion broken", counter, want)
	}
	if n := wrongThread.Load(); n != 0 {
		t.Fatalf("%d resumptions on a foreign thread", n)
	}
}

// TestRWMutexCrossLoop checks readers share, writers exclude, across loops.
func TestRWMutexCrossLoop(t *testing.T) {
	ls := startLoops(t, 3)
	var rw RWMutex
	var readers, writers atomic.Int64
	var maxReaders atomic.Int64
	var bad atomic.Int64
	var wg sync.WaitGroup
	for i, l := range ls {
		for j := range 6 {
			write := (i+j)%3 == 0
			wg.Add(1)
			go func() {
				defer wg.Done()
				l.Call(func(co *Co) error {
					for range 200 {
						if write {
							rw.Lock(co)
							if writers.Add(1) != 1 || readers.Load() != 0 {
								bad.Add(1)
							}
							co.Yield()
							writers.Add(-1)
							rw.Unlock(co)
						} else {
							rw.RLock(co)
							r := readers.Add(1)
							if writers.Load() != 0 {
								bad.Add(1)
							}
							for {
								m := maxReaders.Load()
								if r <= m || maxReaders.CompareAndSwap(m, r) {
									break
								}
							}
							co.Yield()
							readers.Add(-1)
							rw.RUnlock(co)
						}
					}
					return nil
				})
			}()
		}
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d exclusion violations", bad.Load())
	}
	if maxReaders.Load() < 2 {
		t.Errorf("readers never overlapped (max %d)", maxReaders.Load())
	}
}

// TestQueueWakesOnOwnLoop parks waiters on one loop and wakes them from a
// coroutine on another loop and from a plain goroutine.
func TestQueueWakesOnOwnLoop(t *testing.T) {
	ls := startLoops(t, 2)
	var q Queue
	var mu Mutex
	ready := 0
	const waiters = 10
	var woke atomic.Int64
	var wg sync.WaitGroup
	for range waiters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ls[0].Call(func(co *Co) error {
				tid := unix.Gettid()
				mu.Lock(co)
				ready++
				q.Wait(co, &mu)
				mu.Unlock(co)
				if unix.Gettid() == tid {
					woke.Add(1)
				}
				return nil
			})
		}()
	}
	// Wait until every waiter is parked (they registered under mu).
	for {
		var n int
		ls[1].Call(func(co *Co) error { mu.Lock(co); n = ready; mu.Unlock(co); return nil })
		if n == waiters {
			break
		}
		runtime.Gosched()
	}
	// Half from the other loop, the rest from a plain goroutine.
	ls[1].Call(func(co *Co) error {
		for range waiters / 2 {
			if !q.Next(co) {
				t.Error("Next found no waiter")
			}
		}
		return nil
	})
	q.RestartAll(nil)
	wg.Wait()
	if woke.Load() != waiters {
		t.Fatalf("%d of %d waiters resumed on their own loop", woke.Load(), waiters)
	}
	if !q.Empty() {
		t.Fatal("queue not empty")
	}
}

func TestCloseWaitsForCoroutines(t *testing.T) {
	l, err := Start(Config{})
	if err != nil {
		t.Fatal(err)
	}
	var finished atomic.Bool
	l.Spawn(func(co *Co) {
		co.Sleep(30 * time.Millisecond)
		finished.Store(true)
	})
	l.Close()
	if !finished.Load() {
		t.Fatal("Close returned before the coroutine finished")
	}
	l.Close() // idempotent
}

// BenchmarkSwitch measures one coroutine switch: two coroutines on one loop
// wake each other and park (Yield would add a trip through the kernel);
// each round is two parks and two resumes, so ns/op is reported per switch.
func BenchmarkSwitch(b *testing.B) {
	l, err := Start(Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	n := b.N
	b.ResetTimer()
	l.Call(func(co *Co) error {
		done := false
		partner := l.Go(func(c *Co) {
			for !done {
				co.wake(l)
				c.park()
			}
		})
		for range n {
			co.park()
			partner.wake(l)
		}
		done = true
		return nil
	})
	b.StopTimer()
	// n rounds: this coroutine and its partner each park and resume once,
	// four switches.
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(4*n), "ns/switch")
}

// BenchmarkNopRoundTrip is one coroutine doing a NOP through the ring and
// waiting for it: SQE, submit, reap, resume.
func BenchmarkNopRoundTrip(b *testing.B) {
	l, err := Start(Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	n := b.N
	b.ResetTimer()
	l.Call(func(co *Co) error {
		for range n {
			co.SQE().PrepNop()
			co.Wait()
		}
		return nil
	})
}

// BenchmarkNopDepth32 keeps 32 coroutines each doing NOPs.
func BenchmarkNopDepth32(b *testing.B) {
	l, err := Start(Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	n := b.N
	b.ResetTimer()
	l.Call(func(co *Co) error {
		var q Queue
		left := 32
		per := n/32 + 1
		for range 32 {
			l.Go(func(c *Co) {
				for range per {
					c.SQE().PrepNop()
					c.Wait()
				}
				left--
				q.Next(c)
			})
		}
		for left > 0 {
			q.Wait(co, nil)
		}
		return nil
	})
}

// TestAdaptivePolling checks QEMU's poll-time rule: sleeps that end within
// PollMax grow the poll time, a sleep longer than PollMax turns polling off,
// and events caught while polling complete as usual.
func TestAdaptivePolling(t *testing.T) {
	const pollMax = 200 * time.Millisecond
	l, err := Start(Config{PollMax: pollMax})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	pollNow := func() (d time.Duration) {
		l.Call(func(co *Co) error { d = l.pollNow; return nil })
		return d
	}
	// Short sleeps, well within PollMax: the poll time doubles from
	// pollGrowStart on every sleep that outlasts it.
	l.Call(func(co *Co) error {
		for range 8 {
			co.Sleep(time.Millisecond)
		}
		return nil
	})
	if got := pollNow(); got < 16*pollGrowStart || got > pollMax {
		t.Fatalf("after short sleeps the poll time is %v, want between %v and %v", got, 16*pollGrowStart, pollMax)
	}
	// Idle for longer than PollMax: polling stops. The coroutine's timer
	// is the loop's only event, so the loop polls, then sleeps in the
	// kernel for more than PollMax; the coroutine resumes right after
	// that sleep, before any other wake-up.
	var idle time.Duration
	l.Call(func(co *Co) error {
		co.Sleep(3 * pollMax)
		idle = l.pollNow
		return nil
	})
	if idle != 0 {
		t.Fatalf("after an idle spell the poll time is %v, want 0", idle)
	}
}

// TestWakeFallbackCrossLoop drives the fallback a loop takes when its
// MSG_RING wake-up could not be posted (the CQE of a failed kindWakeSent):
// loop b hands the wake to loop a's inbox while a keeps growing its
// coroutine table. The wake must resume the right coroutine on a, and b
// must not touch a's table (the race detector checks that in make test).
func TestWakeFallbackCrossLoop(t *testing.T) {
	ls := startLoops(t, 2)
	a, b := ls[0], ls[1]
	const rounds = 300
	woken := make(chan int, 1)
	targetc := make(chan *Co, 1)
	var q Queue
	stop := false // owned by a's thread
	a.Post(func() {
		target := a.Go(func(co *Co) {
			for !stop {
				woken <- unix.Gettid() // buffered: the test takes it before the next wake
				co.park()
			}
		})
		targetc <- target
		// Churn: coroutines that stay parked, so a's table keeps growing.
		a.Go(func(co *Co) {
			for !stop {
				co.Loop().Go(func(c *Co) { q.Wait(c, nil) })
				co.Yield()
			}
			q.RestartAll(co)
		})
	})
	target := <-targetc
	tid := <-woken
	failed := &uring.CQE{UserData: userData(kindWakeSent, a.id, target.id), Res: -int32(unix.EOVERFLOW)}
	for i := range rounds {
		b.Post(func() { b.wakesSent++; b.dispatch(failed) }) // as if b had sent it
		if got := <-woken; got != tid {
			t.Fatalf("round %d: coroutine resumed on thread %d, its loop runs on %d", i, got, tid)
		}
	}
	a.Call(func(co *Co) error {
		stop = true
		target.wake(a)
		return nil
	})
}

// TestWakeFromEndingLoop wakes a waiter on a long-lived loop from the last
// coroutine of a private loop that is closing (Run returned, its Close
// waits for the coroutines left): the wake that coroutine queued (a
// MSG_RING SQE) must reach the waiter although its loop ends right after.
// A job's background coroutine unlocking a file driver's lock as its loop
// closed left a device's write parked for good.
func TestWakeFromEndingLoop(t *testing.T) {
	l := startLoops(t, 1)[0]
	for i := range 200 {
		var mu Mutex
		locked := make(chan struct{})
		done := make(chan error, 1)
		if err := Run(func(co *Co) error {
			mu.Lock(co)
			go func() {
				done <- l.Call(func(co *Co) error {
					close(locked)
					mu.Lock(co) // parks: the private loop holds it
					mu.Unlock(co)
					return nil
				})
			}()
			<-locked
			// The unlock comes from a coroutine that outlives fn, so it
			// runs while Run's Close has the loop stopping.
			co.loop.Go(func(co *Co) {
				for !hasWaiters(&mu) || !co.loop.stopping.Load() {
					co.Yield()
				}
				mu.Unlock(co)
			})
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			// Not Fatal: the loops' cleanup would wait for the parked
			// waiter for good and hide the message.
			panic(fmt.Sprintf("round %d: the waiter woken by a loop that ended never ran", i))
		}
	}
}

func hasWaiters(m *Mutex) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.waiters.empty()
}
