package uring

import (
	"errors"
	"os"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestMain fails the package if a test leaks file descriptors (rings,
// eventfds, temp files).
func TestMain(m *testing.M) {
	// Start the runtime's netpoller (an epoll fd and an eventfd) first so
	// it is not counted as a leak.
	if pr, pw, err := os.Pipe(); err == nil {
		pr.Close()
		pw.Close()
	}
	before := countFds()
	code := m.Run()
	if after := countFds(); code == 0 && after > before {
		println("uring tests leaked", after-before, "file descriptors")
		ents, _ := os.ReadDir("/proc/self/fd")
		for _, e := range ents {
			l, _ := os.Readlink("/proc/self/fd/" + e.Name())
			println(e.Name(), l)
		}
		code = 1
	}
	os.Exit(code)
}

func countFds() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}

// newRing creates a ring closed at the end of the test. It locks the test
// goroutine to its OS thread first, so SINGLE_ISSUER rings work; the thread
// dies with the test goroutine.
func newRing(t testing.TB, entries uint32, flags SetupFlags) *Ring {
	t.Helper()
	runtime.LockOSThread()
	r, err := New(entries, flags)
	if err != nil {
		t.Fatalf("New(%d, %#x): %v", entries, uint32(flags), err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// getSQE returns a fresh SQE or fails the test.
func getSQE(t testing.TB, r *Ring) *SQE {
	t.Helper()
	s := r.GetSQE()
	if s == nil {
		t.Fatal("GetSQE: SQ full")
	}
	return s
}

// reap submits everything queued and collects exactly n CQEs, failing the
// test if they do not arrive within 5 s.
func reap(t testing.TB, r *Ring, n int) []CQE {
	t.Helper()
	out := make([]CQE, 0, n)
	buf := make([]CQE, 64)
	deadline := time.Now().Add(5 * time.Second)
	for len(out) < n {
		if time.Now().After(deadline) {
			t.Fatalf("reap: got %d of %d CQEs: %+v", len(out), n, out)
		}
		if _, err := r.SubmitAndWaitTimeout(uint32(n-len(out)), time.Until(deadline)); err != nil {
			t.Fatalf("SubmitAndWaitTimeout: %v", err)
		}
		k := r.PeekCQEs(buf[:min(len(buf), n-len(out))])
		out = append(out, buf[:k]...)
	}
	return out
}

// reapOne submits and returns the single CQE expected.
func reapOne(t testing.TB, r *Ring) CQE {
	t.Helper()
	return reap(t, r, 1)[0]
}

// ringConfigs are the flag sets exercised by the table-driven tests.
var ringConfigs = []struct {
	name  string
	flags SetupFlags
}{
	{"default", 0},
	{"single-issuer+defer-taskrun", SetupSingleIssuer | SetupDeferTaskrun},
	{"coop-taskrun", SetupCoopTaskrun | SetupTaskrunFlag},
	{"sqe128", SetupSQE128 | SetupSingleIssuer | SetupDeferTaskrun},
	{"submit-all", SetupSubmitAll},
}

func TestNop(t *testing.T) {
	for _, cfg := range ringConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			r := newRing(t, 16, cfg.flags)
			const n = 10
			for i := range n {
				s := getSQE(t, r)
				s.PrepNop()
				s.UserData = uint64(100 + i)
			}
			if got := r.SQReady(); got != n {
				t.Fatalf("SQReady = %d, want %d", got, n)
			}
			if got := r.SQSpace(); got != r.SQEntries()-n {
				t.Fatalf("SQSpace = %d, want %d", got, r.SQEntries()-n)
			}
			sub, err := r.Submit()
			if err != nil || sub != n {
				t.Fatalf("Submit = %d, %v; want %d", sub, err, n)
			}
			if got := r.SQReady(); got != 0 {
				t.Fatalf("SQReady after submit = %d", got)
			}
			cqes := reap(t, r, n)
			for i, c := range cqes {
				if c.UserData != uint64(100+i) || c.Res != 0 {
					t.Errorf("cqe %d = %+v, want user_data %d res 0", i, c, 100+i)
				}
			}
			if got := r.CQReady(); got != 0 {
				t.Errorf("CQReady after reaping = %d", got)
			}
		})
	}
}

// TestGetSQEZeroes checks that a recycled slot comes back zeroed, all 128
// bytes on an SQE128 ring.
func TestGetSQEZeroes(t *testing.T) {
	for _, cfg := range []struct {
		name  string
		flags SetupFlags
		size  int
	}{{"sqe64", 0, 64}, {"sqe128", SetupSQE128, 128}} {
		t.Run(cfg.name, func(t *testing.T) {
			r := newRing(t, 1, cfg.flags)
			if r.SQEntries() != 1 {
				t.Fatalf("SQEntries = %d, want 1", r.SQEntries())
			}
			s := getSQE(t, r)
			raw := unsafe.Slice((*byte)(unsafe.Pointer(s)), cfg.size)
			for i := range raw {
				raw[i] = 0xff
			}
			if r.GetSQE() != nil {
				t.Fatal("GetSQE on a full 1-entry SQ returned a slot")
			}
			clear(raw)
			s.PrepNop()
			reapOne(t, r)
			s2 := getSQE(t, r)
			if s2 != s {
				t.Fatal("1-entry ring handed out a different slot")
			}
			for i, b := range raw {
				if b != 0 {
					t.Fatalf("byte %d of recycled SQE = %#x, want 0", i, b)
				}
			}
			s2.PrepNop()
			reapOne(t, r)
		})
	}
}

func TestFlagFallback(t *testing.T) {
	all := SetupCoopTaskrun | SetupTaskrunFlag | SetupSQE128 | SetupSingleIssuer |
		SetupDeferTaskrun | SetupSubmitAll | SetupNoSQArray | SetupClamp
	r := newRing(t, 8, all)
	t.Logf("requested %#x, accepted %#x, features %#x", uint32(all), uint32(r.Flags()), r.Features())
	if r.Flags()&SetupSQE128 == 0 {
		t.Error("SQE128 was dropped")
	}

	for _, tc := range []struct {
		name       string
		flags      SetupFlags
		mustDrop   SetupFlags
		mustKeep   SetupFlags
		wantErrnos unix.Errno
	}{
		// TASKRUN_FLAG needs COOP_TASKRUN or DEFER_TASKRUN: EINVAL, then
		// the COOP|TASKRUN step drops it.
		{name: "taskrun-flag-alone", flags: SetupTaskrunFlag, mustDrop: SetupTaskrunFlag},
		// DEFER_TASKRUN is invalid with SQPOLL: dropped, SINGLE_ISSUER stays.
		{name: "defer-with-sqpoll", flags: SetupSQPoll | SetupDeferTaskrun, mustDrop: SetupDeferTaskrun, mustKeep: SetupSQPoll | SetupSingleIssuer},
		// DEFER_TASKRUN implies SINGLE_ISSUER.
		{name: "defer-implies-single", flags: SetupDeferTaskrun, mustKeep: SetupDeferTaskrun | SetupSingleIssuer},
		{name: "cqe32-refused", flags: SetupCQE32, wantErrnos: unix.EINVAL},
		{name: "no-mmap-refused", flags: SetupNoMmap, wantErrnos: unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runtime.LockOSThread()
			r, err := New(4, tc.flags)
			if tc.wantErrnos != 0 {
				if !errors.Is(err, tc.wantErrnos) {
					t.Fatalf("New(%#x) = %v, want %v", uint32(tc.flags), err, tc.wantErrnos)
				}
				return
			}
			if err != nil {
				t.Fatalf("New(%#x): %v", uint32(tc.flags), err)
			}
			defer r.Close()
			t.Logf("requested %#x, accepted %#x", uint32(tc.flags), uint32(r.Flags()))
			if r.Flags()&tc.mustDrop != 0 {
				t.Errorf("flags %#x still has %#x", uint32(r.Flags()), uint32(tc.mustDrop))
			}
			if r.Flags()&tc.mustKeep != tc.mustKeep {
				t.Errorf("flags %#x lacks %#x", uint32(r.Flags()), uint32(tc.mustKeep))
			}
			s := getSQE(t, r)
			s.PrepNop()
			s.UserData = 7
			if c := reapOne(t, r); c.UserData != 7 || c.Res != 0 {
				t.Errorf("NOP cqe = %+v", c)
			}
		})
	}
}

