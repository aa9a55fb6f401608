package qcow2_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// op is one guest operation of a write stream.
type op struct {
	kind    byte // 'w' write, 'z' write zeroes, 'u' write zeroes with unmap, 'd' discard, 'c' compressed write
	off, n  int64
	pattern byte
}

// qemuCmd is the qemu-io command for the op.
func (o op) qemuCmd() string {
	switch o.kind {
	case 'w':
		return fmt.Sprintf("write -P %d %d %d", o.pattern, o.off, o.n)
	case 'c':
		return fmt.Sprintf("write -c -P %d %d %d", o.pattern, o.off, o.n)
	case 'z':
		return fmt.Sprintf("write -z %d %d", o.off, o.n)
	case 'u':
		return fmt.Sprintf("write -z -u %d %d", o.off, o.n)
	case 'd':
		return fmt.Sprintf("discard %d %d", o.off, o.n)
	}
	panic("bad op")
}

// apply runs the op on a node.
func (o op) apply(co *coroutine.Co, n *bdrv.Node) error {
	switch o.kind {
	case 'w', 'c':
		buf := make([]byte, o.n)
		for i := range buf {
			buf[i] = o.pattern
		}
		var f bdrv.ReqFlags
		if o.kind == 'c' {
			f = bdrv.ReqWriteCompressed
		}
		return n.Pwritev(co, o.off, bdrv.IOVec{buf}, f)
	case 'z':
		return n.PwriteZeroes(co, o.off, o.n, 0)
	case 'u':
		return n.PwriteZeroes(co, o.off, o.n, bdrv.ReqMayUnmap)
	case 'd':
		return n.Pdiscard(co, o.off, o.n)
	}
	return fmt.Errorf("bad op %c", o.kind)
}

// genOps makes a reproducible stream of unaligned operations over size
// bytes, mostly writes, crossing cluster boundaries. kinds lists the
// operation kinds to draw from besides plain writes.
func genOps(seed uint64, size int64, count int, kinds string, cs int64) []op {
	r := rand.New(rand.NewPCG(seed, 99))
	ops := make([]op, 0, count)
	// QEMU only writes compressed clusters into clusters never written
	// before, so compressed writes go to untouched clusters.
	touched := map[int64]bool{}
	for i := 0; i < count; i++ {
		o := op{kind: 'w', pattern: byte(1 + r.IntN(250))}
		if kinds != "" && r.IntN(5) == 0 {
			o.kind = kinds[r.IntN(len(kinds))]
		}
		if o.kind == 'c' {
			o.off = -1
			for try := 0; try < 20; try++ {
				c := r.Int64N(size / cs)
				if !touched[c] {
					o.off, o.n = c*cs, cs
					break
				}
			}
			if o.off < 0 {
				o.kind = 'w'
			}
		}
		switch o.kind {
		case 'c':
		case 'd', 'u', 'z':
			// Cluster-sized and unaligned ones alike.
			o.off = r.Int64N(size)
			if r.IntN(2) == 0 {
				o.off = o.off / cs * cs
			}
			o.n = min(1+r.Int64N(3*cs), size-o.off)
		default:
			switch r.IntN(4) {
			case 0: // tiny
				o.n = 1 + r.Int64N(700)
			case 1: // around a cluster
				o.n = cs - 100 + r.Int64N(200)
			case 2: // several clusters
				o.n = 1 + r.Int64N(5*cs)
			default:
				o.n = 1 + r.Int64N(64<<10)
			}
			o.off = r.Int64N(size - min(o.n, size-1))
			o.n = min(o.n, size-o.off)
		}
		for c := o.off / cs; c <= (o.off+o.n-1)/cs; c++ {
			touched[c] = true
		}
		ops = append(ops, o)
	}
	return ops
}

// streamCase is an image configuration for the write stream tests.
type streamCase struct {
	name  string
	setup func(t *testing.T, dir string) string // creates the image, returns its path
	kinds string
	cs    int64
	size  int64
	opts  bdrv.Options // open options for ublkimg's side
}

func plainImage(opts string, size string) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		args := []string{}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		return qimg(t, filepath.Join(dir, "img.qcow2"), size, args...)
	}
}

