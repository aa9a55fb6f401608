package file

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// startLoops starts n loops, closed when the test ends.
func startLoops(t *testing.T, n int) []*coroutine.Loop {
	t.Helper()
	loops := make([]*coroutine.Loop, n)
	for i := range loops {
		l, err := coroutine.Start(coroutine.Config{})
		if err != nil {
			t.Fatal(err)
		}
		loops[i] = l
		t.Cleanup(l.Close)
	}
	return loops
}

// openFile opens path with the file driver on l, closed when the test
// ends (before the loops startLoops made earlier).
func openFile(t *testing.T, l *coroutine.Loop, path string) *bdrv.Node {
	t.Helper()
	var node *bdrv.Node
	err := l.Call(func(co *coroutine.Co) error {
		var err error
		node, err = bdrv.Open(co, bdrv.Spec{Filename: path, Format: "file"})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Call(func(co *coroutine.Co) error { return node.Close(co) }); err != nil {
			t.Error(err)
		}
	})
	return node
}

// deep recurses n frames of about 1 KiB each, so that the calling
// goroutine's stack grows (and, once it returns, is mostly unused: the next
// GC that scans the goroutine while it is parked shrinks it, moving the
// frames that are left and freeing the old stack for reuse).
//
//go:noinline
func deep(n int, seed byte) byte {
	var pad [1000]byte
	for i := range pad {
		pad[i] = seed + byte(i)
	}
	if n == 0 {
		return pad[int(seed)%len(pad)]
	}
	return deep(n-1, seed+1) ^ pad[n%len(pad)]
}

// TestVectoredIOUnderStackMoves runs two-segment reads and writes (the
// shape the qcow2 COW merge and the generic layer's padding produce) on many
// coroutines of two loops while another goroutine forces garbage
// collections back to back and every coroutine grows its stack deeply
// between requests. A coroutine parked in Wait then has a large, mostly
// unused stack that a GC shrinks (moves) before its loop submits the
// request: any memory the request points into on that stack (an iovec
// array the compiler kept on the stack) is freed and reused by the next
// coroutine's growth before the kernel reads it. Every byte written is read
// back through a different split and compared. Before the Co owned the
// iovec arrays this failed within a fraction of a second, every run
// (without the race detector: see raceEnabled).
func TestVectoredIOUnderStackMoves(t *testing.T) {
	const (
		nLoops  = 2
		perLoop = 24
		region  = 8192
	)
	budget := 3 * time.Second
	if testing.Short() || raceEnabled {
		budget = time.Second
	}
	path := filepath.Join(t.TempDir(), "img")
	loops := startLoops(t, nLoops)
	err := loops[0].Call(func(co *coroutine.Co) error {
		return bdrv.Create(co, "file", &bdrv.CreateRequest{Filename: path, Size: nLoops * perLoop * region})
	})
	if err != nil {
		t.Fatal(err)
	}
	node := openFile(t, loops[0], path)

	stop := make(chan struct{})
	var gcs atomic.Int64
	var gcDone sync.WaitGroup
	gcDone.Add(1)
	go func() {
		defer gcDone.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			runtime.GC()
			gcs.Add(1)
		}
	}()

	deadline := time.Now().Add(budget)
	var ops atomic.Int64
	errc := make(chan error, nLoops*perLoop)
	for li, l := range loops {
		for c := range perLoop {
			id := li*perLoop + c
			l.Spawn(func(co *coroutine.Co) {
				errc <- hammer(co, node, id, int64(id)*region, region, deadline, &ops)
			})
		}
	}
	var failures []error
	for range nLoops * perLoop {
		if err := <-errc; err != nil {
			failures = append(failures, err)
		}
	}
	close(stop)
	gcDone.Wait()
	t.Logf("%d verified write+read pairs, %d forced GCs", ops.Load(), gcs.Load())
	for i, err := range failures {
		if i == 5 {
			t.Errorf("... and %d more", len(failures)-5)
			break
		}
		t.Error(err)
	}
}

