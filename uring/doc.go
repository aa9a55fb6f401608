// Package uring is a pure-Go io_uring binding over golang.org/x/sys/unix
// (no cgo). It knows nothing of ublk or disk images.
//
// The kernel UAPI (include/uapi/linux/io_uring.h) is mirrored in sys.go:
// constants keep the kernel's names in Go spelling and cite the macro they
// copy; structs mirror the C structs byte for byte, checked by sizes_test.go.
//
// # One issuer
//
// A Ring has exactly one issuer: GetSQE, the Prep* builders, Submit*,
// PeekCQEs and Register* are not safe for concurrent use. A ring created with
// SetupSingleIssuer is moreover bound to the OS thread that created it (or
// that called EnableRings on a SetupRDisabled ring): io_uring_enter from any
// other thread fails with EEXIST. Create such rings after
// runtime.LockOSThread, on the goroutine that will submit.
//
// # Submission and completion
//
// GetSQE hands out zeroed slots and advances a private tail; Submit* publish
// it to the kernel (store-release) and call io_uring_enter. The SQ index
// array, when the kernel needs one (no SetupNoSQArray), is an identity
// mapping written once at setup. SQEs the kernel did not consume (a short
// submit, EAGAIN, EBUSY) stay in the ring in order and go out with the next
// Submit*; a full SQ makes GetSQE return nil, never drops anything. With
// FeatNoDrop (5.5+) a full CQ is not lossy either: the kernel queues the
// overflow and flushes it on the next io_uring_enter with GETEVENTS, which
// Submit adds whenever the kernel sets IORING_SQ_CQ_OVERFLOW.
//
// # DEFER_TASKRUN
//
// On a SetupDeferTaskrun ring, completions that need task work (reads that
// went through poll, MSG_RING from another ring, ublk commands) are posted
// only while the ring's thread is inside io_uring_enter with GETEVENTS;
// an enter without it does not run them, even when the kernel has set
// IORING_SQ_TASKRUN (checked by TestDeferTaskrunSubmit on 6.18). Submit
// therefore always passes GETEVENTS with min_complete 0 on such rings: the
// kernel runs the pending work and returns without sleeping. A MSG_RING
// aimed at a DEFER_TASKRUN ring likewise appears in the target's CQ only
// after the target thread enters the kernel (typically it is already asleep
// in SubmitAndWait, which the post wakes).
//
// # Signals
//
// Go's preemption signal (SIGURG) interrupts a sleeping io_uring_enter with
// EINTR (SA_RESTART does not apply); Submit* retry transparently and recheck
// the CQ, so callers never see EINTR.
//
// # Memory passed to the kernel
//
// Buffers, iovec arrays and timespecs are passed by address. The kernel
// reads an SQE only at the io_uring_enter that submits it, and reads or
// writes the memory behind it from then until the CQE, possibly from
// another thread. That memory must therefore not move and must stay alive
// from the Prep* call until the request's CQE has been reaped:
//
//   - mmap'd memory, unmapped only after the completion; or
//   - Go heap memory kept referenced from a live structure (not only from
//     a local variable of a function that may return or park) and pinned
//     with runtime.Pinner until the completion. The Go heap does not move
//     objects today; the pin is the documented promise that it never will.
//
// Never a goroutine stack, not even for a request submitted at once: stacks
// move when they grow or when a garbage collection shrinks them, and a
// parked goroutine's stack can be shrunk and its old memory reused before
// the kernel looks. The compiler keeps small non-escaping values on the
// stack (since Go 1.25 also the first 32 bytes of an append to a local
// slice), so a local []unix.Iovec built for PrepReadv is exactly such a
// stack address. Because Prep* convert addresses to integers, the compiler
// cannot see that the memory outlives the call: escape analysis does not
// protect callers of this package.
//
// The Prep* builders are therefore the raw layer, for code that owns such
// memory. Coroutine code uses package coroutine's Co.Read, Co.Write,
// Co.Readv and Co.Writev, which keep every buffer and the iovec array
// referenced and pinned in the coroutine until its Wait returns.
// Registered buffers stay pinned by the kernel until UnregisterBuffers or
// Close, and must stay allocated as long. The Register* calls and the
// arguments of io_uring_enter are read during the system call only.
package uring
