package coroutine

import (
	"iter"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/uring"
)

// Co is a coroutine running on a [Loop]. A *Co is the proof that the caller
// runs inside a coroutine: functions taking one may yield.
//
// All fields are owned by the loop's thread.
type Co struct {
	loop  *Loop
	id    uint32
	next  func() (struct{}, bool)
	yield func(struct{}) bool

	pending   int     // queued operations whose completion has not arrived
	nops      int     // operations queued since the last Wait (next slot)
	results   []int32 // completion results of the current batch, by slot
	waitingIO bool    // parked in Wait; the last completion makes it runnable

	// wakeSeq orders a waker's writes before the woken coroutine's reads.
	// A wake-up from another loop travels through the kernel (MSG_RING or
	// an eventfd), which the Go memory model and the race detector cannot
	// see; this atomic release/acquire pair makes the edge explicit.
	wakeSeq atomic.Uint32

	nextWaiter *Co           // intrusive link for waitList
	wantWrite  bool          // waiting on an RWMutex for the write lock
	ts         unix.Timespec // Sleep's timeout; lives here so it never moves
	Local      any           // free for the coroutine's owner (e.g. a ublk tag's state)
}

func (l *Loop) newCo(fn func(co *Co)) *Co {
	co := &Co{loop: l, results: make([]int32, 0, 4)}
	if n := len(l.free); n > 0 {
		co.id = l.free[n-1]
		l.free = l.free[:n-1]
		l.cos[co.id] = co
	} else {
		co.id = uint32(len(l.cos))
		l.cos = append(l.cos, co)
	}
	l.live++
	co.next, _ = iter.Pull(func(yield func(struct{}) bool) {
		co.yield = yield
		fn(co)
	})
	return co
}

func (l *Loop) resume(co *Co) {
	if _, ok := co.next(); ok {
		return
	}
	// The body returned.
	if co.pending != 0 {
		panic("coroutine: coroutine finished with operations in flight")
	}
	l.cos[co.id] = nil
	l.free = append(l.free, co.id)
	l.live--
}

// Loop is the loop the coroutine runs on.
func (co *Co) Loop() *Loop { return co.loop }

// park yields until something makes the coroutine runnable again.
func (co *Co) park() {
	co.yield(struct{}{})
	co.wakeSeq.Load() // acquire what the waker released
}

// Yield lets the loop run every other runnable coroutine and submit queued
// operations, then continues.
func (co *Co) Yield() {
	co.loop.ready = append(co.loop.ready, co)
	co.park()
}

// wake makes co runnable. from is the loop of the caller, or nil when the
// caller is not running on any loop.
func (co *Co) wake(from *Loop) {
	co.wakeSeq.Add(1) // release: see park
	switch {
	case from == co.loop:
		co.loop.ready = append(co.loop.ready, co)
	case from != nil:
		from.sendWake(co)
	default:
		co.loop.postWake(co)
	}
}

// SQE returns a free SQE on the coroutine's ring whose completion will be
// delivered to this coroutine; the caller fills it with a uring Prep method
// and must not change its UserData. Operations queued this way are
// submitted when the coroutine yields (or earlier if the SQ fills up), and
// [Co.Wait] waits for all of them. Do not set IOSQE_CQE_SKIP_SUCCESS: every
// queued operation must complete with a CQE.
//
// Buffers referenced by the SQE must be heap or mmap memory and stay alive
// until Wait returns.
func (co *Co) SQE() *uring.SQE {
	sqe := co.loop.getSQE()
	slot := co.nops
	co.nops++
	if slot < cap(co.results) {
		co.results = co.results[:slot+1]
	} else {
		co.results = append(co.results, 0)
	}
	co.results[slot] = 0
	co.pending++
	sqe.UserData = userData(kindOp, uint32(slot), co.id)
	return sqe
}

// Wait yields until every operation queued with [Co.SQE] since the last Wait
// has completed, and returns the result (CQE res) of the first of them.
// [Co.Results] has all of them.
func (co *Co) Wait() int32 {
	for co.pending > 0 {
		co.waitingIO = true
		co.park()
	}
	co.nops = 0
	if len(co.results) == 0 {
		return 0
	}
	return co.results[0]
}

// Results are the CQE results of the batch the last [Co.Wait] waited for,
// in the order the SQEs were obtained. Valid until the next SQE call.
func (co *Co) Results() []int32 { return co.results }

// Sleep suspends the coroutine for at least d.
func (co *Co) Sleep(d time.Duration) {
	co.ts = unix.NsecToTimespec(d.Nanoseconds())
	co.SQE().PrepTimeout(&co.ts, 0, 0)
	co.Wait() // -ETIME is the normal result of an expired timeout
}

// Offload runs fn on a new goroutine and suspends the coroutine until it
// returns: the way to do CPU-heavy or blocking work (compression, lseek on a
// slow filesystem, ioctls) without stalling the loop's other coroutines.
func (co *Co) Offload(fn func()) {
	loop := co.loop
	go func() {
		fn()
		co.wakeSeq.Add(1)
		loop.postWake(co)
	}()
	co.park()
}

// waitList is a FIFO of parked coroutines linked through Co.nextWaiter.
// A coroutine is on at most one list at a time.
type waitList struct {
	head, tail *Co
}

func (w *waitList) push(co *Co) {
	co.nextWaiter = nil
	if w.tail == nil {
		w.head = co
	} else {
		w.tail.nextWaiter = co
	}
	w.tail = co
}

func (w *waitList) pop() *Co {
	co := w.head
	if co == nil {
		return nil
	}
	w.head = co.nextWaiter
	if w.head == nil {
		w.tail = nil
	}
	co.nextWaiter = nil
	return co
}

func (w *waitList) empty() bool { return w.head == nil }