// TestSingleIssuer checks that the kernel rejects io_uring_enter from a
// second OS thread with EEXIST, and that the rejected SQE is not lost.
func TestSingleIssuer(t *testing.T) {
	for _, cfg := range []struct {
		name  string
		flags SetupFlags
	}{
		{"single-issuer", SetupSingleIssuer},
		{"defer-taskrun", SetupSingleIssuer | SetupDeferTaskrun},
	} {
		t.Run(cfg.name, func(t *testing.T) {
			r := newRing(t, 4, cfg.flags)
			if r.Flags()&SetupSingleIssuer == 0 {
				t.Skip("kernel without IORING_SETUP_SINGLE_ISSUER")
			}
			errc := make(chan error)
			go func() {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				s := r.GetSQE()
				s.PrepNop()
				s.UserData = 42
				_, err := r.Submit()
				errc <- err
			}()
			err := <-errc
			if !errors.Is(err, unix.EEXIST) {
				t.Fatalf("Submit from another thread: %v, want EEXIST", err)
			}
			if got := r.SQReady(); got != 1 {
				t.Fatalf("SQReady after rejected submit = %d, want 1", got)
			}
			if c := reapOne(t, r); c.UserData != 42 || c.Res != 0 {
				t.Errorf("cqe = %+v, want user_data 42", c)
			}
		})
	}
}

