package coroutine

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/uring"
)

// Config sets up a [Loop]. The zero value is usable.
type Config struct {
	// Entries is the SQ size of the loop's ring. 0 means 256.
	Entries uint32
	// SQE128 asks for 128-byte SQEs (needed for ublk control commands).
	SQE128 bool
	// OnThread, if set, runs on the loop's locked OS thread before the ring
	// is created; an error aborts Start. ublk queues use it for
	// prctl(PR_SET_IO_FLUSHER).
	OnThread func() error
	// PollMax enables adaptive polling, as QEMU's IOThread poll-max-ns:
	// when the loop runs out of work it checks the ring for completions
	// for up to the current poll time before it sleeps in the kernel. The
	// poll time grows (doubling, up to PollMax) while the events that end
	// a sleep come sooner than PollMax, and drops to zero after a sleep
	// longer than that, so an idle loop does not spin. Polling trades CPU
	// time for latency: an event caught by polling costs no wake-up of
	// the thread. 0 disables it.
	PollMax time.Duration
}

// userData layout: kind in the top byte; the rest depends on the kind.
//
//	kindOp:       kind | slot<<32 | coroutine id
//	kindWake:     kind | coroutine id                      (on the target ring)
//	kindWakeSent: kind | target loop id<<32 | coroutine id (source ring)
const (
	kindIgnore uint64 = iota
	kindOp
	kindWake
	kindWakeSent
	kindEventfd
)

const kindShift = 56

func userData(kind uint64, hi uint32, id uint32) uint64 {
	return kind<<kindShift | uint64(hi)<<32 | uint64(id)
}

// Loop is one event loop: an io_uring ring driven by one locked OS thread,
// and the coroutines that run on it (QEMU's AioContext).
//
// Fields without a lock comment are owned by the loop's thread. id, ring
// and tid are set before Start returns and never change.
type Loop struct {
	id   uint32
	ring *uring.Ring
	tid  int

	cos   []*Co    // by coroutine id; nil = free slot
	free  []uint32 // free ids
	live  int      // coroutines created and not finished
	ready []*Co    // runnable, resumed in order after the current coroutine yields
	spare []*Co    // recycled backing array for ready
	// yielded coroutines (Co.Yield) become ready only after the loop has
	// been through the kernel, so a coroutine yielding in a loop cannot
	// keep its own I/O and posted work from ever being taken.
	yielded []*Co
	cqes    [128]uring.CQE

	efd    int    // eventfd that wakes the loop for inbox work
	efdBuf []byte // 8-byte read target of the armed eventfd read (heap, lives with the loop)
	// inbox is work handed to the loop by other threads, guarded by its
	// mutex. Wakes are coroutine ids, resolved on the loop's own thread:
	// other threads never read cos.
	inbox struct {
		sync.Mutex
		fns      []func()
		wakes    []uint32
		signaled bool // an eventfd write is outstanding
		closed   bool
	}
	stopping atomic.Bool
	done     chan struct{}

	// wakesSent counts the MSG_RING wakes this loop submitted whose own
	// completion it has not reaped: the loop does not end before each
	// is known to have reached its target or gone through the target's
	// inbox, or a coroutine woken by the last coroutines of a closing
	// loop would stay parked for good.
	wakesSent int

	pollMax time.Duration // Config.PollMax
	pollNow time.Duration // current poll time, 0 to pollMax

	// wokeAt is the monotonic time at which io_uring_enter last returned
	// (WokeAt).
	wokeAt time.Duration
	// schedAt is wokeAt at the loop's last pass through the Go
	// scheduler (passScheduler).
	schedAt time.Duration
}

var registry struct {
	sync.Mutex
	next  uint32
	loops map[uint32]*Loop
}

// Start creates a loop on a new locked OS thread and returns once its ring is
// set up. The loop runs until [Loop.Close].
func Start(cfg Config) (*Loop, error) {
	l := &Loop{done: make(chan struct{}), efd: -1, efdBuf: make([]byte, 8), pollMax: cfg.PollMax}
	// The id is fixed before the loop's thread starts: other loops read
	// it (sendWake) without a lock.
	registry.Lock()
	registry.next++
	l.id = registry.next
	registry.Unlock()
	errc := make(chan error, 1)
	go l.main(cfg, errc)
	if err := <-errc; err != nil {
		return nil, err
	}
	registry.Lock()
	if registry.loops == nil {
		registry.loops = make(map[uint32]*Loop)
	}
	registry.loops[l.id] = l
	registry.Unlock()
	return l, nil
}

