package uring

import (
	"errors"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned by Ring methods called after Close.
var ErrClosed = errors.New("uring: ring closed")

// Errno is the one error type of ublkimg that carries nothing but an
// errno: the result of a failed io_uring request or system call.
// errors.Is(err, unix.EXXX) matches it (and, through the unix.Errno it
// unwraps to, fs.ErrNotExist and the like), errors.As finds the
// unix.Errno; err == unix.EXXX does not hold (as cilium/ebpf's
// wrappedErrno), so callers cannot come to depend on the concrete type.
// Its text is Go's ("no such file or directory"), or, when made with
// libc, the C library's strerror ("No such file or directory"), which is
// how qemu-img prints errnos. The errors are pre-boxed: making one never
// allocates.
type Errno struct {
	errno unix.Errno
	libc  bool
}

// Error returns the errno's text.
func (e *Errno) Error() string {
	if e.libc {
		return Strerror(e.errno)
	}
	return e.errno.Error()
}

// Unwrap returns the unix.Errno.
func (e *Errno) Unwrap() error { return e.errno }

// Is reports whether target is the same unix.Errno; it lets errors.Is
// match without boxing.
func (e *Errno) Is(target error) bool {
	t, ok := target.(unix.Errno)
	return ok && t == e.errno
}

// preboxed holds one Errno per errno below 4096 (MAX_ERRNO) and text
// (Go's, the C library's), so that ResultError and NewErrno never
// allocate: CQE results are -errno in [-4095, -1].
var preboxed = func() *[2][4096]Errno {
	var t [2][4096]Errno
	for i := range t[0] {
		t[0][i] = Errno{errno: unix.Errno(i)}
		t[1][i] = Errno{errno: unix.Errno(i), libc: true}
	}
	return &t
}()

// ResultError converts a CQE result (struct io_uring_cqe.res) to an error: nil
// for res >= 0, otherwise the *Errno of errno -res, with Go's text. It never
// allocates for results in the kernel's errno range [-4095, -1].
func ResultError(res int32) error {
	if res >= 0 {
		return nil
	}
	return NewErrno(unix.Errno(-int64(res)), false)
}

// NewErrno returns e as an *Errno error, nil for 0: with Go's text, or with
// libc the C library's, as qemu-img prints it.
func NewErrno(e unix.Errno, libc bool) error {
	if e == 0 {
		return nil
	}
	t := 0
	if libc {
		t = 1
	}
	if uintptr(e) < uintptr(len(preboxed[t])) {
		return &preboxed[t][e]
	}
	return &Errno{errno: e, libc: libc}
}

// errnoErr converts a syscall errno to an *Errno with Go's text.
func errnoErr(e unix.Errno) error { return NewErrno(e, false) }

// Strerror is the C library's text for e ("No such file or directory"):
// Go's texts are glibc's with a lower-case first letter, but for errnos
// it has no name for ("errno 5000", glibc's "Unknown error 5000").
func Strerror(e unix.Errno) string {
	s := e.Error()
	if n, ok := strings.CutPrefix(s, "errno "); ok {
		return "Unknown error " + n
	}
	if s != "" && s[0] >= 'a' && s[0] <= 'z' {
		s = string(s[0]-'a'+'A') + s[1:]
	}
	return s
}
