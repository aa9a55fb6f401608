package coroutine

import (
	"iter"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/uring"
)

// Co is a coroutine running on a [Loop]. A *Co is the proof that the caller
// runs inside a coroutine: functions taking one may yield.
//
// Fields are owned by the loop's thread (the loop and the coroutine run on
// it in turn), except where a comment names another guard.
type Co struct {
	loop  *Loop
	id    uint32 // set at creation, read-only while the coroutine lives
	next  func() (struct{}, bool)
	yield func(struct{}) bool

	pending   int     // queued operations whose completion has not arrived
	nops      int     // operations queued since the last Wait (next slot)
	results   []int32 // completion results of the current batch, by slot
	waitingIO bool    // parked in Wait; the last completion makes it runnable

	// Memory the current batch hands to the kernel, held from the Prep to
	// the end of Wait: iovec arrays of vectored operations by slot (heap,
	// reused by later batches), and a pin on every Go object the kernel
	// reads or writes. See "Memory handed to the kernel" in the package
	// documentation.
	iovs   [][]unix.Iovec
	pin    runtime.Pinner
	pinned bool

	// wakeSeq orders a waker's writes before the woken coroutine's reads.
	// A wake-up from another loop travels through the kernel (MSG_RING or
	// an eventfd), which the Go memory model and the race detector cannot
	// see; this atomic release/acquire pair makes the edge explicit.
	wakeSeq atomic.Uint32

	// nextWaiter and wantWrite belong to the wait list the coroutine is
	// parked on, guarded by that list's lock (Mutex, RWMutex, Queue).
	nextWaiter *Co  // intrusive link for waitList
	wantWrite  bool // waiting on an RWMutex for the write lock

	ts    unix.Timespec // Sleep's timeout; lives here, on the heap, until Wait
	Local any           // free for the coroutine's owner (e.g. a ublk tag's state)
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

// Yield lets the loop run every other runnable coroutine, submit queued
// operations and take what completed or was posted (one trip through the
// kernel), then continues.
func (co *Co) Yield() {
	co.loop.yielded = append(co.loop.yielded, co)
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
// SQE is for operations that hand the kernel no memory by address (NOP,
// fsync, fallocate, cancel, a uring_cmd whose payload is copied into the
// SQE). Reads and writes go through [Co.Read], [Co.Write], [Co.Readv] and
// [Co.Writev], which hold their memory until Wait returns. A caller that
// still fills an SQE with an address owns that memory: mmap'd memory, or
// heap memory it keeps referenced and pinned (runtime.Pinner) until Wait
// returns; never a goroutine stack.
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

// iovMax is the most buffers one vectored request takes (the kernel's
// UIO_MAXIOV); [Co.Readv] and [Co.Writev] leave the rest to a short
// transfer.
const iovMax = 1024

// Read queues IORING_OP_READ: pread(fd, buf, off) (off ^uint64(0): the file
// position). buf is referenced and pinned until [Co.Wait] returns. The SQE
// is returned for flags (SQEIOLink, ...); its address fields must not be
// changed.
func (co *Co) Read(fd int32, buf []byte, off uint64) *uring.SQE {
	sqe := co.SQE()
	co.hold(buf)
	sqe.PrepRead(fd, buf, off)
	return sqe
}

// Write queues IORING_OP_WRITE: pwrite(fd, buf, off), holding buf as
// [Co.Read] does.
func (co *Co) Write(fd int32, buf []byte, off uint64) *uring.SQE {
	sqe := co.SQE()
	co.hold(buf)
	sqe.PrepWrite(fd, buf, off)
	return sqe
}

// Readv queues a read of the buffers bufs at off: IORING_OP_READV over an
// iovec array the coroutine owns (on the heap, reused by later requests),
// or a plain READ when only one buffer is not empty. Empty buffers are
// skipped; past the first 1024 the rest is left over, and the result is a
// short transfer. The buffers and the array are referenced and pinned until
// [Co.Wait] returns.
func (co *Co) Readv(fd int32, bufs [][]byte, off uint64) *uring.SQE {
	return co.vectored(false, fd, bufs, off)
}

// Writev queues a write of the buffers bufs at off, as [Co.Readv] reads.
func (co *Co) Writev(fd int32, bufs [][]byte, off uint64) *uring.SQE {
	return co.vectored(true, fd, bufs, off)
}

func (co *Co) vectored(write bool, fd int32, bufs [][]byte, off uint64) *uring.SQE {
	sqe := co.SQE()
	b, one := single(bufs)
	if one {
		co.hold(b)
	}
	switch {
	case one && write:
		sqe.PrepWrite(fd, b, off)
	case one:
		sqe.PrepRead(fd, b, off)
	case write:
		sqe.PrepWritev(fd, co.iovecs(bufs), off)
	default:
		sqe.PrepReadv(fd, co.iovecs(bufs), off)
	}
	return sqe
}

// single returns the only non-empty buffer of bufs, if there is exactly
// one (or none: an empty buffer then).
func single(bufs [][]byte) ([]byte, bool) {
	var only []byte
	n := 0
	for _, b := range bufs {
		if len(b) > 0 {
			only = b
			if n++; n > 1 {
				return nil, false
			}
		}
	}
	return only, true
}

// hold keeps b's memory for the kernel until Wait returns. Storing the
// pointer in the Co (through the Pinner) also makes the compiler put every
// buffer that reaches an SQE on the heap: it cannot prove the pointer dies
// with the caller's frame, so no caller's buffer can live on its stack.
func (co *Co) hold(b []byte) {
	if len(b) == 0 {
		return
	}
	co.pin.Pin(unsafe.SliceData(b))
	co.pinned = true
}

// iovecs builds the iovec array of the operation in the newest slot into
// that slot's reusable heap array, holding every buffer and the array.
func (co *Co) iovecs(bufs [][]byte) []unix.Iovec {
	slot := co.nops - 1
	for len(co.iovs) <= slot {
		co.iovs = append(co.iovs, nil)
	}
	v := co.iovs[slot][:0]
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		if len(v) == iovMax {
			break
		}
		co.hold(b)
		v = append(v, unix.Iovec{Base: unsafe.SliceData(b), Len: uint64(len(b))})
	}
	co.iovs[slot] = v
	if len(v) > 0 {
		co.pin.Pin(unsafe.SliceData(v))
		co.pinned = true
	}
	return v
}

// release drops what the finished batch held for the kernel, so that
// buffers are not kept alive past their request.
func (co *Co) release() {
	if co.pinned {
		co.pin.Unpin()
		co.pinned = false
	}
	for i := range min(co.nops, len(co.iovs)) {
		clear(co.iovs[i])
		co.iovs[i] = co.iovs[i][:0]
	}
}

// Wait yields until every operation queued with [Co.SQE] since the last Wait
// has completed, and returns the result (CQE res) of the first of them.
// [Co.Results] has all of them.
func (co *Co) Wait() int32 {
	for co.pending > 0 {
		co.waitingIO = true
		co.park()
	}
	co.release()
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
	// The timespec is a field of the Co: heap memory that stays put
	// until the timeout completes.
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
