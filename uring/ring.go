package uring

import (
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Params are the io_uring_setup(2) parameters NewWithParams accepts: the
// caller-settable part of struct io_uring_params.
type Params struct {
	// Entries is the number of SQ entries; the kernel rounds it up to a
	// power of two (and caps it with SetupClamp).
	Entries uint32
	// CQEntries is the CQ size, used only with SetupCQSize. Without it
	// the kernel picks 2*Entries.
	CQEntries uint32
	// Flags are the requested setup flags; see New for the fallback rules.
	Flags SetupFlags
	// SQThreadCPU and SQThreadIdle (milliseconds) configure the SQPOLL
	// thread (SetupSQPoll, SetupSQAff).
	SQThreadCPU, SQThreadIdle uint32
	// WQFd is the ring whose io-wq is shared with SetupAttachWQ.
	WQFd uint32
}

// optionalFlags are dropped, in this order, when io_uring_setup(2) fails with
// EINVAL: each is a performance or safety option that older kernels lack
// (DEFER_TASKRUN 6.1, SINGLE_ISSUER 6.0, COOP_TASKRUN/TASKRUN_FLAG 5.19,
// SUBMIT_ALL 5.18, NO_SQARRAY 6.6). SQE128 and CQSIZE change the ABI and are
// never dropped.
var optionalFlags = []SetupFlags{
	SetupDeferTaskrun,
	SetupSingleIssuer,
	SetupCoopTaskrun | SetupTaskrunFlag,
	SetupSubmitAll,
	SetupNoSQArray,
}

// unsupportedFlags change the ring ABI in ways Ring does not implement.
const unsupportedFlags = SetupCQE32 | SetupNoMmap | SetupRegisteredFdOnly

// Ring is one io_uring instance: its fd, the mmap'd SQ and CQ rings and the
// SQE array.
//
// A Ring has one issuer: GetSQE, Prep*, Submit*, PeekCQEs, CQAdvance and
// Register* must not be called concurrently. On a SetupSingleIssuer ring the
// kernel further requires every io_uring_enter(2) to come from the OS thread
// that created the ring (lock it with runtime.LockOSThread); other threads get
// EEXIST. Fd, Flags, Features and the size accessors are safe anywhere.
type Ring struct {
	fd       int
	flags    SetupFlags
	features uint32
	closed   bool

	ringMem []byte // SQ ring, and the CQ ring too with FeatSingleMmap
	cqMem   []byte // separate CQ ring mapping, nil with FeatSingleMmap
	sqeMem  []byte // the SQE array

	sq struct {
		head    *uint32 // kernel-owned: advanced by io_uring_enter
		tail    *uint32 // ours: published in Submit*
		flags   *uint32 // IORING_SQ_* flags
		dropped *uint32
		mask    uint32
		entries uint32
		sqes    unsafe.Pointer
		shift   uint   // log2 of the SQE slot size (6 or 7)
		local   uint32 // local tail: SQEs handed out by GetSQE
	}
	cq struct {
		head     *uint32 // ours: advanced after reaping
		tail     *uint32 // kernel-owned
		overflow *uint32
		mask     uint32
		entries  uint32
		cqes     unsafe.Pointer
	}

	// arg and ts are the EXT_ARG wait argument; they live in the Ring
	// (heap) so that the pointer in arg.Ts stays valid and nothing
	// allocates per call.
	arg geteventsArg
	ts  unix.Timespec
}

// New creates a ring with entries SQ entries (rounded up by the kernel) and
// the requested flags; it is NewWithParams(Params{Entries: entries, Flags: flags}).
func New(entries uint32, flags SetupFlags) (*Ring, error) {
	return NewWithParams(Params{Entries: entries, Flags: flags})
}

// NewWithParams creates a ring with io_uring_setup(2) and maps its rings.
//
// Flag handling:
//   - SetupNoSQArray is always tried (it only removes an indirection).
//   - SetupDeferTaskrun implies SetupSingleIssuer, which the kernel requires
//     with it; both are added together.
//   - If the kernel rejects the flags with EINVAL, optional flags are dropped
//     one step at a time and setup retried, in this order: SetupDeferTaskrun,
//     SetupSingleIssuer, SetupCoopTaskrun|SetupTaskrunFlag, SetupSubmitAll,
//     SetupNoSQArray. Flags reports what was accepted.
//   - SetupSQE128 and SetupCQSize are never dropped: they change the ABI.
//   - SetupCQE32, SetupNoMmap and SetupRegisteredFdOnly are refused.
//
// With SetupSingleIssuer (and without SetupRDisabled) the kernel binds the
// ring to the calling OS thread: call NewWithParams on the thread that will
// submit, after runtime.LockOSThread. With SetupRDisabled the binding happens
// in EnableRings instead.
func NewWithParams(p Params) (*Ring, error) {
	if p.Flags&unsupportedFlags != 0 {
		return nil, fmt.Errorf("uring: setup: flags %#x not supported by this package: %w",
			uint32(p.Flags&unsupportedFlags), unix.EINVAL)
	}
	flags := p.Flags | SetupNoSQArray
	if flags&SetupDeferTaskrun != 0 {
		flags |= SetupSingleIssuer
	}
	var kp params
	var fd int
	for {
		kp = params{
			SQEntries:    p.Entries,
			CQEntries:    p.CQEntries,
			Flags:        uint32(flags),
			SQThreadCPU:  p.SQThreadCPU,
			SQThreadIdle: p.SQThreadIdle,
			WQFd:         p.WQFd,
		}
		r1, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(p.Entries), uintptr(unsafe.Pointer(&kp)), 0)
		if errno == 0 {
			fd = int(r1)
			break
		}
		if errno == unix.EINTR {
			continue
		}
		if errno != unix.EINVAL || !dropOptional(&flags) {
			return nil, fmt.Errorf("uring: setup (entries %d, flags %#x): %w", p.Entries, uint32(flags), errnoErr(errno))
		}
	}
	r := &Ring{fd: fd, flags: flags, features: kp.Features}
	if err := r.mmap(&kp); err != nil {
		r.unmap()
		unix.Close(fd)
		return nil, fmt.Errorf("uring: setup: %w", err)
	}
	return r, nil
}