func streamCases() []streamCase {
	return []streamCase{
		{"fresh_v3", plainImage("", "8M"), "zud", 64 << 10, 8 << 20, nil},
		{"fresh_v2", plainImage("compat=0.10", "8M"), "zud", 64 << 10, 8 << 20, nil},
		{"cluster512", plainImage("cluster_size=512", "2M"), "zud", 512, 2 << 20, nil},
		{"cluster4k_refcount1", plainImage("cluster_size=4k,refcount_bits=1", "4M"), "zud", 4 << 10, 4 << 20, nil},
		{"cluster2M", plainImage("cluster_size=2M", "16M"), "zud", 2 << 20, 16 << 20, nil},
		{"refcount64", plainImage("refcount_bits=64,cluster_size=1k", "2M"), "zud", 1 << 10, 2 << 20, nil},
		{"extl2", plainImage("extended_l2=on", "8M"), "zud", 64 << 10, 8 << 20, nil},
		// Two 4 KiB L2 slices and four refcount blocks in cache: every
		// request evicts, and writes back in dependency order.
		{"tiny_cache", plainImage("cluster_size=4k", "8M"), "zud", 4 << 10, 8 << 20,
			bdrv.Options{"l2-cache-size": "8k", "l2-cache-entry-size": "4k", "refcount-cache-size": "1"}},
		{"slices_extl2", plainImage("extended_l2=on", "8M"), "zud", 64 << 10, 8 << 20,
			bdrv.Options{"l2-cache-entry-size": "1k"}},
		// 64-bit refcounts in 512-byte clusters: a refcount block covers
		// 32 KiB and the first refcount table 2 MiB, so the writes grow
		// both again and again.
		{"reftable_growth", plainImage("cluster_size=512,refcount_bits=64", "8M"), "zud", 512, 8 << 20, nil},
		{"extl2_16k", plainImage("extended_l2=on,cluster_size=16k", "4M"), "zud", 16 << 10, 4 << 20, nil},
		{"lazy", plainImage("lazy_refcounts=on", "8M"), "zud", 64 << 10, 8 << 20, nil},
		{"prealloc_metadata", plainImage("preallocation=metadata", "8M"), "zud", 64 << 10, 8 << 20, nil},
		{"zstd", plainImage("compression_type=zstd", "8M"), "zudc", 64 << 10, 8 << 20, nil},
		{"compressed_writes", plainImage("", "8M"), "zudc", 64 << 10, 8 << 20, nil},
		{"backed", func(t *testing.T, dir string) string {
			writeRaw(t, filepath.Join(dir, "base.raw"), pattern(5, 6<<20+100))
			mid := qimg(t, filepath.Join(dir, "mid.qcow2"), "8M", "-b", "base.raw", "-F", "raw")
			qio(t, mid, "write -P 0x21 64k 64k", "write -c -P 0x23 2m 128k", "write -z 3m 64k")
			return qimg(t, filepath.Join(dir, "img.qcow2"), "8M", "-b", "mid.qcow2", "-F", "qcow2")
		}, "zud", 64 << 10, 8 << 20, nil},
		{"backed_v2", func(t *testing.T, dir string) string {
			writeRaw(t, filepath.Join(dir, "base.raw"), pattern(6, 8<<20))
			return qimg(t, filepath.Join(dir, "img.qcow2"), "8M", "-b", "base.raw", "-F", "raw", "-o", "compat=0.10")
		}, "zud", 64 << 10, 8 << 20, nil},
		{"backed_extl2", func(t *testing.T, dir string) string {
			writeRaw(t, filepath.Join(dir, "base.raw"), pattern(7, 5<<20))
			return qimg(t, filepath.Join(dir, "img.qcow2"), "8M", "-b", "base.raw", "-F", "raw", "-o", "extended_l2=on")
		}, "zud", 64 << 10, 8 << 20, nil},
		{"compressed_image", func(t *testing.T, dir string) string {
			src := writeRaw(t, filepath.Join(dir, "src.raw"), pattern(8, 8<<20))
			p := filepath.Join(dir, "img.qcow2")
			sh(t, "qemu-img", "convert", "-c", "-O", "qcow2", src, p)
			return p
		}, "zud", 64 << 10, 8 << 20, nil},
		{"snapshotted", func(t *testing.T, dir string) string {
			p := qimg(t, filepath.Join(dir, "img.qcow2"), "8M")
			qio(t, p, "write -P 1 0 3M", "write -c -P 2 4M 256k")
			sh(t, "qemu-img", "snapshot", "-c", "snap", p)
			return p
		}, "zud", 64 << 10, 8 << 20, nil},
		{"data_file", func(t *testing.T, dir string) string {
			return qimg(t, filepath.Join(dir, "img.qcow2"), "8M", "-o", "data_file="+filepath.Join(dir, "img.data"))
		}, "zud", 64 << 10, 8 << 20, nil},
		{"data_file_raw", func(t *testing.T, dir string) string {
			return qimg(t, filepath.Join(dir, "img.qcow2"), "8M", "-o", "data_file="+filepath.Join(dir, "img.data")+",data_file_raw=on")
		}, "zud", 64 << 10, 8 << 20, nil},
	}
}

