package uring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tempFile returns an open read-write file in t.TempDir(), closed at cleanup.
func tempFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "uring")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// pattern returns n bytes of a recognisable, offset-dependent pattern.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// mustRes fails the test unless c carries userData and result want.
func mustRes(t *testing.T, c CQE, userData uint64, want int32) {
	t.Helper()
	if c.UserData != userData || c.Res != want {
		t.Fatalf("cqe = {user_data %d res %d (%v) flags %#x}, want user_data %d res %d",
			c.UserData, c.Res, ResultError(c.Res), c.Flags, userData, want)
	}
}

// held returns v, kept reachable until the test ends. Capturing it in a
// cleanup also puts it on the heap: memory an SQE points to must not be on
// a goroutine stack (see "Memory passed to the kernel"), and because the
// Prep builders take addresses as integers, escape analysis would leave a
// local buffer there (a small make, an &unix.Timespec{}, an inlined
// iovecs).
func held[T any](t testing.TB, v T) T {
	t.Cleanup(func() { runtime.KeepAlive(v) })
	return v
}

// iovecs builds an iovec array over bufs; wrap it in held.
func iovecs(bufs ...[]byte) []unix.Iovec {
	iovs := make([]unix.Iovec, len(bufs))
	for i, b := range bufs {
		iovs[i].Base = &b[0]
		iovs[i].SetLen(len(b))
	}
	return iovs
}

// TestReadWrite writes a file with WRITE and WRITEV and reads it back with
// READ and READV, on every ring configuration.
func TestReadWrite(t *testing.T) {
	for _, cfg := range ringConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			r := newRing(t, 8, cfg.flags)
			f := tempFile(t)
			fd := int32(f.Fd())

			a, b1, b2 := held(t, pattern(4096, 1)), held(t, pattern(1000, 2)), held(t, pattern(3096, 3))
			s := getSQE(t, r)
			s.PrepWrite(fd, a, 0)
			s.UserData = 1
			wiov := held(t, iovecs(b1, b2))
			s = getSQE(t, r)
			s.PrepWritev(fd, wiov, 4096)
			s.UserData = 2
			cqes := reap(t, r, 2)
			for _, c := range cqes {
				want := map[uint64]int32{1: 4096, 2: 4096}[c.UserData]
				mustRes(t, c, c.UserData, want)
			}

			got := held(t, make([]byte, 4096))
			s = getSQE(t, r)
			s.PrepRead(fd, got, 4096)
			s.UserData = 3
			mustRes(t, reapOne(t, r), 3, 4096)
			if want := append(append([]byte{}, b1...), b2...); !bytes.Equal(got, want) {
				t.Fatal("READ returned different bytes than WRITEV wrote")
			}

			g1, g2 := held(t, make([]byte, 100)), held(t, make([]byte, 8192))
			riov := held(t, iovecs(g1, g2))
			s = getSQE(t, r)
			s.PrepReadv(fd, riov, 0)
			s.UserData = 4
			mustRes(t, reapOne(t, r), 4, 8192) // short at EOF: 8192 bytes of file
			if !bytes.Equal(g1, a[:100]) || !bytes.Equal(g2[:3996], a[100:]) || !bytes.Equal(g2[3996:4996], b1) || !bytes.Equal(g2[4996:8092], b2) {
				t.Fatal("READV returned different bytes than WRITE/WRITEV wrote")
			}

			// A bad fd comes back as a negative result.
			s = getSQE(t, r)
			s.PrepRead(-1, got, 0)
			s.UserData = 5
			c := reapOne(t, r)
			mustRes(t, c, 5, -int32(unix.EBADF))
			if !errors.Is(ResultError(c.Res), unix.EBADF) {
				t.Fatal("ResultError does not match EBADF")
			}
		})
	}
}

// mmapAnon returns n bytes of anonymous mmap'd memory, unmapped at cleanup.
func mmapAnon(t *testing.T, n int) []byte {
	t.Helper()
	m, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return m
}