// TestFullSQ pushes 1000 NOPs through an 8-entry ring, GetSQE returning nil
// whenever the SQ is full, and checks that every request completes exactly
// once. "reap-each" reaps after every submit and must never overflow the CQ;
// "overflow" lets the CQ (16 entries) overflow and relies on FEAT_NODROP and
// the retry rules (EBUSY/EAGAIN: reap, then retry) to lose nothing.
func TestFullSQ(t *testing.T) {
	for _, cfg := range []struct {
		name       string
		flags      SetupFlags
		reapEvery  int // submit batches between reaps
		noOverflow bool
	}{
		{"reap-each", 0, 1, true},
		{"reap-each-defer", SetupSingleIssuer | SetupDeferTaskrun, 1, true},
		{"overflow", 0, 20, false},
		{"overflow-defer", SetupSingleIssuer | SetupDeferTaskrun, 20, false},
	} {
		t.Run(cfg.name, func(t *testing.T) {
			r := newRing(t, 8, cfg.flags)
			if r.SQEntries() != 8 {
				t.Fatalf("SQEntries = %d, want 8", r.SQEntries())
			}
			const total = 1000
			seen := make([]int, total)
			got := 0
			buf := make([]CQE, 5) // deliberately small: several PeekCQEs per batch
			drain := func() {
				for {
					k := r.PeekCQEs(buf)
					if k == 0 {
						return
					}
					for _, c := range buf[:k] {
						if c.UserData >= total || c.Res != 0 {
							t.Fatalf("bad cqe %+v", c)
						}
						seen[c.UserData]++
						got++
					}
				}
			}
			fullSeen, batches, overflowSeen := 0, 0, 0
			for i := 0; i < total; {
				s := r.GetSQE()
				if s == nil {
					fullSeen++
					if r.SQReady() != 8 || r.SQSpace() != 0 {
						t.Fatalf("GetSQE nil with SQReady %d SQSpace %d", r.SQReady(), r.SQSpace())
					}
					_, err := r.Submit()
					if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EAGAIN) {
						t.Logf("submit: %v (reaping and retrying)", err)
						r.SubmitAndWait(0)
						drain()
						continue
					} else if err != nil {
						t.Fatal(err)
					}
					batches++
					if r.SQFlags()&SQCQOverflow != 0 {
						overflowSeen++
					}
					if batches%cfg.reapEvery == 0 {
						drain()
					}
					continue
				}
				s.PrepNop()
				s.UserData = uint64(i)
				i++
			}
			deadline := time.Now().Add(5 * time.Second)
			for got < total && time.Now().Before(deadline) {
				if _, err := r.SubmitAndWaitTimeout(1, time.Second); err != nil &&
					!errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.EAGAIN) {
					t.Fatal(err)
				}
				drain()
			}
			if got != total {
				t.Fatalf("got %d CQEs, want %d", got, total)
			}
			for i, n := range seen {
				if n != 1 {
					t.Fatalf("user_data %d seen %d times", i, n)
				}
			}
			if fullSeen < total/8-1 {
				t.Errorf("GetSQE returned nil %d times, want >= %d", fullSeen, total/8-1)
			}
			if cfg.noOverflow && (r.CQOverflow() != 0 || overflowSeen != 0) {
				t.Errorf("CQ overflowed (counter %d, flag seen %d times) while reaping every batch", r.CQOverflow(), overflowSeen)
			}
			if !cfg.noOverflow && overflowSeen == 0 {
				t.Errorf("CQ never overflowed: the test does not exercise the overflow path")
			}
			if r.Features()&FeatNoDrop != 0 && r.CQOverflow() != 0 {
				t.Errorf("CQEs dropped (%d) despite IORING_FEAT_NODROP", r.CQOverflow())
			}
			t.Logf("GetSQE full %d times, overflow flag seen after %d of %d submits, counter %d",
				fullSeen, overflowSeen, batches, r.CQOverflow())
		})
	}
}

