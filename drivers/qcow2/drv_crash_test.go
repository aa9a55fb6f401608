package qcow2_test

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// Crash consistency: a child process (this test binary, re-executed) writes
// an operation stream with periodic flushes and reports progress on stdout;
// the parent SIGKILLs it mid-stream. The image must then pass qemu-img check
// (leaked clusters allowed, nothing else), and every operation completed
// before the last completed flush must read back. Lazy-refcount images are
// dirty after the kill and are repaired by a read-write open first.

const (
	crashImgEnv  = "QCOW2_CRASH_IMG"
	crashSeedEnv = "QCOW2_CRASH_SEED"
	crashOps     = 100000 // more than the child gets through
)

// crashStream is the operation stream of one round.
func crashStream(seed uint64, size, cs int64) []op {
	return genOps(seed, size, crashOps, "zud", cs)
}

// TestCrashChild is the child side; it does nothing unless run by
// TestCrashConsistency.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashImgEnv)
	if path == "" {
		t.Skip("only run as the child of TestCrashConsistency")
	}
	seed, _ := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, bdrv.Spec{Filename: path})
		if err != nil {
			return err
		}
		h := imageOf(t, n).Header()
		cs := int64(h.ClusterSize())
		ops := crashStream(seed, n.Length(), cs)
		for i, o := range ops {
			fmt.Fprintf(os.Stdout, "S %d\n", i)
			if err := o.apply(co, n); err != nil {
				return err
			}
			if i%7 == 6 {
				if err := n.Flush(co); err != nil {
					return err
				}
				fmt.Fprintf(os.Stdout, "F %d\n", i)
			}
		}
		return nil
	})
	if err != nil {
		fmt.Fprintf(os.Stdout, "E %v\n", err)
	}
}

// TestCrashConsistency kills writers at random points, several rounds on
// the same image.
func TestCrashConsistency(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	rounds := 4
	if testing.Short() || raceEnabled {
		rounds = 2
	}
	for _, cfg := range []struct{ name, opts string }{
		{"v3", ""},
		{"extl2_backed", "extended_l2=on"},
		{"v2_4k", "compat=0.10,cluster_size=4k"},
		{"lazy", "lazy_refcounts=on"},
	} {
		t.Run(cfg.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			args := []string{}
			if cfg.opts != "" {
				args = append(args, "-o", cfg.opts)
			}
			if strings.Contains(cfg.name, "backed") {
				writeRaw(t, filepath.Join(dir, "base.raw"), pattern(21, 16<<20))
				args = append(args, "-b", "base.raw", "-F", "raw")
			}
			p := qimg(t, filepath.Join(dir, "img.qcow2"), "16M", args...)
			cs := int64(64 << 10)
			if strings.Contains(cfg.opts, "4k") {
				cs = 4 << 10
			}
			r := rand.New(rand.NewPCG(uint64(len(cfg.name)), 3))
			for round := 0; round < rounds; round++ {
				model := rawOf(t, p)
				seed := uint64(round*10 + len(cfg.name))
				flushed, started := crashRun(t, p, seed, time.Duration(r.IntN(30))*time.Millisecond)
				if strings.Contains(cfg.opts, "lazy") {
					// Refcounts were deferred: the image is dirty and
					// a read-write open repairs it, as QEMU's does.
					if !headerOf(t, p).Dirty() {
						t.Fatal("lazy-refcount image not dirty after the kill")
					}
					bdrvtest.WithNode(t, bdrv.Spec{Filename: p}, func(co *coroutine.Co, n *bdrv.Node) error { return nil })
				}
				qcheck(t, p, true)
				ops := crashStream(seed, int64(len(model)), cs)
				applyModel(model, ops[:flushed+1], cs, false)
				// Bytes touched by operations after the last flush
				// may hold either content.
				unsure := make([]bool, len(model))
				for _, o := range ops[flushed+1 : started+1] {
					lo, hi := o.off, o.off+o.n
					if o.kind == 'd' || o.kind == 'z' || o.kind == 'u' {
						lo, hi = lo/cs*cs, (hi+cs-1)/cs*cs // whole clusters may change
					}
					for i := lo; i < min(hi, int64(len(model))); i++ {
						unsure[i] = true
					}
				}
				got := rawOf(t, p)
				for i := range got {
					if !unsure[i] && got[i] != model[i] {
						var touching []string
						for k, o := range ops[:started+1] {
							if o.off/cs <= int64(i)/cs && int64(i)/cs <= (o.off+o.n-1)/cs {
								touching = append(touching, fmt.Sprintf("%d:%s", k, o.qemuCmd()))
							}
						}
						m, _ := exec.Command("qemu-img", "map", "--output=json", "-U", p).CombinedOutput()
						t.Fatalf("round %d: byte %#x is %#x, want %#x (last flush after op %d, op %d started)\nops on its cluster: %v\n%s",
							round, i, got[i], model[i], flushed, started, touching, m)
					}
				}
				t.Logf("round %d: killed after op %d started, flush after op %d", round, started, flushed)
			}
		})
	}
}

// waitReleased waits until the killed child's image locks are gone: the
// kernel tears a dead process's io_uring down asynchronously, and the open
// file (with its locks) lives until the ring drops its last reference.
func waitReleased(t testing.TB, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		// A read-only open does not share write access, so it fails
		// while anyone still holds it, and changes nothing.
		err := openErr(bdrv.Spec{Filename: path, ReadOnly: true, NoBacking: true})
		if err == nil || !strings.Contains(err.Error(), "lock") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("image still locked after the child died: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// crashRun starts the child on the image, waits for two flushes and delay,
// kills it, and returns the last flushed and the last started operation.
func crashRun(t *testing.T, path string, seed uint64, delay time.Duration) (flushed, started int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashImgEnv+"="+path, crashSeedEnv+"="+strconv.FormatUint(seed, 10))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1024)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	flushed, started = -1, -1
	flushes := 0
	var kill <-chan time.Time
	timeout := time.After(60 * time.Second)
	killed := false
	for l := range lines {
		var n int
		switch {
		case strings.HasPrefix(l, "S "):
			n, _ = strconv.Atoi(l[2:])
			started = max(started, n)
		case strings.HasPrefix(l, "F "):
			n, _ = strconv.Atoi(l[2:])
			flushed = max(flushed, n)
			flushes++
			if flushes == 2 && kill == nil {
				kill = time.After(delay)
			}
		case strings.HasPrefix(l, "E "):
			t.Fatalf("child failed: %s", l)
		}
		if !killed {
			select {
			case <-kill:
				cmd.Process.Signal(syscall.SIGKILL)
				killed = true
			case <-timeout:
				cmd.Process.Signal(syscall.SIGKILL)
				t.Fatal("child did not get going")
			default:
			}
		}
	}
	cmd.Wait()
	waitReleased(t, path)
	if !killed {
		t.Fatal("child finished before it was killed")
	}
	if flushed < 0 {
		t.Fatal("no flush completed before the kill")
	}
	return flushed, started
}