// dropOptional clears the first optional flag still set in *flags; it
// reports false when none is left.
func dropOptional(flags *SetupFlags) bool {
	for _, o := range optionalFlags {
		if *flags&o != 0 {
			*flags &^= o
			return true
		}
	}
	return false
}

// mmap maps the SQ ring, CQ ring and SQE array described by kp.
func (r *Ring) mmap(kp *params) error {
	const prot = unix.PROT_READ | unix.PROT_WRITE
	const mflags = unix.MAP_SHARED | unix.MAP_POPULATE

	sqSize := uintptr(kp.SQOff.Array) + uintptr(kp.SQEntries)*4
	if r.flags&SetupNoSQArray != 0 {
		sqSize = uintptr(kp.SQOff.Flags) + 4
		sqSize = max(sqSize, uintptr(kp.SQOff.Dropped)+4, uintptr(kp.SQOff.Tail)+4)
	}
	cqSize := uintptr(kp.CQOff.CQEs) + uintptr(kp.CQEntries)*sizeofCQE
	single := r.features&FeatSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	r.ringMem, err = unix.Mmap(r.fd, offSQRing, int(sqSize), prot, mflags)
	if err != nil {
		return fmt.Errorf("mmap sq ring: %w", err)
	}
	cqMem := r.ringMem
	if !single {
		r.cqMem, err = unix.Mmap(r.fd, offCQRing, int(cqSize), prot, mflags)
		if err != nil {
			return fmt.Errorf("mmap cq ring: %w", err)
		}
		cqMem = r.cqMem
	}
	r.sq.shift = 6
	if r.flags&SetupSQE128 != 0 {
		r.sq.shift = 7
	}
	r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(uintptr(kp.SQEntries)<<r.sq.shift), prot, mflags)
	if err != nil {
		return fmt.Errorf("mmap sqes: %w", err)
	}

	sq := unsafe.Pointer(unsafe.SliceData(r.ringMem))
	r.sq.head = (*uint32)(unsafe.Add(sq, kp.SQOff.Head))
	r.sq.tail = (*uint32)(unsafe.Add(sq, kp.SQOff.Tail))
	r.sq.flags = (*uint32)(unsafe.Add(sq, kp.SQOff.Flags))
	r.sq.dropped = (*uint32)(unsafe.Add(sq, kp.SQOff.Dropped))
	r.sq.mask = *(*uint32)(unsafe.Add(sq, kp.SQOff.RingMask))
	r.sq.entries = *(*uint32)(unsafe.Add(sq, kp.SQOff.RingEntries))
	r.sq.sqes = unsafe.Pointer(unsafe.SliceData(r.sqeMem))
	r.sq.local = atomic.LoadUint32(r.sq.tail)
	if r.flags&SetupNoSQArray == 0 {
		// Identity mapping, filled once: SQ slot i always holds SQE i.
		array := unsafe.Slice((*uint32)(unsafe.Add(sq, kp.SQOff.Array)), r.sq.entries)
		for i := range array {
			array[i] = uint32(i)
		}
	}

	cq := unsafe.Pointer(unsafe.SliceData(cqMem))
	r.cq.head = (*uint32)(unsafe.Add(cq, kp.CQOff.Head))
	r.cq.tail = (*uint32)(unsafe.Add(cq, kp.CQOff.Tail))
	r.cq.overflow = (*uint32)(unsafe.Add(cq, kp.CQOff.Overflow))
	r.cq.mask = *(*uint32)(unsafe.Add(cq, kp.CQOff.RingMask))
	r.cq.entries = *(*uint32)(unsafe.Add(cq, kp.CQOff.RingEntries))
	r.cq.cqes = unsafe.Add(cq, kp.CQOff.CQEs)
	return nil
}