func TestSubmitAndWaitTimeout(t *testing.T) {
	r := newRing(t, 4, SetupSingleIssuer|SetupDeferTaskrun)
	if r.Features()&FeatExtArg == 0 {
		t.Skip("no IORING_FEAT_EXT_ARG")
	}
	start := time.Now()
	n, err := r.SubmitAndWaitTimeout(1, 30*time.Millisecond)
	if err != nil || n != 0 {
		t.Fatalf("SubmitAndWaitTimeout on an idle ring = %d, %v; want 0, nil", n, err)
	}
	if el := time.Since(start); el < 25*time.Millisecond {
		t.Errorf("returned after %v, want >= 30ms", el)
	}
	if r.CQReady() != 0 {
		t.Errorf("CQReady = %d", r.CQReady())
	}
	// With a request queued it submits and returns promptly.
	s := getSQE(t, r)
	s.PrepNop()
	start = time.Now()
	n, err = r.SubmitAndWaitTimeout(1, 5*time.Second)
	if err != nil || n != 1 || r.CQReady() != 1 {
		t.Fatalf("= %d, %v, CQReady %d; want 1, nil, 1", n, err, r.CQReady())
	}
	if el := time.Since(start); el > time.Second {
		t.Errorf("took %v", el)
	}
}

func TestClose(t *testing.T) {
	r, err := New(4, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if r.GetSQE() != nil {
		t.Error("GetSQE after Close returned a slot")
	}
	if _, err := r.Submit(); !errors.Is(err, ErrClosed) {
		t.Errorf("Submit after Close: %v", err)
	}
	if _, err := r.SubmitAndWait(1); !errors.Is(err, ErrClosed) {
		t.Errorf("SubmitAndWait after Close: %v", err)
	}
	if r.CQReady() != 0 || r.PeekCQEs(make([]CQE, 1)) != 0 {
		t.Error("CQ readable after Close")
	}
}

// BenchmarkNop submits and reaps batches of 32 NOPs; ns/op is per NOP.
func BenchmarkNop(b *testing.B) {
	for _, cfg := range []struct {
		name  string
		flags SetupFlags
	}{
		{"default", 0},
		{"single-issuer+defer-taskrun", SetupSingleIssuer | SetupDeferTaskrun | SetupCoopTaskrun},
	} {
		b.Run(cfg.name, func(b *testing.B) {
			const batch = 32
			r := newRing(b, 64, cfg.flags)
			cqes := make([]CQE, batch)
			b.ReportAllocs()
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(batch, b.N-done)
				for i := range n {
					s := r.GetSQE()
					s.PrepNop()
					s.UserData = uint64(i)
				}
				if _, err := r.SubmitAndWait(uint32(n)); err != nil {
					b.Fatal(err)
				}
				if got := r.PeekCQEs(cqes[:n]); got != n {
					b.Fatalf("reaped %d, want %d", got, n)
				}
				done += n
			}
		})
	}
}

