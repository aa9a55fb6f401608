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
// Rules a coroutine body must follow, because they are enforced by the Go
// runtime (runtime/coro.go) or by the kernel (SINGLE_ISSUER rings): never call
// runtime.LockOSThread or UnlockOSThread, never block the thread (no channel
// waits, no sleeping, no blocking syscalls: use the ring, or [Co.Offload] for
// CPU-heavy or blocking work), and never resume a coroutine directly.
package coroutine
