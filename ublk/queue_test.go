package ublk

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/qcow2"
	"ublkimg/ublk/internal/uapi"
)

// TestHandleAllocs: the requests a device serves most, 4 KiB READs and
// WRITEs of allocated data whose metadata is cached, allocate nothing in
// the queue and the layers below it (bdrv, the format, the file), as the
// per-tag buffer and vector promise: on raw and qcow2 images, with
// cache=none (attach's default) and writeback. The ublk commands around
// them need the kernel and are left out.
func TestHandleAllocs(t *testing.T) {
	// t.TempDir is on a disk file system (the ring), /dev/shm on tmpfs
	// (the file driver's synchronous path).
	shm, err := os.MkdirTemp("/dev/shm", "ublkimg-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(shm)
	dirs := map[string]string{"disk": t.TempDir(), "tmpfs": shm}
	for _, storage := range []string{"disk", "tmpfs"} {
		for _, format := range []string{"raw", "qcow2"} {
			for _, cache := range []bdrv.CacheMode{bdrv.CacheNone, bdrv.CacheWriteback} {
				t.Run(storage+"/"+format+"/"+cache.String(), func(t *testing.T) {
					path := filepath.Join(dirs[storage], format+"-"+cache.String())
					err := coroutine.Run(func(co *coroutine.Co) error {
						if err := bdrv.Create(co, format, &bdrv.CreateRequest{Filename: path, Size: 16 << 20}); err != nil {
							return err
						}
						node, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: format, Cache: cache})
						if err != nil {
							return err
						}
						err = handleAllocs(t, co, node)
						if cerr := node.Close(co); err == nil {
							err = cerr
						}
						return err
					})
					if err != nil {
						t.Fatal(err)
					}
				})
			}
		}
	}
}

// handleAllocs fills the first MiB of node, then measures the allocations
// of a tag's 4 KiB READs and WRITEs across it (testing.AllocsPerRun inside
// the coroutine, so only the requests count), and checks what they moved.
func handleAllocs(t *testing.T, co *coroutine.Co, node *bdrv.Node) error {
	const data, bs = 1 << 20, 4096
	want := bdrv.AlignedBuffer(data, 4096)
	for i := range want {
		want[i] = byte(i/bs + 1)
	}
	if err := node.Pwritev(co, 0, bdrv.IOVec{want}, 0); err != nil {
		return err
	}
	cfg, err := Config{Logf: t.Logf}.withDefaults()
	if err != nil {
		return err
	}
	q := &queue{dev: &Device{cfg: cfg, node: node}}
	tg := &tag{buf: bdrv.AlignedBuffer(cfg.MaxIOBytes, 4096), iov: bdrv.IOVec{nil}}
	for _, op := range []uapi.IOOp{uapi.IOOpRead, uapi.IOOpWrite} {
		desc := uapi.IODesc{OpFlags: uint32(op), NrSectors: bs >> 9}
		var off int64
		var bad int32
		request := func() {
			off = (off + bs) % data
			desc.StartSector = uint64(off >> 9)
			if op == uapi.IOOpWrite {
				// What the kernel would have copied in: the data
				// already there, so that reads stay checkable.
				copy(tg.buf, want[off:off+bs])
			}
			if res := q.handle(co, tg, &desc); res != bs && bad == 0 {
				bad = res
			}
		}
		request() // warms the metadata caches
		allocs := testing.AllocsPerRun(200, request)
		if bad != 0 {
			return fmt.Errorf("%v at %d: result %d, want %d", op, off, bad, bs)
		}
		if op == uapi.IOOpRead && !bytes.Equal(tg.buf[:bs], want[off:off+bs]) {
			return fmt.Errorf("READ at %d: the tag's buffer differs from the image", off)
		}
		if allocs != 0 {
			t.Errorf("%v allocations per %v, want 0", allocs, op)
		}
	}
	return nil
}