// unmap releases whatever mmap set up.
func (r *Ring) unmap() {
	for _, m := range []*[]byte{&r.sqeMem, &r.cqMem, &r.ringMem} {
		if *m != nil {
			unix.Munmap(*m)
			*m = nil
		}
	}
}

// Close unmaps the rings and closes the ring fd; in-flight requests are
// cancelled by the kernel. Close is idempotent; other methods report
// ErrClosed (or nothing) afterwards.
func (r *Ring) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	r.unmap()
	if err := unix.Close(r.fd); err != nil {
		return fmt.Errorf("uring: close: %w", err)
	}
	return nil
}

// Fd returns the io_uring file descriptor (the MSG_RING target of other rings).
func (r *Ring) Fd() int { return r.fd }

// Flags returns the setup flags in effect after the fallbacks of New.
func (r *Ring) Flags() SetupFlags { return r.flags }

// Features returns io_uring_params.features (FeatSingleMmap, FeatExtArg, ...).
func (r *Ring) Features() uint32 { return r.features }

// SQEntries returns the SQ ring size chosen by the kernel.
func (r *Ring) SQEntries() uint32 { return r.sq.entries }

// CQEntries returns the CQ ring size chosen by the kernel.
func (r *Ring) CQEntries() uint32 { return r.cq.entries }

// SQFlags returns the kernel's sq_ring->flags (SQNeedWakeup, SQCQOverflow,
// SQTaskrun).
func (r *Ring) SQFlags() uint32 {
	if r.closed {
		return 0
	}
	return atomic.LoadUint32(r.sq.flags)
}