// TestFixed exercises READ_FIXED/WRITE_FIXED with registered buffers and
// SQEFixedFile with registered (and updated) files.
func TestFixed(t *testing.T) {
	r := newRing(t, 8, SetupSingleIssuer|SetupDeferTaskrun)
	f1, f2 := tempFile(t), tempFile(t)

	mem := mmapAnon(t, 3*4096)
	wbuf, rbuf, other := mem[:4096], mem[4096:8192], mem[8192:]
	if err := r.RegisterBuffers([][]byte{wbuf, rbuf}); err != nil {
		t.Fatal(err)
	}
	// Slot 1 starts empty and is filled by UpdateFiles.
	if err := r.RegisterFiles([]int32{int32(f1.Fd()), -1}); err != nil {
		t.Fatal(err)
	}
	if err := r.UpdateFiles(1, []int32{int32(f2.Fd())}); err != nil {
		t.Fatal(err)
	}
	copy(wbuf, pattern(4096, 9))

	for _, tc := range []struct {
		name  string
		index int32
		file  *os.File
	}{{"slot0", 0, f1}, {"slot1-updated", 1, f2}} {
		// No t.Run: subtests run on other OS threads, and this ring is
		// SINGLE_ISSUER.
		func() {
			t.Logf("case %s", tc.name)
			clear(rbuf)
			s := getSQE(t, r)
			s.PrepWriteFixed(tc.index, wbuf, 512, 0)
			s.Flags |= SQEFixedFile | SQEIOLink // read only after the write
			s.UserData = 1
			s = getSQE(t, r)
			s.PrepReadFixed(tc.index, rbuf[:2048], 1024, 1)
			s.Flags |= SQEFixedFile
			s.UserData = 2
			cqes := reap(t, r, 2)
			mustRes(t, cqes[0], 1, 4096)
			mustRes(t, cqes[1], 2, 2048)
			if !bytes.Equal(rbuf[:2048], wbuf[512:2560]) {
				t.Fatal("READ_FIXED returned different bytes than WRITE_FIXED wrote")
			}
			// The data really went to the file behind the slot.
			got := make([]byte, 4096)
			if _, err := tc.file.ReadAt(got, 512); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, wbuf) {
				t.Fatal("file contents differ from WRITE_FIXED buffer")
			}
		}()
	}

	// A fixed read into memory outside the registered buffer fails.
	s := getSQE(t, r)
	s.PrepReadFixed(0, other[:512], 0, 1)
	s.Flags |= SQEFixedFile
	s.UserData = 3
	if c := reapOne(t, r); c.Res != -int32(unix.EFAULT) {
		t.Errorf("READ_FIXED outside the buffer: res %d, want -EFAULT", c.Res)
	}

	if err := r.UnregisterFiles(); err != nil {
		t.Fatal(err)
	}
	if err := r.UnregisterBuffers(); err != nil {
		t.Fatal(err)
	}
	if err := r.UnregisterBuffers(); !errors.Is(err, unix.ENXIO) {
		t.Errorf("second UnregisterBuffers: %v, want ENXIO", err)
	}
}

func TestFsync(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags uint32
	}{{"fsync", 0}, {"fdatasync", FsyncDatasync}} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRing(t, 4, 0)
			f := tempFile(t)
			buf := held(t, pattern(4096, 4))
			s := getSQE(t, r)
			s.PrepWrite(int32(f.Fd()), buf, 0)
			s.Flags |= SQEIOLink
			s.UserData = 1
			s = getSQE(t, r)
			s.PrepFsync(int32(f.Fd()), tc.flags)
			s.UserData = 2
			cqes := reap(t, r, 2)
			mustRes(t, cqes[0], 1, 4096)
			mustRes(t, cqes[1], 2, 0)
			// fsync of a bad fd fails.
			s = getSQE(t, r)
			s.PrepFsync(-1, tc.flags)
			s.UserData = 3
			mustRes(t, reapOne(t, r), 3, -int32(unix.EBADF))
		})
	}
}

