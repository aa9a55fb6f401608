package qcow2_test

import (
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// Benchmarks of the qcow2 driver through a bdrv node, page cache
// (cache=writeback), 4 KiB requests, 32 in flight on one loop: the shape of
// qemu-img bench -d 32 -s 4k. Compare with
//
//	qemu-img bench -f qcow2 -d 32 -s 4k -c N -t writeback [-w] IMG

const (
	benchDepth = 32
	benchReq   = 4096
	benchSize  = 256 << 20
)

// runDepth runs b.N requests, benchDepth at a time, each made by fn(i).
func runDepth(b *testing.B, n *bdrv.Node, co *coroutine.Co, fn func(co *coroutine.Co, i int, buf []byte) error) {
	var mu coroutine.Mutex
	var q coroutine.Queue
	next, done := 0, 0
	var firstErr error
	b.SetBytes(benchReq)
	b.ResetTimer()
	for w := 0; w < benchDepth; w++ {
		co.Loop().Go(func(wco *coroutine.Co) {
			buf := bdrv.AlignedBuffer(benchReq, 4096)
			for {
				i := next
				next++
				if i >= b.N || firstErr != nil {
					break
				}
				if err := fn(wco, i, buf); err != nil && firstErr == nil {
					firstErr = err
				}
			}
			mu.Lock(wco)
			done++
			q.RestartAll(wco)
			mu.Unlock(wco)
		})
	}
	mu.Lock(co)
	for done < benchDepth {
		q.Wait(co, &mu)
	}
	mu.Unlock(co)
	b.StopTimer()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
}

// benchImage creates an image with opts; with fill, every cluster is
// written first.
func benchImage(b *testing.B, opts string, fill bool) string {
	qemutest.Require(b, "qemu-img", "qemu-io")
	p := filepath.Join(b.TempDir(), "bench.qcow2")
	args := []string{}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	qimg(b, p, "256M", args...)
	if fill {
		qio(b, p, "write -P 0x5a 0 256M")
	}
	return p
}

func withBenchNode(b *testing.B, path string, fn func(co *coroutine.Co, n *bdrv.Node)) {
	withBenchSpec(b, bdrv.Spec{Filename: path, Format: "qcow2"}, false, fn)
}

// withBenchSpec opens spec and runs fn; with fua, every write of the
// node is FUA (cache=writethrough on the qcow2 node, the file below it
// keeping the page cache), as attach --recovery once made them.
func withBenchSpec(b *testing.B, spec bdrv.Spec, fua bool, fn func(co *coroutine.Co, n *bdrv.Node)) {
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, spec)
		if err != nil {
			return err
		}
		if fua {
			n.Cache = bdrv.CacheWritethrough
		}
		fn(co, n)
		return n.Close(co)
	})
	if err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRecoveryModes: BenchmarkRewrite and BenchmarkAllocatingWrite in
// the ways a server can keep acknowledged writes when it dies: not at all
// (off), metadata written back by the requests that changed it
// (x-crash-safe-metadata=on), every write FUA (writethrough).
func BenchmarkRecoveryModes(b *testing.B) {
	for _, mode := range []struct {
		name string
		opts bdrv.Options
		fua  bool
	}{
		{"off", nil, false},
		{"crash-safe", bdrv.Options{qcow2.OptCrashSafeMetadata: "on"}, false},
		{"writethrough", nil, true},
	} {
		for _, w := range []struct {
			name string
			fill bool
		}{{"rewrite", true}, {"alloc", false}} {
			b.Run(w.name+"/"+mode.name, func(b *testing.B) {
				p := benchImage(b, "", w.fill)
				withBenchSpec(b, bdrv.Spec{Filename: p, Format: "qcow2", Options: mode.opts}, mode.fua, func(co *coroutine.Co, n *bdrv.Node) {
					runDepth(b, n, co, func(co *coroutine.Co, i int, buf []byte) error {
						return n.Pwritev(co, int64(i*benchReq)%benchSize, bdrv.IOVec{buf}, 0)
					})
				})
			})
		}
	}
}

// BenchmarkReadAllocated: sequential 4 KiB reads of allocated data (the
// metadata lock and L2 lookup on every request, data from the page cache).
func BenchmarkReadAllocated(b *testing.B) {
	p := benchImage(b, "", true)
	withBenchNode(b, p, func(co *coroutine.Co, n *bdrv.Node) {
		runDepth(b, n, co, func(co *coroutine.Co, i int, buf []byte) error {
			return n.Preadv(co, int64(i*benchReq)%benchSize, bdrv.IOVec{buf}, 0)
		})
	})
}

// BenchmarkRewrite: sequential 4 KiB writes over allocated clusters (in
// place, no metadata change).
func BenchmarkRewrite(b *testing.B) {
	p := benchImage(b, "", true)
	withBenchNode(b, p, func(co *coroutine.Co, n *bdrv.Node) {
		runDepth(b, n, co, func(co *coroutine.Co, i int, buf []byte) error {
			return n.Pwritev(co, int64(i*benchReq)%benchSize, bdrv.IOVec{buf}, 0)
		})
	})
}

// BenchmarkAllocatingWrite: sequential 4 KiB writes into a fresh image:
// each 64 KiB cluster is allocated by its first write (copy-on-write of the
// rest of it, in-flight dependencies for the 15 writes that follow).
func BenchmarkAllocatingWrite(b *testing.B) {
	p := benchImage(b, "", false)
	withBenchNode(b, p, func(co *coroutine.Co, n *bdrv.Node) {
		runDepth(b, n, co, func(co *coroutine.Co, i int, buf []byte) error {
			off := int64(i*benchReq) % benchSize
			return n.Pwritev(co, off, bdrv.IOVec{buf}, 0)
		})
	})
}

// BenchmarkAllocatingWriteCluster: 64 KiB writes, one new cluster each.
func BenchmarkAllocatingWriteCluster(b *testing.B) {
	p := benchImage(b, "", false)
	withBenchNode(b, p, func(co *coroutine.Co, n *bdrv.Node) {
		big := make([][]byte, benchDepth)
		for i := range big {
			big[i] = bdrv.AlignedBuffer(64<<10, 4096)
		}
		runDepth(b, n, co, func(co *coroutine.Co, i int, buf []byte) error {
			off := int64(i) * 64 << 10 % benchSize
			return n.Pwritev(co, off, bdrv.IOVec{big[i%benchDepth]}, 0)
		})
	})
	b.SetBytes(64 << 10)
}

// BenchmarkReadCompressed: sequential 4 KiB reads of a compressed image
// (each cluster inflated once thanks to the cluster cache).
func BenchmarkReadCompressed(b *testing.B) {
	qemutest.Require(b, "qemu-img", "qemu-io")
	dir := b.TempDir()
	src := writeRaw(b, filepath.Join(dir, "src.raw"), pattern(1, 64<<20))
	p := filepath.Join(dir, "c.qcow2")
	sh(b, "qemu-img", "convert", "-c", "-O", "qcow2", src, p)
	withBenchNode(b, p, func(co *coroutine.Co, n *bdrv.Node) {
		runDepth(b, n, co, func(co *coroutine.Co, i int, buf []byte) error {
			return n.Preadv(co, int64(i*benchReq)%(64<<20), bdrv.IOVec{buf}, 0)
		})
	})
}