// CQOverflow returns the kernel's cq_ring->overflow counter: CQEs that could
// not be posted. With FeatNoDrop they are kept and flushed on the next
// io_uring_enter with GETEVENTS (Submit, SubmitAndWait), so the counter only
// means lost completions on kernels without that feature.
func (r *Ring) CQOverflow() uint32 {
	if r.closed {
		return 0
	}
	return atomic.LoadUint32(r.cq.overflow)
}

// GetSQE returns the next free SQE slot, zeroed (all 128 bytes on an SQE128
// ring), or nil when the SQ is full: the caller then submits and retries.
// Not thread-safe: one issuer.
func (r *Ring) GetSQE() *SQE {
	if r.closed {
		return nil
	}
	head := atomic.LoadUint32(r.sq.head)
	if r.sq.local-head >= r.sq.entries {
		return nil
	}
	p := unsafe.Add(r.sq.sqes, uintptr(r.sq.local&r.sq.mask)<<r.sq.shift)
	if r.sq.shift == 7 {
		*(*[sizeofSQE128]byte)(p) = [sizeofSQE128]byte{}
	} else {
		*(*SQE)(p) = SQE{}
	}
	r.sq.local++
	return (*SQE)(p)
}

// SQReady returns the number of SQEs handed out by GetSQE that the kernel has
// not consumed yet (filled, or published but left over by a short submit).
func (r *Ring) SQReady() uint32 {
	if r.closed {
		return 0
	}
	return r.sq.local - atomic.LoadUint32(r.sq.head)
}

// SQSpace returns the number of free SQ slots.
func (r *Ring) SQSpace() uint32 {
	if r.closed {
		return 0
	}
	return r.sq.entries - r.SQReady()
}

// flushSQ publishes the local tail to the kernel (release) and returns the
// number of SQEs waiting for io_uring_enter and the number newly published
// by this call (what an SQPOLL ring reports as submitted).
func (r *Ring) flushSQ() (pending, published uint32) {
	published = r.sq.local - *r.sq.tail // the tail is ours: plain read
	atomic.StoreUint32(r.sq.tail, r.sq.local)
	return r.sq.local - atomic.LoadUint32(r.sq.head), published
}

// enter is io_uring_enter(2).
func (r *Ring) enter(toSubmit, minComplete, flags uint32, arg unsafe.Pointer, argSize uintptr) (int, unix.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit),
		uintptr(minComplete), uintptr(flags), uintptr(arg), argSize)
	return int(n), errno
}

// submitFlags returns the io_uring_enter flags needed beyond the caller's.
// On a DEFER_TASKRUN ring completions that need task work are posted only by
// io_uring_enter with GETEVENTS, so every enter carries it (with
// min_complete 0 the kernel runs the pending work and returns at once). On
// other rings GETEVENTS is added when the kernel asks for it: CQ overflow to
// flush, or task work flagged by SetupTaskrunFlag.
func (r *Ring) submitFlags() uint32 {
	var f uint32
	if r.flags&SetupDeferTaskrun != 0 || atomic.LoadUint32(r.sq.flags)&(SQCQOverflow|SQTaskrun) != 0 {
		f |= EnterGetEvents
	}
	if r.flags&SetupSQPoll != 0 && atomic.LoadUint32(r.sq.flags)&SQNeedWakeup != 0 {
		f |= EnterSQWakeup
	}
	return f
}

