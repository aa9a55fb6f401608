// Package coroutine runs cooperative coroutines on io_uring event loops.
//
// It is ublkimg's version of QEMU's coroutine and AioContext model:
//
//   - A [Loop] owns one io_uring ring on one locked OS thread. Only that
//     thread calls io_uring_enter. The loop submits whatever its coroutines
//     queued, reaps completions in batches and resumes the coroutines that
//     were waiting for them.
//   - A [Co] is a long-lived iter.Pull coroutine created and resumed only on
//     its loop's goroutine. It queues SQEs on its loop's ring and yields
//     until their completions arrive ([Co.SQE], [Co.Wait]). Code that takes a
//     *Co may yield; code that does not take one never does (QEMU's
//     coroutine_fn, spelled as a parameter).
//   - [Mutex], [RWMutex] and [Queue] are QEMU's CoMutex, CoRwlock and CoQueue.
//     They work across loops: a waiter parked on another loop is woken on its
//     own loop (an IORING_OP_MSG_RING completion posted to that loop's ring, or
//     its eventfd when the waker is not a loop), never resumed from a foreign
//     goroutine.
//   - [Loop.Post] runs a function on the loop from any goroutine, and [Run] is
//     the synchronous wrapper tools use: it runs one coroutine on a private
//     loop and returns its result.
//
// # Memory handed to the kernel
//
// An SQE queued by a coroutine reaches the kernel only at its loop's next
// io_uring_enter, after the coroutine has parked, and the kernel uses the
// memory behind it until the completion. A parked goroutine's stack can be
// shrunk (moved) by a garbage collection in that window and its old memory
// given to another goroutine, so no address in an SQE may point into a
// goroutine stack. [Co.Read], [Co.Write], [Co.Readv] and [Co.Writev] make
// that hold by construction: they take plain buffers, build iovec arrays
// in heap memory the Co owns, and keep every buffer and array referenced
// and pinned (runtime.Pinner) until [Co.Wait] returns. Because the Co
// keeps the pointers, the compiler's escape analysis places every buffer
// passed to them on the heap, whatever the caller declared (a local array
// included). [Co.Sleep]'s timespec lives in the Co. [Co.SQE] is for
// requests that carry no address; code outside this package and uring
// does not build address-carrying requests itself (a test checks this),
// except for mmap'd memory or payloads it pins until Wait returns.
//
// Rules a coroutine body must follow, because they are enforced by the Go
// runtime (runtime/coro.go) or by the kernel (SINGLE_ISSUER rings): never call
// runtime.LockOSThread or UnlockOSThread, never block the thread (no channel
// waits, no sleeping, no blocking syscalls: use the ring, or [Co.Offload] for
// CPU-heavy or blocking work), and never resume a coroutine directly.
package coroutine