func (l *Loop) main(cfg Config, errc chan<- error) {
	// The thread stays locked for the goroutine's whole life: when the loop
	// ends, the goroutine exits locked and the runtime retires the thread,
	// together with whatever per-thread kernel state the ring gave it.
	runtime.LockOSThread()
	if cfg.OnThread != nil {
		if err := cfg.OnThread(); err != nil {
			errc <- err
			return
		}
	}
	entries := cfg.Entries
	if entries == 0 {
		entries = 256
	}
	flags := uring.SetupSingleIssuer | uring.SetupDeferTaskrun | uring.SetupCoopTaskrun | uring.SetupSubmitAll
	if cfg.SQE128 {
		flags |= uring.SetupSQE128
	}
	ring, err := uring.New(entries, flags)
	if err != nil {
		errc <- fmt.Errorf("coroutine: loop ring: %w", err)
		return
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		ring.Close()
		errc <- fmt.Errorf("coroutine: loop eventfd: %w", err)
		return
	}
	l.ring, l.efd, l.tid = ring, efd, unix.Gettid()
	errc <- nil

	l.armEventfd()
	l.run()

	l.ring.Close()
	unix.Close(l.efd)
	registry.Lock()
	delete(registry.loops, l.id)
	registry.Unlock()
	close(l.done)
}

// run is the loop proper: resume runnable coroutines, submit what they queued
// and wait for completions, dispatch them, repeat.
func (l *Loop) run() {
	for {
		l.passScheduler()
		l.runReady()
		l.ready = append(l.ready, l.yielded...)
		clear(l.yielded)
		l.yielded = l.yielded[:0]
		if l.live == 0 && l.stopping.Load() {
			if l.wakesSent > 0 {
				l.enter(1) // submits them too, if still queued
				continue
			}
			if l.closeInbox() {
				return
			}
			l.drainInbox() // work posted just before Close
			continue
		}
		if len(l.ready) > 0 {
			l.enter(0)
			continue
		}
		if l.pollMax == 0 {
			l.enter(1)
			continue
		}
		l.pollOrSleep()
	}
}

// enter submits the queued SQEs, waits for wait completions and dispatches
// every completion that arrived.
func (l *Loop) enter(wait uint32) {
	if _, err := l.ring.SubmitAndWait(wait); err != nil && !transient(err) {
		panic(fmt.Sprintf("coroutine: io_uring_enter: %v", err))
	}
	l.wokeAt = time.Since(clockBase)
	l.reap()
}

// clockBase anchors WokeAt: time.Since reads only the monotonic clock.
var clockBase = time.Now()

// WokeAt is the time at which the loop last returned from io_uring_enter
// with the completions it then dispatched, on a monotonic clock of the
// process (the time since an arbitrary instant at its start). A coroutine
// resumed by a completion thus learns when the loop received it, at the
// cost of one clock read per io_uring_enter rather than per operation: the
// ublk queues time their requests with it. Only the loop's thread may call
// it.
func (l *Loop) WokeAt() time.Duration { return l.wokeAt }

// pollGrowStart is the first poll time after polling was off, as QEMU's
// default when poll-grow starts from zero.
const pollGrowStart = 4 * time.Microsecond

// pollOrSleep waits for the loop's next event when it has nothing to run:
// first by polling the ring (each io_uring_enter without waiting also runs
// the kernel's deferred completion work) for the current poll time, then
// by sleeping in the kernel. It adapts the poll time to how long the sleep
// lasted, as QEMU's aio_poll does.
func (l *Loop) pollOrSleep() {
	if l.pollNow > 0 {
		deadline := time.Now().Add(l.pollNow)
		for {
			l.enter(0)
			if len(l.ready) > 0 {
				return
			}
			if !time.Now().Before(deadline) {
				break
			}
		}
	}
	start := time.Now()
	l.enter(1)
	slept := time.Since(start)
	switch {
	case slept > l.pollMax:
		l.pollNow = 0
	case slept > l.pollNow:
		l.pollNow = min(max(2*l.pollNow, pollGrowStart), l.pollMax)
	}
}