// Submit publishes the filled SQEs and calls io_uring_enter(2) with
// to_submit = all pending SQEs and min_complete = 0. It returns the number of
// SQEs the kernel consumed in this call.
//
// On a SetupDeferTaskrun ring Submit also passes GETEVENTS (without waiting),
// so that completions waiting for task work (MSG_RING, poll, async reads) are
// posted; on other rings it does so only when the kernel flags a CQ overflow
// or pending task work. With nothing to submit and no GETEVENTS needed it
// makes no system call.
//
// EINTR is retried. If the kernel consumes fewer SQEs than pending (EAGAIN,
// EBUSY or a short count), the rest stay queued, in order, for the next
// Submit*; on EAGAIN/EBUSY the error wraps the errno so the caller can reap
// CQEs and retry.
func (r *Ring) Submit() (int, error) {
	if r.closed {
		return 0, ErrClosed
	}
	toSubmit, published := r.flushSQ()
	for {
		flags := r.submitFlags()
		if r.flags&SetupSQPoll != 0 {
			// The SQPOLL thread consumes the SQ itself: enter only to
			// wake it or to run completions.
			if flags == 0 {
				return int(published), nil
			}
		} else if toSubmit == 0 && flags == 0 {
			return 0, nil
		}
		n, errno := r.enter(toSubmit, 0, flags, nil, 0)
		switch errno {
		case 0:
			if r.flags&SetupSQPoll != 0 {
				return int(published), nil
			}
			return n, nil
		case unix.EINTR:
			toSubmit, _ = r.flushSQ()
			continue
		}
		return 0, fmt.Errorf("uring: submit: %w", errnoErr(errno))
	}
}

// SubmitAndWait publishes the filled SQEs, submits them and waits until at
// least waitNr CQEs are ready (io_uring_enter with GETEVENTS and
// min_complete = waitNr; waitNr is capped at the CQ size). It returns the
// number of SQEs consumed.
//
// EINTR (Go's preemption signal interrupts io_uring_enter) and short waits
// are retried transparently: on a nil error CQReady() >= waitNr. A short
// submit is completed by the retries as well. EAGAIN and EBUSY (the kernel
// could not allocate requests, or CQ overflow on old kernels) are returned
// wrapped, with the count submitted so far; unconsumed SQEs stay queued, so
// the caller reaps CQEs and calls again, and nothing is lost.
func (r *Ring) SubmitAndWait(waitNr uint32) (int, error) {
	if r.closed {
		return 0, ErrClosed
	}
	waitNr = min(waitNr, r.cq.entries)
	submitted := 0
	for {
		toSubmit, published := r.flushSQ()
		flags := r.submitFlags() | EnterGetEvents
		if r.flags&SetupSQPoll != 0 {
			submitted += int(published)
			toSubmit = 0
		}
		n, errno := r.enter(toSubmit, waitNr, flags, nil, 0)
		switch errno {
		case 0:
			if r.flags&SetupSQPoll == 0 {
				submitted += n
			}
			if r.waitDone(waitNr) {
				return submitted, nil
			}
			continue
		case unix.EINTR:
			continue
		}
		return submitted, fmt.Errorf("uring: submit and wait: %w", errnoErr(errno))
	}
}

// waitDone reports whether a Submit*AndWait may return: waitNr CQEs are
// ready and every SQE has been consumed (the SQPOLL thread consumes them on
// its own time).
func (r *Ring) waitDone(waitNr uint32) bool {
	return r.CQReady() >= waitNr && (r.flags&SetupSQPoll != 0 || r.SQReady() == 0)
}

