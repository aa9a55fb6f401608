package ublk

// Tests named TestGuest run where the kernel has ublk: inside the test VM,
// where TestVMGuestTests runs this package's test binary. Elsewhere they
// skip (requireUblk).

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// requireUblk skips t unless /dev/ublk-control exists and ADD_DEV is
// permitted.
func requireUblk(t *testing.T) {
	t.Helper()
	c, err := OpenCtrl()
	if errors.Is(err, ErrNoDriver) || errors.Is(err, ErrPermission) {
		t.Skipf("no ublk here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// kernelAtLeast reports whether the running kernel's release is at least
// major.minor: features the kernel has had since then must work.
func kernelAtLeast(t *testing.T, major, minor int) bool {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	release := unix.ByteSliceToString(u.Release[:])
	var ma, mi int
	if _, err := fmt.Sscanf(release, "%d.%d", &ma, &mi); err != nil {
		t.Fatalf("kernel release %q: %v", release, err)
	}
	return ma > major || ma == major && mi >= minor
}

// leakCheck fails t if goroutines or file descriptors outlive the test
// (wireguard-go's goroutineLeakCheck, plus open files).
func leakCheck(t *testing.T) {
	t.Helper()
	goroutines, fds := runtime.NumGoroutine(), openFDs()
	t.Cleanup(func() {
		// Goroutines that end and descriptors the runtime closes
		// signal nothing: poll, with a deadline.
		deadline := time.Now().Add(5 * time.Second)
		for {
			g, f := runtime.NumGoroutine(), openFDs()
			if g <= goroutines && f <= fds {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("leak: %d goroutines (was %d), %d fds (was %d)\n%s", g, goroutines, f, fds, buf)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

func openFDs() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	return len(ents)
}

// rawImage makes a raw image of size bytes with random content and opens
// it.
func rawImage(t *testing.T, size int64, cache bdrv.CacheMode) (string, []byte, *bdrv.Node) {
	t.Helper()
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(size), 1))
	for i := 0; i < len(data); i += 8 {
		binary.LittleEndian.PutUint64(data[i:], r.Uint64())
	}
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data, open(t, bdrv.Spec{Filename: path, Format: "raw", Cache: cache})
}

func open(t *testing.T, spec bdrv.Spec) *bdrv.Node {
	t.Helper()
	var n *bdrv.Node
	err := coroutine.Run(func(co *coroutine.Co) (err error) {
		n, err = bdrv.Open(co, spec)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// checkGone fails t unless device id no longer exists.
func checkGone(t *testing.T, id int) {
	t.Helper()
	c, err := OpenCtrl()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.DevInfo(id); !errors.Is(err, ErrNoDevice) {
		t.Errorf("device %d still exists after Close (%v)", id, err)
	}
	if _, err := os.Stat(fmt.Sprintf("/dev/ublkc%d", id)); err == nil {
		t.Errorf("/dev/ublkc%d still exists", id)
	}
}

// blockIO reads and writes the block device directly (O_DIRECT).
func blockIO(t *testing.T, path string, write bool, off int64, buf []byte) error {
	t.Helper()
	flags := unix.O_RDONLY | unix.O_DIRECT
	if write {
		flags = unix.O_RDWR | unix.O_DIRECT
	}
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if write {
		_, err = unix.Pwrite(fd, buf, off)
		if err == nil {
			err = unix.Fsync(fd)
		}
	} else {
		_, err = unix.Pread(fd, buf, off)
	}
	return err
}

// alignedBuf returns page-aligned memory for O_DIRECT.
func alignedBuf(n int) []byte { return bdrv.AlignedBuffer(n, 4096) }

func TestGuestReadWrite(t *testing.T) {
	requireUblk(t)
	for _, uc := range []bool{false, true} {
		t.Run(fmt.Sprintf("usercopy=%v", uc), func(t *testing.T) {
			leakCheck(t)
			path, data, node := rawImage(t, 8<<20, bdrv.CacheNone)
			d, err := Start(Config{ID: -1, Queues: 2, Depth: 16, UserCopy: uc}, node)
			if errors.Is(err, ErrNotSupported) && !kernelAtLeast(t, 6, 4) {
				t.Skipf("%v: the kernel is older than 6.4", err)
			}
			if err != nil {
				t.Fatal(err)
			}
			id := d.ID()
			buf := alignedBuf(1 << 20)
			if err := blockIO(t, d.Path(), false, 3<<20, buf); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, data[3<<20:4<<20]) {
				t.Error("read through the device differs from the image")
			}
			for i := range buf {
				buf[i] = byte(i * 7)
			}
			if err := blockIO(t, d.Path(), true, 5<<20+4096, buf[:64<<10]); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			checkGone(t, id)
			got, _ := os.ReadFile(path)
			if !bytes.Equal(got[5<<20+4096:5<<20+4096+64<<10], buf[:64<<10]) {
				t.Error("the write did not reach the image")
			}
			if d.Close() != nil {
				t.Error("second Close failed")
			}
		})
	}
}

// TestGuestStartFailures fails Start at every point after ADD_DEV and
// checks that nothing is left: no device, no goroutine, no fd, image
// closed (its lock released).
func TestGuestStartFailures(t *testing.T) {
	requireUblk(t)
	for _, point := range []string{"added", "chardev", "queues", "fetched"} {
		t.Run(point, func(t *testing.T) {
			leakCheck(t)
			path, _, node := rawImage(t, 4<<20, bdrv.CacheWriteback)
			var id int
			testHook = func(p string) error {
				if p == point {
					return fmt.Errorf("injected at %s", p)
				}
				return nil
			}
			defer func() { testHook = nil }()
			// Learn the id from the kernel: the lowest free one.
			c, _ := OpenCtrl()
			for id = 0; ; id++ {
				if _, err := c.DevInfo(id); errors.Is(err, ErrNoDevice) {
					break
				}
			}
			c.Close()
			_, err := Start(Config{ID: -1, Queues: 2, Depth: 8}, node)
			if err == nil || !strings.Contains(err.Error(), "injected") {
				t.Fatalf("Start: %v", err)
			}
			checkGone(t, id)
			// The image was closed: a writer can lock it again.
			n := open(t, bdrv.Spec{Filename: path, Format: "raw"})
			coroutine.Run(func(co *coroutine.Co) error { return n.Close(co) })
		})
	}
}

// TestGuestStoppedFromOutside stops the device with another control
// handle: Done closes and Close still cleans up.
func TestGuestStoppedFromOutside(t *testing.T) {
	requireUblk(t)
	leakCheck(t)
	_, _, node := rawImage(t, 4<<20, bdrv.CacheWriteback)
	d, err := Start(Config{ID: -1, Depth: 4}, node)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := OpenCtrl()
	if err := c.StopDev(d.ID()); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case <-d.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after STOP_DEV from outside")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	checkGone(t, d.ID())
}

// TestGuestServeContext: Serve returns when its context ends.
func TestGuestServeContext(t *testing.T) {
	requireUblk(t)
	leakCheck(t)
	node := open(t, bdrv.Spec{Filename: "null-co://", Format: "null-co"})
	ctx, cancel := context.WithCancel(context.Background())
	var id int
	err := Serve(ctx, Config{ID: -1}, node, func(d *Device) error {
		id = d.ID()
		buf := alignedBuf(4096)
		if err := blockIO(t, d.Path(), false, 0, buf); err != nil {
			return err
		}
		cancel()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	checkGone(t, id)
}

// TestGuestIOErrors: an image on a full file system fails writes with
// ENOSPC, and the error reaches the writer.
func TestGuestIOErrors(t *testing.T) {
	requireUblk(t)
	leakCheck(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	defer unix.Unmount(dir, 0)
	path := filepath.Join(dir, "sparse.raw")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(path, 64<<20)
	node := open(t, bdrv.Spec{Filename: path, Format: "raw", Cache: bdrv.CacheNone})
	d, err := Start(Config{ID: -1, Depth: 4}, node)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(2 << 20)
	err = blockIO(t, d.Path(), true, 0, buf)
	if !errors.Is(err, unix.ENOSPC) && !errors.Is(err, unix.EIO) {
		t.Errorf("write to a full image: %v, want ENOSPC or EIO", err)
	}
	if d.IOErrors() == 0 {
		t.Error("no I/O error counted")
	}
	d.Close()
}
