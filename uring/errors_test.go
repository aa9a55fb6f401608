package uring

import (
	"errors"
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
