package qemutest

import (
	"bytes"
	"fmt"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The image lock bytes (QEMU's file-posix): 100+i for each permission a
// process uses, 200+i for each it does not share.
const (
	lockFirst = 100
	lockEnd   = 300
)

// Lock bytes that qemu-io 7.2 holds on a qcow2 image it has open: read-write
// it takes write and resize and shares neither; read-only (-r) it reads
// consistently and still shares neither.
var (
	QemuIOWriteLocks = []int{101, 103, 201, 203}
	QemuIOReadLocks  = []int{100, 201, 203}
)

// LockedBytes returns the lock bytes of path that any process holds, as a
// process opening it would see them (F_OFD_GETLK from a fresh open file
// description, which none of the caller's own locks belong to).
func LockedBytes(path string) ([]int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var held []int
	for off := lockFirst; off < lockEnd; off++ {
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: unix.SEEK_SET, Start: int64(off), Len: 1}
		if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk); err != nil {
			return nil, fmt.Errorf("F_OFD_GETLK %s byte %d: %w", path, off, err)
		}
		if lk.Type != unix.F_UNLCK {
			held = append(held, off)
		}
	}
	return held, nil
}

// Hold runs the command (a QEMU tool, or ublkimg) that keeps path open,
// returns once the lock bytes want are all held on path, and kills the
// command when the test ends. The wait polls the lock bytes: the holder
// prints nothing when it has the image open, and its locks are the
// condition the tests need.
func Hold(t testing.TB, path string, want []int, name string, args ...string) {
	t.Helper()
	startHolder(t, path, want, name, args...)
}

// HoldWithQemuIO opens path in qemu-io (args such as "-r" or "-f raw"
// before it), and returns once it holds lock bytes want and has finished
// opening the image; it is killed when the test ends. qemu-io takes its
// locks before its format driver opens the image, and a read-write qcow2
// open still writes to the file then (it marks persistent bitmaps in
// use), so after the lock bytes Hold also waits for the output of a
// command that qemu-io runs only once the image is open.
func HoldWithQemuIO(t testing.TB, path string, want []int, args ...string) {
	t.Helper()
	holdWithQemuIO(t, path, want, path, args)
}

// HoldWithQemuIOOpts is HoldWithQemuIO for an image qemu-io opens with
// --image-opts: image is the options string, which names path.
func HoldWithQemuIOOpts(t testing.TB, path string, want []int, image string, args ...string) {
	t.Helper()
	holdWithQemuIO(t, path, want, image, append(slices.Clone(args), "--image-opts"))
}

func holdWithQemuIO(t testing.TB, path string, want []int, image string, args []string) {
	t.Helper()
	Require(t, "qemu-io")
	// stdbuf: qemu-io's stdout to a pipe is otherwise flushed only at
	// exit. It execs qemu-io in its own process, which the cleanup kills.
	a := append([]string{"-oL", "qemu-io"}, args...)
	h := startHolder(t, path, want, "stdbuf", append(a, "-c", "length", "-c", "sleep 600000", image)...)
	select {
	case <-h.firstLine:
	case <-h.exited:
		t.Fatalf("qemu-io %v exited before it opened %s:\n%s", args, path, h.output())
	case <-time.After(holdTimeout):
		t.Fatalf("qemu-io %v has not opened %s after %v", args, path, holdTimeout)
	}
}

const holdTimeout = 30 * time.Second

type holder struct {
	out, errs syncBuffer
	firstLine chan struct{} // closed when the holder wrote a line on stdout
	exited    chan struct{}
}

func (h *holder) output() string { return h.out.String() + h.errs.String() }

func startHolder(t testing.TB, path string, want []int, name string, args ...string) *holder {
	t.Helper()
	h := &holder{firstLine: make(chan struct{}), exited: make(chan struct{})}
	h.out.line = h.firstLine
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &h.out, &h.errs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(h.exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-h.exited
	})
	deadline := time.Now().Add(holdTimeout)
	for {
		held, err := LockedBytes(path)
		if err != nil {
			t.Fatal(err)
		}
		if containsAll(held, want) {
			return h
		}
		select {
		case <-h.exited:
			t.Fatalf("%s %v exited before it held %v on %s:\n%s", name, args, want, path, h.output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s %v holds %v on %s after %v, want %v", name, args, held, path, holdTimeout, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// syncBuffer collects a holder's output, and closes line at the first
// newline.
type syncBuffer struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	line chan struct{}
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.line != nil && bytes.IndexByte(p, '\n') >= 0 {
		close(b.line)
		b.line = nil
	}
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func containsAll(have, want []int) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

// ForkStorm forks and executes children ("true") without pause until the
// test ends. Each child holds a reference to every open file of this
// process, close-on-exec or not, from its fork to its exec: a file closed
// meanwhile lives on, and keeps its lock bytes unless they were released
// before the close.
func ForkStorm(t testing.TB) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			exec.Command("true").Run()
		}
	}()
	t.Cleanup(func() { close(stop); wg.Wait() })
}

// BlockStormSignals is a coroutine.Config.OnThread for loops that run
// during a ForkStorm: it blocks SIGCHLD (every child's exit) and SIGURG
// (the Go runtime's preemption) on the loop's thread. The kernel creates
// io_uring's io-wq workers in the submitting thread and gives up after a
// few attempts that a pending signal interrupts, failing the queued
// requests with ECANCELED; a storm of signals would fail the test for
// that, not for what it checks.
func BlockStormSignals() error {
	var set unix.Sigset_t
	for _, sig := range []unix.Signal{unix.SIGCHLD, unix.SIGURG} {
		set.Val[(sig-1)/64] |= 1 << ((uint(sig) - 1) % 64)
	}
	return unix.PthreadSigmask(unix.SIG_BLOCK, &set, nil)
}