// hammer writes and reads back its own region with two-segment vectors,
// recursing deeply before each request, until deadline.
func hammer(co *coroutine.Co, node *bdrv.Node, id int, base, size int64, deadline time.Time, ops *atomic.Int64) error {
	rng := rand.New(rand.NewPCG(uint64(id), 1))
	want := make([]byte, size)
	got := make([]byte, size)
	for iter := 0; time.Now().Before(deadline); iter++ {
		n := 1 + rng.Int64N(size)
		off := rng.Int64N(size - n + 1)
		for i := range want[:n] {
			want[i] = byte(id*31 + iter*7 + i)
		}
		split := rng.Int64N(n + 1)
		deep(32+rng.IntN(224), byte(iter))
		if err := node.Pwritev(co, base+off, bdrv.IOVec{want[:split], want[split:n]}, 0); err != nil {
			return fmt.Errorf("coroutine %d: write %d bytes at %d: %w", id, n, off, err)
		}
		clear(got[:n])
		split = rng.Int64N(n + 1)
		deep(32+rng.IntN(224), byte(iter+1))
		if err := node.Preadv(co, base+off, bdrv.IOVec{got[:split], got[split:n]}, 0); err != nil {
			return fmt.Errorf("coroutine %d: read %d bytes at %d: %w", id, n, off, err)
		}
		if !bytes.Equal(got[:n], want[:n]) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			return fmt.Errorf("coroutine %d: %d bytes at %d (split %d) read back wrong from byte %d: %#x, want %#x", id, n, off, split, i, got[i], want[i])
		}
		ops.Add(1)
	}
	return nil
}