// TestWriteStreams applies the same unaligned operation streams to an image
// with ublkimg and to a copy with qemu-io; both must pass qemu-img check and
// hold the same content, which must also match an in-memory model.
func TestWriteStreams(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for i, c := range streamCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dirA, dirB := t.TempDir(), t.TempDir()
			a := c.setup(t, dirA)
			b := c.setup(t, dirB)
			count := 120
			if testing.Short() || raceEnabled {
				count = 60
			}
			ops := genOps(uint64(i)+1, c.size, count, c.kinds, c.cs)
			model := rawOf(t, a)
			bdrvtest.WithNode(t, bdrv.Spec{Filename: a, Options: c.opts}, func(co *coroutine.Co, n *bdrv.Node) error {
				for k, o := range ops {
					if err := o.apply(co, n); err != nil {
						return fmt.Errorf("op %d %s: %w", k, o.qemuCmd(), err)
					}
					if k%37 == 36 {
						if err := n.Flush(co); err != nil {
							return err
						}
					}
				}
				return nil
			})
			// QEMU 7.2 keeps appending compressed data to a host
			// cluster after the compressed clusters in it were freed
			// and the cluster reused for normal data (refcount
			// errors in one qemu-io session); a new session after
			// each compressed write avoids that bug in the oracle.
			var batches [][]string
			var cmds []string
			for _, o := range ops {
				cmds = append(cmds, o.qemuCmd())
				if o.kind == 'c' {
					batches = append(batches, cmds)
					cmds = nil
				}
			}
			batches = append(batches, cmds)
			qcheck(t, a, false)
			gotA := rawOf(t, a)
			if strings.HasSuffix(c.name, "data_file_raw") {
				// The raw data file must read as the guest does.
				raw, err := os.ReadFile(filepath.Join(dirA, "img.data"))
				if err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(raw[:min(len(raw), len(gotA))], gotA[:min(len(raw), len(gotA))]); i >= 0 {
					t.Fatalf("raw data file differs from the guest view at %#x", i)
				}
			}
			applyModel(model, ops, c.cs, strings.Contains(c.name, "backed_v2"))
			if i := firstDiff(gotA, model); i >= 0 {
				t.Fatalf("image differs from the model at %#x: %#x, want %#x", i, gotA[i], model[i])
			}
			for _, cmds := range batches {
				if len(cmds) > 0 {
					qio(t, b, cmds...)
				}
			}
			qcheck(t, b, false)
			if i := firstDiff(gotA, rawOf(t, b)); i >= 0 {
				t.Fatalf("ublkimg and qemu-io images differ at %#x", i)
			}
			checkReads(t, a, nil)
		})
	}
}

// applyModel applies ops to a byte model. A discard makes the whole clusters
// it covers read as zeros, except in version 2 images with a backing file,
// where it does nothing (QEMU's iotest 290).
func applyModel(m []byte, ops []op, cs int64, discardNoop bool) {
	for _, o := range ops {
		switch o.kind {
		case 'w', 'c':
			for i := o.off; i < o.off+o.n; i++ {
				m[i] = o.pattern
			}
		case 'z', 'u':
			clear(m[o.off : o.off+o.n])
		case 'd':
			if discardNoop {
				continue
			}
			start, end := (o.off+cs-1)/cs*cs, (o.off+o.n)/cs*cs
			if start < end {
				clear(m[start:end])
			}
		}
	}
}

// TestConcurrentWrites writes interleaved, unaligned, non-overlapping
// chunks from several loops at once, so that neighbouring requests share
// clusters and in-flight allocations depend on each other.
func TestConcurrentWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, opts := range []string{"", "extended_l2=on", "cluster_size=4k", "compat=0.10"} {
		t.Run("opts="+opts, func(t *testing.T) {
			dir := t.TempDir()
			writeRaw(t, filepath.Join(dir, "base.raw"), pattern(11, 4<<20))
			args := []string{"-b", "base.raw", "-F", "raw"}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			p := qimg(t, filepath.Join(dir, "img.qcow2"), "4M", args...)
			model := rawOf(t, p)
			const loops, perLoop, chunk = 3, 4, 3001
			var node *bdrv.Node
			err := coroutine.Run(func(co *coroutine.Co) error {
				var err error
				node, err = bdrv.Open(co, bdrv.Spec{Filename: p})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			nchunks := int64(len(model)) / chunk
			onLoops(t, loops, perLoop, func(co *coroutine.Co, worker int) error {
				// Worker k writes chunks k, k+W, k+2W, ... in a
				// shuffled order.
				r := rand.New(rand.NewPCG(uint64(worker), 1))
				var mine []int64
				for c := int64(worker); c < nchunks; c += loops * perLoop {
					mine = append(mine, c)
				}
				r.Shuffle(len(mine), func(i, j int) { mine[i], mine[j] = mine[j], mine[i] })
				for _, c := range mine {
					buf := make([]byte, chunk)
					for i := range buf {
						buf[i] = byte(c*7 + int64(i)%13)
					}
					if err := node.Pwritev(co, c*chunk, bdrv.IOVec{buf}, 0); err != nil {
						return err
					}
				}
				return nil
			})
			if err := coroutine.Run(func(co *coroutine.Co) error { return node.Close(co) }); err != nil {
				t.Fatal(err)
			}
			for c := int64(0); c < nchunks; c++ {
				for i := int64(0); i < chunk; i++ {
					model[c*chunk+i] = byte(c*7 + i%13)
				}
			}
			qcheck(t, p, false)
			if i := firstDiff(rawOf(t, p), model); i >= 0 {
				t.Fatalf("content differs at %#x", i)
			}
		})
	}
}
