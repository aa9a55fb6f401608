package qcow2_test

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/fuzzlimit"
)

// fuzzBase is a small image with every kind of metadata in use (made by
// this driver, so the fuzz target needs no qemu-img): 4 KiB clusters,
// L1 at 0x3000, L2 tables, two refcount blocks after the writes, zero and
// compressed clusters.
var fuzzBase = sync.OnceValues(func() ([]byte, error) {
	dir, err := os.MkdirTemp("", "qcow2fuzz")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	p := filepath.Join(dir, "base.qcow2")
	err = coroutine.Run(func(co *coroutine.Co) error {
		o, _ := bdrv.ParseOptionString("cluster_size=4k,refcount_bits=8")
		if err := bdrv.Create(co, "qcow2", &bdrv.CreateRequest{Filename: p, Size: 16 << 20, Options: o}); err != nil {
			return err
		}
		n, err := bdrv.Open(co, bdrv.Spec{Filename: p})
		if err != nil {
			return err
		}
		buf := pattern(3, 40<<10)
		for _, off := range []int64{0, 1 << 20, 9<<20 + 100, 15 << 20} {
			if err := n.Pwritev(co, off, bdrv.IOVec{buf}, 0); err != nil {
				return err
			}
		}
		if err := n.Pwritev(co, 5<<20, bdrv.IOVec{buf[:8192]}, bdrv.ReqWriteCompressed); err != nil {
			return err
		}
		if err := n.PwriteZeroes(co, 1<<20+4096, 8192, 0); err != nil {
			return err
		}
		return n.Close(co)
	})
	if err != nil {
		return nil, err
	}
	return os.ReadFile(p)
})

// FuzzImage patches 64-bit words of a valid image's metadata clusters and
// runs reads, writes, write-zeroes, discards and flushes on it, read-only
// and read-write. Hostile metadata must give errors: never a panic, a hang,
// a huge allocation, or a file grown far beyond the image.
func FuzzImage(f *testing.F) {
	base, err := fuzzBase()
	if err != nil {
		f.Fatal(err)
	}
	// Seeds: word index (8-byte units from the file start) and value.
	seed := func(word uint16, v uint64) {
		var b [10]byte
		binary.BigEndian.PutUint16(b[:], word)
		binary.BigEndian.PutUint64(b[2:], v)
		f.Add(b[:], uint8(0))
	}
	seed(0, 0)                                   // nothing
	seed(20/8, 0x0000001800000000)               // cluster_bits area
	seed(24/8, 1<<62)                            // size
	seed(32/8, 0xffffffff)                       // l1_size
	seed(40/8, 0x10000)                          // l1 offset
	seed(48/8, 0x3000)                           // reftable offset onto L1
	seed(56/8, 0x7fffffff)                       // reftable clusters
	seed(0x3000/8, 0x8000000000000000|0x1000)    // L1 entry onto the reftable
	seed(0x3000/8, 0x8000000000000000|0x3008)    // L1 entry unaligned
	seed(0x4000/8, 0x8000000000000000|0x3000)    // L2 entry onto L1
	seed(0x4000/8, 0x4000000000000000|0xfffffff) // compressed garbage
	seed(0x1000/8, 0x3000)                       // refblock onto L1
	seed(0x1000/8, 0)                            // refblock gone
	seed(0x2000/8, 0xffffffffffffffff)           // refcounts maxed
	f.Fuzz(func(t *testing.T, patch []byte, ops uint8) {
		fuzzlimit.Guard(t, fuzzlimit.Limits{})
		img := append([]byte(nil), base...)
		for len(patch) >= 10 {
			w := int(binary.BigEndian.Uint16(patch)) * 8
			if w+8 <= len(img) && w < 64<<10 {
				copy(img[w:], patch[2:10])
			}
			patch = patch[10:]
		}
		p := filepath.Join(t.TempDir(), "f.qcow2")
		if err := os.WriteFile(p, img, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, ro := range []bool{true, false} {
			coroutine.Run(func(co *coroutine.Co) error {
				n, err := bdrv.Open(co, bdrv.Spec{Filename: p, ReadOnly: ro, Options: bdrv.Options{"cache-size": "1M"}})
				if err != nil {
					return nil
				}
				size := n.Length()
				buf := make([]byte, 70000)
				for i, off := range []int64{0, 1 << 20, 5 << 20, 9 << 20, 15 << 20, size - 100} {
					if off < 0 || off >= size {
						continue
					}
					l := min(int64(len(buf)), size-off)
					n.Preadv(co, off, bdrv.IOVec{buf[:l]}, 0)
					n.BlockStatus(co, true, off, l)
					if ro {
						continue
					}
					switch (int(ops) + i) % 4 {
					case 0:
						n.Pwritev(co, off, bdrv.IOVec{buf[:l]}, 0)
					case 1:
						n.PwriteZeroes(co, off, l, bdrv.ReqMayUnmap)
					case 2:
						n.Pdiscard(co, off, l)
					case 3:
						n.Pwritev(co, off/4096*4096, bdrv.IOVec{buf[:min(4096, size-off/4096*4096)]}, bdrv.ReqWriteCompressed)
					}
				}
				n.Flush(co)
				n.Close(co)
				return nil
			})
		}
		if st, err := os.Stat(p); err == nil && st.Size() > int64(len(base))+64<<20 {
			t.Fatalf("image grew from %d to %d bytes", len(base), st.Size())
		}
	})
}