func TestFallocate(t *testing.T) {
	r := newRing(t, 4, 0)
	f := tempFile(t)
	fd := int32(f.Fd())
	data := bytes.Repeat([]byte{0xaa}, 3*4096)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		mode     uint32
		off, len uint64
		wantSize int64
		zeroFrom int
		zeroTo   int
	}{
		{"punch-hole-keep-size", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 4096, 4096, 3 * 4096, 4096, 8192},
		{"extend", 0, 0, 5 * 4096, 5 * 4096, 3 * 4096, 5 * 4096},
		{"zero-range", unix.FALLOC_FL_ZERO_RANGE, 0, 100, 5 * 4096, 0, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := getSQE(t, r)
			s.PrepFallocate(fd, tc.mode, tc.off, tc.len)
			s.UserData = 9
			c := reapOne(t, r)
			if c.Res == -int32(unix.EOPNOTSUPP) {
				t.Skipf("filesystem does not support mode %#x", tc.mode)
			}
			mustRes(t, c, 9, 0)
			var st unix.Stat_t
			if err := unix.Fstat(int(fd), &st); err != nil {
				t.Fatal(err)
			}
			if st.Size != tc.wantSize {
				t.Fatalf("size after fallocate = %d, want %d", st.Size, tc.wantSize)
			}
			got := held(t, make([]byte, st.Size))
			s = getSQE(t, r)
			s.PrepRead(fd, got, 0)
			s.UserData = 10
			mustRes(t, reapOne(t, r), 10, int32(st.Size))
			for i := tc.zeroFrom; i < tc.zeroTo; i++ {
				if got[i] != 0 {
					t.Fatalf("byte %d = %#x, want 0", i, got[i])
				}
			}
		})
	}
	got := make([]byte, 4096)
	if _, err := f.ReadAt(got, 2*4096); err != nil || got[0] != 0xaa || got[4095] != 0xaa {
		t.Fatalf("data outside the hole changed (err %v)", err)
	}
}

// TestURingCmd sends URING_CMD to a regular file, whose file_operations have
// no ->uring_cmd: the kernel must complete it with a negative result. On an
// SQE128 ring an 80-byte payload is accepted and lands in the slot. On a
// socket (Linux 6.7+) SOCKET_URING_OP_SIOCINQ succeeds.
func TestURingCmd(t *testing.T) {
	f := tempFile(t)
	for _, tc := range []struct {
		name    string
		flags   SetupFlags
		payload int
	}{
		{"sqe64-16-bytes", 0, CmdSize64},
		{"sqe128-80-bytes", SetupSQE128, CmdSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRing(t, 4, tc.flags)
			payload := pattern(tc.payload, 0x31)
			s := getSQE(t, r)
			// The next slot gets a NOP first; the payload must not
			// spill into it.
			next := getSQE(t, r)
			next.PrepNop()
			next.UserData = 78
			want := *next
			s.PrepURingCmd(int32(f.Fd()), 0x1234, payload)
			s.UserData = 77
			if s.CmdOp() != 0x1234 || s.Off != 0x1234 {
				t.Fatalf("cmd_op = %#x (off %#x), want 0x1234", s.CmdOp(), s.Off)
			}
			if !bytes.Equal(s.Cmd()[:tc.payload], payload) {
				t.Fatal("payload not at sqe.cmd")
			}
			if *next != want {
				t.Fatalf("PrepURingCmd changed the next SQE: %+v", *next)
			}
			cqes := reap(t, r, 2)
			mustRes(t, cqes[1], 78, 0)
			c := cqes[0]
			if c.UserData != 77 || c.Res >= 0 {
				t.Fatalf("URING_CMD on a regular file: %+v, want a negative result", c)
			}
			t.Logf("URING_CMD on a regular file: %v", ResultError(c.Res))
		})
	}

	t.Run("panics-over-80", func(t *testing.T) {
		defer func() {
			if recover() == nil {
				t.Fatal("PrepURingCmd with 81 bytes did not panic")
			}
		}()
		var s SQE
		s.PrepURingCmd(0, 0, make([]byte, CmdSize+1))
	})

	t.Run("socket-siocinq", func(t *testing.T) {
		r := newRing(t, 4, SetupSQE128)
		sock, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(sock)
		if err := unix.Bind(sock, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		sa, err := unix.Getsockname(sock)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Sendto(sock, []byte("hello"), 0, sa); err != nil {
			t.Fatal(err)
		}
		const socketURingOpSIOCINQ = 0 // SOCKET_URING_OP_SIOCINQ
		s := getSQE(t, r)
		s.PrepURingCmd(int32(sock), socketURingOpSIOCINQ, nil)
		s.UserData = 5
		c := reapOne(t, r)
		if c.Res == -int32(unix.EOPNOTSUPP) {
			t.Skip("kernel without socket uring_cmd (6.7+)")
		}
		mustRes(t, c, 5, 5)
	})
}