// TestDeferTaskrunSubmit pins the kernel behaviour behind Submit's use of
// GETEVENTS: on a DEFER_TASKRUN ring a completion that needs task work (a
// READ of an eventfd completed by a later write) is posted only by
// io_uring_enter with GETEVENTS, so Submit must pass it.
func TestDeferTaskrunSubmit(t *testing.T) {
	r := newRing(t, 4, SetupSingleIssuer|SetupDeferTaskrun)
	if r.Flags()&SetupDeferTaskrun == 0 {
		t.Skip("kernel without IORING_SETUP_DEFER_TASKRUN")
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	buf := held(t, make([]byte, 8))
	s := getSQE(t, r)
	s.PrepRead(int32(efd), buf, 0)
	s.UserData = 1
	if n, err := r.Submit(); n != 1 || err != nil {
		t.Fatalf("Submit = %d, %v", n, err)
	}
	if _, err := unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
	// A bare enter (no GETEVENTS) does not run the deferred work.
	if _, errno := r.enter(0, 0, 0, nil, 0); errno != 0 {
		t.Fatal(errno)
	}
	t.Logf("CQReady after enter without GETEVENTS: %d (sq flags %#x)", r.CQReady(), r.SQFlags())
	if n, err := r.Submit(); n != 0 || err != nil {
		t.Fatalf("empty Submit = %d, %v", n, err)
	}
	if r.CQReady() != 1 {
		t.Fatalf("CQReady after Submit = %d, want 1: Submit did not run deferred task work", r.CQReady())
	}
}

// TestSubmitAndWaitEINTR bombards the waiting thread with SIGURG (the
// signal Go's preemption uses, so it is handled) and checks that
// SubmitAndWait neither fails nor returns before its CQE.
func TestSubmitAndWaitEINTR(t *testing.T) {
	for _, cfg := range ringConfigs[:2] {
		t.Run(cfg.name, func(t *testing.T) {
			r := newRing(t, 4, cfg.flags)
			tid := unix.Gettid()
			ts := held(t, &unix.Timespec{Nsec: int64(100 * time.Millisecond)})
			s := getSQE(t, r)
			s.PrepTimeout(ts, 0, 0)
			s.UserData = 1
			stop := make(chan struct{})
			sent := make(chan int)
			go func() {
				n := 0
				defer func() { sent <- n }()
				for {
					select {
					case <-stop:
						return
					case <-time.After(2 * time.Millisecond):
						if unix.Tgkill(unix.Getpid(), tid, unix.SIGURG) == nil {
							n++
						}
					}
				}
			}()
			start := time.Now()
			_, err := r.SubmitAndWait(1)
			el := time.Since(start)
			close(stop)
			n := <-sent
			if err != nil {
				t.Fatalf("SubmitAndWait: %v", err)
			}
			if r.CQReady() != 1 || el < 90*time.Millisecond {
				t.Fatalf("returned after %v with CQReady %d, want the timeout CQE at ~100ms", el, r.CQReady())
			}
			var c [1]CQE
			r.PeekCQEs(c[:])
			if c[0].Res != -int32(unix.ETIME) {
				t.Fatalf("cqe %+v", c[0])
			}
			t.Logf("%d signals during a %v wait", n, el)
		})
	}
}

// TestSQPoll runs NOPs through an SQPOLL ring, whose kernel thread consumes
// the SQ on its own.
func TestSQPoll(t *testing.T) {
	r := newRing(t, 8, SetupSQPoll)
	if r.Flags()&SetupSQPoll == 0 {
		t.Fatal("SQPOLL dropped")
	}
	const total = 100
	seen := make(map[uint64]bool)
	buf := make([]CQE, 16)
	deadline := time.Now().Add(5 * time.Second)
	for i := 0; len(seen) < total; {
		if time.Now().After(deadline) {
			t.Fatalf("got %d of %d", len(seen), total)
		}
		for ; i < total; i++ {
			s := r.GetSQE()
			if s == nil {
				break
			}
			s.PrepNop()
			s.UserData = uint64(i)
		}
		if _, err := r.SubmitAndWaitTimeout(1, time.Second); err != nil {
			t.Fatal(err)
		}
		for k := r.PeekCQEs(buf); k > 0; k = r.PeekCQEs(buf) {
			for _, c := range buf[:k] {
				if seen[c.UserData] || c.Res != 0 {
					t.Fatalf("duplicate or failed cqe %+v", c)
				}
				seen[c.UserData] = true
			}
		}
	}
}