// schedPeriod is how often the loop passes through the Go scheduler: well
// under the runtime's forcePreemptNS (10 ms).
const schedPeriod = 5 * time.Millisecond

// passScheduler yields the loop's goroutine to the Go scheduler when it
// has not been through it for schedPeriod. The loop never parks (it
// sleeps in io_uring_enter, and coroutine switches keep its time slice),
// so without this the runtime's monitor sees its P "running" for more
// than 10 ms and from then on takes the P away at every system call it
// finds the loop in, however short, handing it to another thread woken
// for nothing, and polls every 20 µs instead of backing off: measured on
// rbd at depth 1, about 25 µs of CPU and 1-2 context switches per request
// (sysmon's nanosleeps went from 1.5 to 0.15 per request). A pass costs a
// couple of thread hand-offs (the goroutine is locked to its thread),
// which every schedPeriod is noise.
func (l *Loop) passScheduler() {
	if l.wokeAt-l.schedAt < schedPeriod {
		return
	}
	l.schedAt = l.wokeAt
	runtime.Gosched()
}

// transient reports errors after which the loop just reaps and retries: the
// kernel could not take more SQEs until completions are consumed.
func transient(err error) bool {
	return errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.ETIME)
}

func (l *Loop) runReady() {
	for len(l.ready) > 0 {
		batch := l.ready
		l.ready = l.spare[:0]
		for i, co := range batch {
			batch[i] = nil
			l.resume(co)
		}
		l.spare = batch[:0]
	}
}

// reap dispatches every available completion. It only records results and
// marks coroutines runnable, so it is safe to call from inside a coroutine
// (Co.SQE does, when the SQ is full).
func (l *Loop) reap() {
	for {
		n := l.ring.PeekCQEs(l.cqes[:])
		for i := range n {
			l.dispatch(&l.cqes[i])
		}
		if n < len(l.cqes) {
			return
		}
	}
}

func (l *Loop) dispatch(cqe *uring.CQE) {
	ud := cqe.UserData
	id := uint32(ud)
	switch ud >> kindShift {
	case kindOp:
		co := l.cos[id]
		slot := int(ud>>32) & 0xffff
		if slot < len(co.results) {
			co.results[slot] = cqe.Res
		}
		co.pending--
		if co.pending == 0 && co.waitingIO {
			co.waitingIO = false
			l.ready = append(l.ready, co)
		}
	case kindWake:
		l.ready = append(l.ready, l.cos[id])
	case kindWakeSent:
		l.wakesSent--
		if cqe.Res >= 0 {
			return
		}
		// MSG_RING failed (target ring full or gone): fall back to the
		// target's inbox, which cannot fail while the loop lives. The
		// target's coroutine table belongs to the target's thread: pass
		// the id, the target looks it up.
		registry.Lock()
		target := registry.loops[uint32(ud>>32)&0xffffff]
		registry.Unlock()
		if target != nil {
			target.postWakeID(id)
		}
	case kindEventfd:
		l.armEventfd()
		l.drainInbox()
	}
}

// closeInbox marks the inbox closed if it is empty, atomically with the
// check, so no posted work is lost when the loop ends.
func (l *Loop) closeInbox() bool {
	l.inbox.Lock()
	defer l.inbox.Unlock()
	if len(l.inbox.fns) > 0 || len(l.inbox.wakes) > 0 {
		return false
	}
	l.inbox.closed = true
	return true
}

func (l *Loop) armEventfd() {
	sqe := l.getSQE()
	sqe.PrepRead(int32(l.efd), l.efdBuf, 0)
	sqe.UserData = userData(kindEventfd, 0, 0)
}

func (l *Loop) drainInbox() {
	l.inbox.Lock()
	fns, wakes := l.inbox.fns, l.inbox.wakes
	l.inbox.fns, l.inbox.wakes = nil, nil
	l.inbox.signaled = false
	l.inbox.Unlock()
	for _, id := range wakes {
		l.ready = append(l.ready, l.cos[id])
	}
	for _, fn := range fns {
		fn()
	}
}