// TestZeroFallbackAcrossLoops writes zeroes from coroutines of two loops
// into a memfd (shmem: no FALLOC_FL_ZERO_RANGE). The first refusal makes
// the driver remember it while the other loop is reading that memory, so
// the flag must be safe across threads (the race detector checks that in
// make test); every range must read back as zeros either way.
func TestZeroFallbackAcrossLoops(t *testing.T) {
	const (
		perLoop = 8
		region  = 64 << 10
	)
	fd, err := unix.MemfdCreate("ublkimg-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 2*perLoop*region); err != nil {
		t.Fatal(err)
	}
	fill := bytes.Repeat([]byte{0xff}, 2*perLoop*region)
	if _, err := unix.Pwrite(fd, fill, 0); err != nil {
		t.Fatal(err)
	}
	loops := startLoops(t, 2)
	node := openFile(t, loops[0], fmt.Sprintf("/proc/self/fd/%d", fd))

	errc := make(chan error, 2*perLoop)
	for li, l := range loops {
		for c := range perLoop {
			off := int64(li*perLoop+c) * region
			l.Spawn(func(co *coroutine.Co) {
				for o := int64(0); o < region; o += 4096 {
					if err := node.PwriteZeroes(co, off+o, 4096, 0); err != nil {
						errc <- err
						return
					}
				}
				errc <- nil
			})
		}
	}
	for range 2 * perLoop {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, len(fill))
	if _, err := unix.Pread(fd, got, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range got {
		if c != 0 {
			t.Fatalf("byte %d is %#x after write-zeroes", i, c)
		}
	}
	if !node.Driver().(*driver).noZeroRange.Load() {
		t.Fatal("shmem accepted FALLOC_FL_ZERO_RANGE: the fallback was not exercised")
	}
}

// storageDirs are the directories the I/O tests run in, by the path they
// take: t.TempDir() on the disk's file system (the ring) and a directory on
// /dev/shm (tmpfs: the synchronous path, see fileSystem).
func storageDirs(t *testing.T) map[string]string {
	t.Helper()
	shm, err := os.MkdirTemp("/dev/shm", "ublkimg-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	return map[string]string{"ring": t.TempDir(), "inline": shm}
}

// TestManySegments moves vectors of more buffers than one request may
// carry (UIO_MAXIOV, 1024): the rest goes out after the short transfer.
// A read across the end of the file leaves zeros past it. Both paths: the
// ring, and synchronous calls on tmpfs.
func TestManySegments(t *testing.T) {
	for path, dir := range storageDirs(t) {
		t.Run(path, func(t *testing.T) { manySegments(t, filepath.Join(dir, "img"), path == "inline") })
	}
}

func manySegments(t *testing.T, path string, inline bool) {
	const segs, segLen = 2500, 3
	err := coroutine.Run(func(co *coroutine.Co) error {
		if err := bdrv.Create(co, "file", &bdrv.CreateRequest{Filename: path, Size: segs * segLen}); err != nil {
			return err
		}
		node, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "file"})
		if err != nil {
			return err
		}
		defer node.Close(co)
		if got := node.Driver().(*driver).inline; got != inline {
			return fmt.Errorf("inline is %v on %s, want %v", got, path, inline)
		}
		want := make([]byte, segs*segLen)
		for i := range want {
			want[i] = byte(i*7 + 1)
		}
		got := make([]byte, len(want))
		var wv, rv bdrv.IOVec
		for i := 0; i < len(want); i += segLen {
			wv = append(wv, want[i:i+segLen])
			rv = append(rv, got[i:i+segLen])
		}
		if err := node.Pwritev(co, 0, wv, 0); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if err := node.Preadv(co, 0, rv, 0); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%d segments read back wrong", segs)
		}
		tail := bytes.Repeat([]byte{0xaa}, 4096)
		if err := node.Preadv(co, int64(len(want))-100, bdrv.IOVec{tail}, 0); err != nil {
			return fmt.Errorf("read across the end: %w", err)
		}
		if !bytes.Equal(tail[:100], want[len(want)-100:]) || !bytes.Equal(tail[100:], make([]byte, 4096-100)) {
			return fmt.Errorf("read across the end: not the data then zeros")
		}
		if err := node.Flush(co); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestExtendingWrites grows a file the way an allocating qcow2 writer does:
// each 64 KiB cluster past the end is zeroed (fallocate growing the file),
// then written in 4 KiB pieces, 32 requests in flight on two loops. The
// zero-writes past the end run alone and the extending writes share the
// eof lock; every byte must read back as written, on both paths.
func TestExtendingWrites(t *testing.T) {
	const (
		cluster  = 64 << 10
		piece    = 4 << 10
		clusters = 48
		workers  = 16
	)
	for path, dir := range storageDirs(t) {
		t.Run(path, func(t *testing.T) {
			p := filepath.Join(dir, "img")
			loops := startLoops(t, 2)
			err := loops[0].Call(func(co *coroutine.Co) error {
				return bdrv.Create(co, "file", &bdrv.CreateRequest{Filename: p, Size: 0})
			})
			if err != nil {
				t.Fatal(err)
			}
			node := openFile(t, loops[0], p)
			// Pieces are handed out in order; the first piece of each
			// cluster zeroes the cluster first, the others wait for it.
			var mu sync.Mutex
			next := 0
			zeroed := make([]chan struct{}, clusters)
			for i := range zeroed {
				zeroed[i] = make(chan struct{})
			}
			errc := make(chan error, 2*workers)
			for _, l := range loops {
				for range workers {
					l.Spawn(func(co *coroutine.Co) {
						buf := bdrv.AlignedBuffer(piece, 4096)
						for {
							mu.Lock()
							i := next
							next++
							mu.Unlock()
							if i >= clusters*cluster/piece {
								errc <- nil
								return
							}
							c := i * piece / cluster
							if i*piece%cluster == 0 {
								if err := node.PwriteZeroes(co, int64(c*cluster), cluster, 0); err != nil {
									errc <- err
									return
								}
								close(zeroed[c])
							} else {
								for waiting := true; waiting; {
									select {
									case <-zeroed[c]:
										waiting = false
									default:
										co.Yield()
									}
								}
							}
							// The last piece of every other cluster stays zero.
							if c%2 == 1 && (i+1)*piece%cluster == 0 {
								continue
							}
							for j := range buf {
								buf[j] = byte(i + 1)
							}
							if err := node.Pwritev(co, int64(i*piece), bdrv.IOVec{buf}, 0); err != nil {
								errc <- err
								return
							}
						}
					})
				}
			}
			for range 2 * workers {
				if err := <-errc; err != nil {
					t.Fatal(err)
				}
			}
			got, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != clusters*cluster {
				t.Fatalf("file is %d bytes, want %d", len(got), clusters*cluster)
			}
			for i := range clusters * cluster / piece {
				want := byte(i + 1)
				if c := i * piece / cluster; c%2 == 1 && (i+1)*piece%cluster == 0 {
					want = 0
				}
				for j, b := range got[i*piece : (i+1)*piece] {
					if b != want {
						t.Fatalf("byte %d is %#x, want %#x", i*piece+j, b, want)
					}
				}
			}
		})
	}
}

// TestInlineWrites: on ext4, whose buffered writes io_uring always hands to
// an io-wq worker, the driver writes whole pages with pwritev on the loop's
// thread and everything else through the ring (see puntsBufferedWrites). Many
// coroutines on two loops write random ranges of one file, some whole
// pages, some not, some past its end, with vectors of up to three buffers;
// the file must then hold the last write to every byte (each coroutine has
// its own stripe of pages), read back by the kernel outside the driver.
// With O_DIRECT, and on tmpfs (all of whose I/O is inline), the driver
// does not choose this path.
func TestInlineWrites(t *testing.T) {
	const (
		nLoops  = 2
		perLoop = 8
		stripe  = 16 << 10
		iters   = 300
	)
	dir := t.TempDir()
	if fs := fileSystem(dirFD(t, dir)); fs != ext4Magic {
		t.Fatalf("%s is not on ext4 (statfs type %#x): set TMPDIR to a directory on ext4 to test the inline writes", dir, fs)
	}
	path := filepath.Join(dir, "img")
	loops := startLoops(t, nLoops)
	// The file starts short: the writes to the last stripes grow it.
	size := int64(nLoops * perLoop * stripe)
	if err := os.WriteFile(path, make([]byte, size/2), 0o644); err != nil {
		t.Fatal(err)
	}
	node := openFile(t, loops[0], path)
	d := node.Driver().(*driver)
	if !d.inlineWrites || d.inline {
		t.Fatalf("inlineWrites %v, inline %v on ext4, want true and false", d.inlineWrites, d.inline)
	}
	for _, c := range []struct {
		off  int64
		iov  bdrv.IOVec
		want bool
	}{
		{0, bdrv.IOVec{make([]byte, 4096)}, true},
		{8192, bdrv.IOVec{make([]byte, 100), make([]byte, 8092)}, true},
		{512, bdrv.IOVec{make([]byte, 4096)}, false},
		{4096, bdrv.IOVec{make([]byte, 512)}, false},
	} {
		if got := d.inlineWrite(c.off, c.iov); got != c.want {
			t.Errorf("inlineWrite(%d, %d bytes) = %v, want %v", c.off, c.iov.Len(), got, c.want)
		}
	}

	want := make([]byte, size)
	errc := make(chan error, nLoops*perLoop)
	var inline, ring atomic.Int64
	for li, l := range loops {
		for c := range perLoop {
			id := li*perLoop + c
			base := int64(id) * stripe
			l.Spawn(func(co *coroutine.Co) {
				rng := rand.New(rand.NewPCG(uint64(id), 2))
				buf := make([]byte, stripe)
				for iter := range iters {
					var off, n int64
					if rng.IntN(2) == 0 {
						off = rng.Int64N(stripe/4096) * 4096
						n = (1 + rng.Int64N((stripe-off)/4096)) * 4096
					} else {
						off = rng.Int64N(stripe)
						n = 1 + rng.Int64N(stripe-off)
					}
					for i := range buf[:n] {
						buf[i] = byte(id*37 + iter*11 + i)
					}
					a := rng.Int64N(n + 1)
					b := a + rng.Int64N(n-a+1)
					iov := bdrv.IOVec{buf[:a], buf[a:b], buf[b:n]}
					if d.inlineWrite(base+off, iov) {
						inline.Add(1)
					} else {
						ring.Add(1)
					}
					if err := node.Pwritev(co, base+off, iov, 0); err != nil {
						errc <- fmt.Errorf("coroutine %d: write %d bytes at %d: %w", id, n, base+off, err)
						return
					}
					copy(want[base+off:], buf[:n])
				}
				errc <- nil
			})
		}
	}
	for range nLoops * perLoop {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	err := loops[0].Call(func(co *coroutine.Co) error { return node.Flush(co) })
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d whole-page writes inline, %d through the ring", inline.Load(), ring.Load())
	if inline.Load() == 0 || ring.Load() == 0 {
		t.Fatal("the writes did not take both paths")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(got)) < size {
		t.Fatalf("file is %d bytes, want at least %d", len(got), size)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("byte %d is %#x, want %#x", i, got[i], want[i])
		}
	}

	// O_DIRECT writes and files in memory never take this path.
	for name, spec := range map[string]bdrv.Spec{
		"cache=none": {Filename: filepath.Join(dir, "direct"), Format: "file", Cache: bdrv.CacheNone},
		"tmpfs":      {Filename: filepath.Join(storageDirs(t)["inline"], "img"), Format: "file"},
	} {
		err := loops[1].Call(func(co *coroutine.Co) error {
			if err := bdrv.Create(co, "file", &bdrv.CreateRequest{Filename: spec.Filename, Size: 4096}); err != nil {
				return err
			}
			n, err := bdrv.Open(co, spec)
			if err != nil {
				return err
			}
			defer n.Close(co)
			if n.Driver().(*driver).inlineWrites {
				return errors.New("inlineWrites set")
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// dirFD opens dir for statfs, closed when the test ends.
func dirFD(t *testing.T, dir string) int {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}
