package uring

import (
	"errors"
	"fmt"
	"io/fs"
	"testing"

	"golang.org/x/sys/unix"
)

func TestResultError(t *testing.T) {
	for _, tc := range []struct {
		res  int32
		want unix.Errno // 0: nil error
	}{
		{0, 0},
		{4096, 0},
		{-int32(unix.EAGAIN), unix.EAGAIN},
		{-int32(unix.ECANCELED), unix.ECANCELED},
		{-int32(unix.EINVAL), unix.EINVAL},
		{-int32(unix.ETIME), unix.ETIME},
		{-int32(unix.EOPNOTSUPP), unix.EOPNOTSUPP},
		{-4095, unix.Errno(4095)},
		{-5000, unix.Errno(5000)},
	} {
		err := ResultError(tc.res)
		if tc.want == 0 {
			if err != nil {
				t.Errorf("ResultError(%d) = %v, want nil", tc.res, err)
			}
			continue
		}
		if !errors.Is(err, tc.want) {
			t.Errorf("ResultError(%d) = %v, not errors.Is %v", tc.res, err, tc.want)
		}
		if errors.Is(err, unix.EPERM) {
			t.Errorf("ResultError(%d) matches EPERM", tc.res)
		}
		if err == error(tc.want) {
			t.Errorf("ResultError(%d) compares == to the bare errno", tc.res)
		}
		var errno unix.Errno
		if !errors.As(err, &errno) || errno != tc.want {
			t.Errorf("errors.As(ResultError(%d)) = %v, want %v", tc.res, errno, tc.want)
		}
		if err.Error() != tc.want.Error() {
			t.Errorf("ResultError(%d).Error() = %q, want %q", tc.res, err.Error(), tc.want.Error())
		}
	}
}

func TestResultErrorAllocs(t *testing.T) {
	var sink error
	allocs := testing.AllocsPerRun(1000, func() {
		for _, res := range []int32{0, -int32(unix.EAGAIN), -int32(unix.ECANCELED), -int32(unix.EIO), -4095} {
			sink = ResultError(res)
			if res < 0 && res > -256 && !errors.Is(sink, unix.Errno(-res)) {
				panic("mismatch")
			}
		}
	})
	if allocs != 0 {
		t.Errorf("ResultError + errors.Is: %v allocations per run, want 0", allocs)
	}
	_ = sink
}

// TestErrno checks the two texts of Errno and that both variants match
// alike, bare and wrapped: errors.Is with the unix.Errno (and what that
// matches, fs.ErrNotExist), errors.As to unix.Errno and to *Errno.
func TestErrno(t *testing.T) {
	for _, tc := range []struct {
		errno unix.Errno
		libc  bool
		text  string
	}{
		{unix.ENOSPC, false, "no space left on device"},
		{unix.ENOSPC, true, "No space left on device"},
		{unix.ENOENT, false, "no such file or directory"},
		{unix.ENOENT, true, "No such file or directory"},
		{unix.Errno(5000), false, "errno 5000"},
		{unix.Errno(5000), true, "Unknown error 5000"},
	} {
		base := NewErrno(tc.errno, tc.libc)
		for _, err := range []error{base, fmt.Errorf("Could not open 'x': %w", base)} {
			if !errors.Is(err, tc.errno) || errors.Is(err, unix.EIO) {
				t.Errorf("%v: errors.Is does not single out %d", err, tc.errno)
			}
			if errors.Is(err, fs.ErrNotExist) != (tc.errno == unix.ENOENT) {
				t.Errorf("%v: errors.Is(fs.ErrNotExist) is wrong", err)
			}
			var errno unix.Errno
			var e *Errno
			if !errors.As(err, &errno) || errno != tc.errno || !errors.As(err, &e) {
				t.Errorf("%v: errors.As finds %v, %v", err, errno, e)
			}
		}
		if base.Error() != tc.text {
			t.Errorf("NewErrno(%d, %v) = %q, want %q", tc.errno, tc.libc, base.Error(), tc.text)
		}
	}
	if NewErrno(0, true) != nil {
		t.Error("NewErrno(0) is not nil")
	}
	if a := testing.AllocsPerRun(100, func() { _ = NewErrno(unix.ENOENT, true) }); a != 0 {
		t.Errorf("NewErrno: %v allocations, want 0", a)
	}
}
