package uring

import (
	"errors"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned by Ring methods called after Close.
var ErrClosed = errors.New("uring: ring closed")

// resultError is the error for a negative CQE result (or io_uring_enter
// return): it wraps an errno so that errors.Is(err, unix.EAGAIN) works, while
// err == unix.EAGAIN does not (as cilium/ebpf's wrappedErrno), so callers
// cannot come to depend on the concrete type.
type resultError struct {
	errno unix.Errno
}

// Error returns the errno's text.
func (e *resultError) Error() string { return e.errno.Error() }

// Unwrap returns the unix.Errno.
func (e *resultError) Unwrap() error { return e.errno }

// Is reports whether target is the same unix.Errno; it lets errors.Is
// match without boxing.
func (e *resultError) Is(target error) bool {
	t, ok := target.(unix.Errno)
	return ok && t == e.errno
}

// preboxed holds one resultError per errno below 4096 (MAX_ERRNO), so that
// ResultError never allocates: CQE results are -errno in [-4095, -1].
var preboxed = func() *[4096]resultError {
	var t [4096]resultError
	for i := range t {
		t[i].errno = unix.Errno(i)
	}
	return &t
}()

// ResultError converts a CQE result (struct io_uring_cqe.res) to an error: nil
// for res >= 0, otherwise an error for errno -res that satisfies
// errors.Is(err, unix.E...) and unwraps to the unix.Errno. It never allocates
// for results in the kernel's errno range [-4095, -1].
func ResultError(res int32) error {
	if res >= 0 {
		return nil
	}
	n := -int64(res)
	if n < int64(len(preboxed)) {
		return &preboxed[n]
	}
	return &resultError{errno: unix.Errno(n)}
}

// errnoErr converts a syscall errno to the same pre-boxed error type.
func errnoErr(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	if uintptr(e) < uintptr(len(preboxed)) {
		return &preboxed[e]
	}
	return &resultError{errno: e}
}