// getSQE returns a free SQE, submitting queued ones first when the SQ is full.
func (l *Loop) getSQE() *uring.SQE {
	for {
		if sqe := l.ring.GetSQE(); sqe != nil {
			return sqe
		}
		if _, err := l.ring.Submit(); err != nil {
			if !transient(err) {
				panic(fmt.Sprintf("coroutine: io_uring_enter: %v", err))
			}
			// The kernel wants completions consumed before it takes
			// more submissions: wait for one, then record it.
			if _, err := l.ring.SubmitAndWait(1); err != nil && !transient(err) {
				panic(fmt.Sprintf("coroutine: io_uring_enter: %v", err))
			}
			l.reap()
		}
	}
}

// Post runs fn on the loop's thread, outside any coroutine, as soon as the
// loop gets to it. It may be called from any goroutine. fn must not block;
// to do I/O it starts a coroutine with [Loop.Go].
func (l *Loop) Post(fn func()) {
	l.inbox.Lock()
	if l.inbox.closed {
		l.inbox.Unlock()
		panic("coroutine: Post on a closed loop")
	}
	l.inbox.fns = append(l.inbox.fns, fn)
	l.signalLocked()
}

// kick wakes the loop so that it re-checks its state; harmless after it ended.
func (l *Loop) kick() {
	l.inbox.Lock()
	if l.inbox.closed {
		l.inbox.Unlock()
		return
	}
	l.signalLocked()
}

// postWake makes co, a coroutine of l, runnable from a goroutine that is
// not l's.
func (l *Loop) postWake(co *Co) { l.postWakeID(co.id) }

// postWakeID makes l's coroutine id runnable from any goroutine. The
// coroutine is parked waiting for this wake, so its id cannot be reused
// before l resolves it.
func (l *Loop) postWakeID(id uint32) {
	l.inbox.Lock()
	l.inbox.wakes = append(l.inbox.wakes, id)
	l.signalLocked()
}

// signalLocked is called with l.inbox held and releases it.
func (l *Loop) signalLocked() {
	signal := !l.inbox.signaled
	l.inbox.signaled = true
	l.inbox.Unlock()
	if signal {
		var one = [8]byte{1}
		for {
			_, err := unix.Write(l.efd, one[:])
			if err != unix.EINTR {
				break
			}
		}
	}
}

// sendWake queues a MSG_RING on l's ring that makes co runnable on its own
// loop. Called on l's thread.
func (l *Loop) sendWake(co *Co) {
	sqe := l.getSQE()
	sqe.PrepMsgRing(int32(co.loop.ring.Fd()), 0, userData(kindWake, 0, co.id), 0)
	// No IOSQE_CQE_SKIP_SUCCESS: the completion of every wake tells the
	// loop it is done with it (wakesSent).
	sqe.UserData = userData(kindWakeSent, co.loop.id, co.id)
	l.wakesSent++
}

// Go creates a coroutine running fn and makes it runnable; it starts after
// the caller yields. It must be called on the loop's thread: from a
// coroutine of this loop or from a function given to [Loop.Post]. From other
// goroutines use [Loop.Spawn].
func (l *Loop) Go(fn func(co *Co)) *Co {
	if unix.Gettid() != l.tid {
		panic("coroutine: Loop.Go called off the loop's thread; use Spawn")
	}
	co := l.newCo(fn)
	l.ready = append(l.ready, co)
	return co
}

// Spawn starts a coroutine running fn on the loop from any goroutine.
func (l *Loop) Spawn(fn func(co *Co)) {
	l.Post(func() { l.Go(fn) })
}

// Call runs fn as a coroutine on l and waits for it: the synchronous entry
// for callers outside the loop. It must not be called from l's own thread.
func (l *Loop) Call(fn func(co *Co) error) error {
	errc := make(chan error, 1)
	l.Spawn(func(co *Co) { errc <- fn(co) })
	return <-errc
}

// Close stops the loop once every coroutine on it has finished, then
// releases the ring. It waits for that and may be called more than once.
// It must not be called from the loop's own thread.
func (l *Loop) Close() {
	if !l.stopping.Swap(true) {
		l.kick()
	}
	<-l.done
}

// Ring is the loop's ring, for code that builds SQEs itself (through
// [Co.SQE]) or registers files and buffers on it. Only the loop's thread may
// use it.
func (l *Loop) Ring() *uring.Ring { return l.ring }

// Run runs fn as a coroutine on a private loop and returns its error: the
// synchronous wrapper for tools that are not running on a loop.
func Run(fn func(co *Co) error) error {
	l, err := Start(Config{})
	if err != nil {
		return err
	}
	defer l.Close()
	return l.Call(fn)
}