// TestMsgRing posts CQEs from one ring to another with MSG_RING, to a plain
// target and to a DEFER_TASKRUN target, and checks whether the target must
// enter the kernel before the CQE shows.
func TestMsgRing(t *testing.T) {
	for _, tc := range []struct {
		name        string
		targetFlags SetupFlags
	}{
		{"plain-target", 0},
		{"defer-taskrun-target", SetupSingleIssuer | SetupDeferTaskrun},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newRing(t, 4, 0)
			dst := newRing(t, 4, tc.targetFlags)
			s := getSQE(t, src)
			s.PrepMsgRing(int32(dst.Fd()), 1234, 0xfeedface, 0)
			s.UserData = 1
			mustRes(t, reapOne(t, src), 1, 0)

			before := dst.CQReady()
			t.Logf("target CQReady before entering the kernel: %d", before)
			if tc.targetFlags&SetupDeferTaskrun == 0 && before != 1 {
				t.Errorf("plain target: CQE not posted directly (CQReady %d)", before)
			}
			mustRes(t, reapOne(t, dst), 0xfeedface, 1234)

			// MsgRingFlagsPass: sqe.file_index becomes the target's cqe.flags.
			s = getSQE(t, src)
			s.PrepMsgRing(int32(dst.Fd()), 1, 2, MsgRingFlagsPass)
			s.SpliceFdIn = 0x55 << 16
			s.UserData = 3
			c := reapOne(t, src)
			if c.Res == -int32(unix.EINVAL) {
				t.Skip("kernel without IORING_MSG_RING_FLAGS_PASS")
			}
			mustRes(t, c, 3, 0)
			c = reapOne(t, dst)
			if c.UserData != 2 || c.Flags != 0x55<<16 {
				t.Errorf("FLAGS_PASS cqe = %+v, want user_data 2 flags %#x", c, 0x55<<16)
			}
		})
	}
}

// TestMsgRingWakesWaiter is the cross-loop wake-up: a DEFER_TASKRUN ring's
// thread sleeps in SubmitAndWait and another thread's ring wakes it with
// MSG_RING.
func TestMsgRingWakesWaiter(t *testing.T) {
	dst := newRing(t, 4, SetupSingleIssuer|SetupDeferTaskrun)
	waiter := unix.Gettid() // newRing locked the test to its thread
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := waitBlockedInEnter(waiter, dst.Fd()); err != nil {
			errc <- err
			return
		}
		src, err := New(4, SetupSingleIssuer)
		if err != nil {
			errc <- err
			return
		}
		defer src.Close()
		s := src.GetSQE()
		s.PrepMsgRing(int32(dst.Fd()), 7, 99, 0)
		if _, err := src.SubmitAndWait(1); err != nil {
			errc <- err
			return
		}
		var c [1]CQE
		src.PeekCQEs(c[:])
		errc <- ResultError(c[0].Res)
	}()
	start := time.Now()
	n, err := dst.SubmitAndWaitTimeout(1, 5*time.Second)
	if err != nil || n != 0 {
		t.Fatalf("SubmitAndWaitTimeout = %d, %v", n, err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("sender: %v", err)
	}
	if dst.CQReady() != 1 {
		t.Fatalf("woke after %v without a CQE", time.Since(start))
	}
	var c [1]CQE
	dst.PeekCQEs(c[:])
	mustRes(t, c[0], 99, 7)
}