// SubmitAndWaitTimeout is SubmitAndWait with a timeout, using
// IORING_ENTER_EXT_ARG (FeatExtArg, Linux 5.11) with a relative timespec.
// When the timeout expires it returns the SQEs submitted and a nil error
// (ETIME is not an error): the caller sees fewer than waitNr CQEs in
// CQReady. EINTR is retried with the remaining time. Without FeatExtArg it
// fails with an error wrapping unix.EOPNOTSUPP.
func (r *Ring) SubmitAndWaitTimeout(waitNr uint32, timeout time.Duration) (int, error) {
	if r.closed {
		return 0, ErrClosed
	}
	if r.features&FeatExtArg == 0 {
		return 0, fmt.Errorf("uring: submit and wait with timeout: no IORING_FEAT_EXT_ARG: %w", unix.EOPNOTSUPP)
	}
	waitNr = min(waitNr, r.cq.entries)
	deadline := time.Now().Add(timeout)
	submitted := 0
	for {
		remaining := max(time.Until(deadline), 0)
		r.ts = unix.NsecToTimespec(int64(remaining))
		r.arg = geteventsArg{SigmaskSz: nsigBytes, Ts: uint64(uintptr(unsafe.Pointer(&r.ts)))}
		toSubmit, published := r.flushSQ()
		flags := r.submitFlags() | EnterGetEvents | EnterExtArg
		if r.flags&SetupSQPoll != 0 {
			submitted += int(published)
			toSubmit = 0
		}
		n, errno := r.enter(toSubmit, waitNr, flags, unsafe.Pointer(&r.arg), sizeofGeteventsArg)
		switch errno {
		case 0:
			if r.flags&SetupSQPoll == 0 {
				submitted += n
			}
			if r.waitDone(waitNr) || remaining == 0 {
				return submitted, nil
			}
			continue
		case unix.EINTR:
			continue
		case unix.ETIME:
			if r.SQReady() != 0 && r.flags&SetupSQPoll == 0 {
				// Timed out before submitting everything: push the
				// rest without waiting.
				n, err := r.Submit()
				return submitted + n, err
			}
			return submitted, nil
		}
		return submitted, fmt.Errorf("uring: submit and wait with timeout: %w", errnoErr(errno))
	}
}

// CQReady returns the number of CQEs available for reaping.
func (r *Ring) CQReady() uint32 {
	if r.closed {
		return 0
	}
	return atomic.LoadUint32(r.cq.tail) - *r.cq.head
}

// cqeAt returns the CQE for ring position i.
func (r *Ring) cqeAt(i uint32) *CQE {
	return (*CQE)(unsafe.Add(r.cq.cqes, uintptr(i&r.cq.mask)*sizeofCQE))
}

// PeekCQEs copies up to len(dst) available CQEs into dst, advances the CQ
// head once for all of them, and returns how many it copied. It never
// enters the kernel: on a DEFER_TASKRUN ring, or to flush a CQ overflow, call
// Submit or SubmitAndWait first.
func (r *Ring) PeekCQEs(dst []CQE) int {
	if r.closed || len(dst) == 0 {
		return 0
	}
	head := *r.cq.head
	ready := atomic.LoadUint32(r.cq.tail) - head // acquire: entries below tail are written
	n := min(uint32(len(dst)), ready)
	for i := uint32(0); i < n; i++ {
		dst[i] = *r.cqeAt(head + i)
	}
	if n > 0 {
		atomic.StoreUint32(r.cq.head, head+n) // release: we are done with the entries
	}
	return int(n)
}

// PeekCQE returns the oldest available CQE without consuming it, or nil.
// The pointer is into the ring and is valid until CQAdvance.
func (r *Ring) PeekCQE() *CQE {
	if r.closed {
		return nil
	}
	head := *r.cq.head
	if atomic.LoadUint32(r.cq.tail) == head {
		return nil
	}
	return r.cqeAt(head)
}

// CQAdvance marks n CQEs returned by PeekCQE as consumed.
func (r *Ring) CQAdvance(n uint32) {
	if r.closed || n == 0 {
		return
	}
	atomic.StoreUint32(r.cq.head, *r.cq.head+n)
}

// EnableRings enables a ring created with SetupRDisabled
// (IORING_REGISTER_ENABLE_RINGS). On a SetupSingleIssuer ring this binds the
// ring to the calling OS thread.
func (r *Ring) EnableRings() error {
	if err := r.register(registerEnableRings, nil, 0); err != nil {
		return fmt.Errorf("uring: enable rings: %w", err)
	}
	return nil
}

// register is io_uring_register(2); EINTR is retried.
func (r *Ring) register(op uint32, arg unsafe.Pointer, nr uint32) error {
	if r.closed {
		return ErrClosed
	}
	for {
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), uintptr(op),
			uintptr(arg), uintptr(nr), 0, 0)
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return errnoErr(errno)
	}
}