// waitBlockedInEnter waits until thread tid of this process sleeps in
// io_uring_enter on ring fd, as /proc/self/task/TID/syscall shows (the
// syscall number and its arguments while the thread is blocked). Nothing
// signals that a thread went to sleep in the kernel, so this polls, with a
// deadline.
func waitBlockedInEnter(tid, fd int) error {
	path := fmt.Sprintf("/proc/self/task/%d/syscall", tid)
	want := fmt.Sprintf("%d %#x ", unix.SYS_IO_URING_ENTER, fd)
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if strings.HasPrefix(string(b), want) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("thread %d not asleep in io_uring_enter on fd %d after 10s: %s", tid, fd, b)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestPollEventfd arms a multishot POLL_ADD on an eventfd, triggers it
// twice, reads the counter with READ through the ring, then removes the poll.
func TestPollEventfd(t *testing.T) {
	for _, cfg := range ringConfigs[:2] {
		t.Run(cfg.name, func(t *testing.T) {
			r := newRing(t, 8, cfg.flags)
			efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(efd)
			const pollUD = 1000

			s := getSQE(t, r)
			s.PrepPollAdd(int32(efd), unix.POLLIN, true)
			s.UserData = pollUD
			if _, err := r.Submit(); err != nil {
				t.Fatal(err)
			}
			if _, err := r.Submit(); err != nil || r.CQReady() != 0 {
				t.Fatalf("poll fired on an empty eventfd (err %v, CQReady %d)", err, r.CQReady())
			}
			val := held(t, make([]byte, 8)) // the kernel writes it after submission
			for round := 1; round <= 2; round++ {
				binary.NativeEndian.PutUint64(val, uint64(round))
				if _, err := unix.Write(efd, val); err != nil {
					t.Fatal(err)
				}
				c := reapOne(t, r)
				if c.UserData != pollUD || c.Res&unix.POLLIN == 0 || c.Flags&CQEFMore == 0 {
					t.Fatalf("round %d: poll cqe = %+v, want POLLIN with CQEFMore", round, c)
				}
				clear(val)
				s = getSQE(t, r)
				s.PrepRead(int32(efd), val, 0)
				s.UserData = uint64(round)
				mustRes(t, reapOne(t, r), uint64(round), 8)
				if got := binary.NativeEndian.Uint64(val); got != uint64(round) {
					t.Fatalf("round %d: eventfd read %d", round, got)
				}
			}
			s = getSQE(t, r)
			s.PrepPollRemove(pollUD)
			s.UserData = 2000
			cqes := reap(t, r, 2)
			for _, c := range cqes {
				switch c.UserData {
				case pollUD:
					if c.Res != -int32(unix.ECANCELED) || c.Flags&CQEFMore != 0 {
						t.Errorf("final poll cqe = %+v, want -ECANCELED without MORE", c)
					}
				case 2000:
					mustRes(t, c, 2000, 0)
				default:
					t.Errorf("unexpected cqe %+v", c)
				}
			}
		})
	}
}

func TestTimeout(t *testing.T) {
	ts := held(t, &unix.Timespec{Nsec: int64(20 * time.Millisecond)})
	const flags = SetupSingleIssuer | SetupDeferTaskrun

	t.Run("expires", func(t *testing.T) {
		r := newRing(t, 8, flags)
		start := time.Now()
		s := getSQE(t, r)
		s.PrepTimeout(ts, 0, 0)
		s.UserData = 1
		mustRes(t, reapOne(t, r), 1, -int32(unix.ETIME))
		if el := time.Since(start); el < 15*time.Millisecond {
			t.Errorf("timeout fired after %v, want ~20ms", el)
		}
	})
	t.Run("count", func(t *testing.T) {
		r := newRing(t, 8, flags)
		long := held(t, &unix.Timespec{Sec: 10})
		s := getSQE(t, r)
		s.PrepTimeout(long, 1, 0)
		s.UserData = 2
		s = getSQE(t, r)
		s.PrepNop()
		s.UserData = 3
		for _, c := range reap(t, r, 2) {
			mustRes(t, c, c.UserData, 0)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		r := newRing(t, 8, flags)
		long := held(t, &unix.Timespec{Sec: 10})
		s := getSQE(t, r)
		s.PrepTimeout(long, 0, 0)
		s.UserData = 4
		if _, err := r.Submit(); err != nil {
			t.Fatal(err)
		}
		s = getSQE(t, r)
		s.PrepCancel(4, 0)
		s.UserData = 5
		got := map[uint64]int32{}
		for _, c := range reap(t, r, 2) {
			got[c.UserData] = c.Res
		}
		if got[4] != -int32(unix.ECANCELED) || got[5] != 0 {
			t.Errorf("cancel: results %v, want 4:-ECANCELED 5:0", got)
		}
		s = getSQE(t, r)
		s.PrepCancel(12345, 0)
		s.UserData = 6
		mustRes(t, reapOne(t, r), 6, -int32(unix.ENOENT))
	})
	t.Run("timeout-remove", func(t *testing.T) {
		r := newRing(t, 8, flags)
		long := held(t, &unix.Timespec{Sec: 10})
		s := getSQE(t, r)
		s.PrepTimeout(long, 0, 0)
		s.UserData = 7
		s = getSQE(t, r)
		s.PrepTimeoutRemove(7, 0)
		s.UserData = 8
		got := map[uint64]int32{}
		for _, c := range reap(t, r, 2) {
			got[c.UserData] = c.Res
		}
		if got[7] != -int32(unix.ECANCELED) || got[8] != 0 {
			t.Errorf("timeout remove: results %v", got)
		}
	})
	t.Run("link-timeout", func(t *testing.T) {
		r := newRing(t, 8, flags)
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(efd)
		buf := held(t, make([]byte, 8))
		s := getSQE(t, r)
		s.PrepRead(int32(efd), buf, 0) // blocks: counter is 0
		s.Flags |= SQEIOLink
		s.UserData = 9
		s = getSQE(t, r)
		s.PrepLinkTimeout(ts, 0)
		s.UserData = 10
		got := map[uint64]int32{}
		for _, c := range reap(t, r, 2) {
			got[c.UserData] = c.Res
		}
		if got[9] != -int32(unix.ECANCELED) || got[10] != -int32(unix.ETIME) {
			t.Errorf("link timeout: results %v, want 9:-ECANCELED 10:-ETIME", got)
		}
	})
}

func TestProbe(t *testing.T) {
	r := newRing(t, 4, 0)
	p, err := r.Probe()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("last opcode %d", p.LastOp())
	for _, op := range []Op{OpNop, OpRead, OpWrite, OpReadFixed, OpFsync, OpFallocate, OpPollAdd, OpTimeout, OpAsyncCancel, OpMsgRing, OpURingCmd} {
		if !p.Supported(op) {
			t.Errorf("opcode %d not supported", op)
		}
	}
	if p.Supported(Op(255)) {
		t.Error("opcode 255 reported supported")
	}
}

func TestRegisterEventfd(t *testing.T) {
	r := newRing(t, 4, 0)
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := r.RegisterEventfd(efd); err != nil {
		t.Fatal(err)
	}
	s := getSQE(t, r)
	s.PrepNop()
	reapOne(t, r)
	var v [8]byte
	if n, err := unix.Read(efd, v[:]); err != nil || n != 8 || binary.NativeEndian.Uint64(v[:]) == 0 {
		t.Fatalf("eventfd not signalled: n %d err %v", n, err)
	}
	if err := r.UnregisterEventfd(); err != nil {
		t.Fatal(err)
	}
}
