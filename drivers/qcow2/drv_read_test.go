package qcow2_test

import (
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// writeRaw writes a file with a data pattern (for convert sources and raw
// backing files).
func writeRaw(t testing.TB, path string, data []byte) string {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// mixedWrites are qemu-io commands touching every cluster type of a small
// image: data, unaligned data across clusters, zero-alloc, zero-plain.
var mixedWrites = []string{
	"write -P 0xab 0 64k",
	"write -P 0x11 100000 70000",
	"write -P 0x22 1m 256k",
	"write -z 1088k 64k",    // zero flag, cluster kept (v3) or written (v2)
	"write -z -u 1216k 64k", // zero flag, cluster freed
	"write -P 0x33 3m 5",
	"write -P 0x44 4194000 304",
}

// TestReadQemuImages reads images qemu-img and qemu-io made, in every layout
// QEMU writes, and compares them with qemu-img convert -O raw.
func TestReadQemuImages(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	type tc struct {
		name string
		opts string
		size string
		cmds []string
	}
	cases := []tc{
		{"v3", "", "4M", mixedWrites},
		{"v2", "compat=0.10", "4M", mixedWrites},
		{"cluster512", "cluster_size=512", "4M", mixedWrites},
		{"cluster4k", "cluster_size=4k", "4M", mixedWrites},
		{"cluster2M", "cluster_size=2M", "8M", append(mixedWrites, "write -P 0x55 6m 1m")},
		{"refcount1", "refcount_bits=1", "4M", mixedWrites},
		{"refcount2", "refcount_bits=2", "4M", mixedWrites},
		{"refcount4", "refcount_bits=4", "4M", mixedWrites},
		{"refcount8", "refcount_bits=8", "4M", mixedWrites},
		{"refcount32", "refcount_bits=32", "4M", mixedWrites},
		{"refcount64", "refcount_bits=64,cluster_size=512", "4M", mixedWrites},
		{"extl2", "extended_l2=on", "4M", append(mixedWrites,
			"write -P 0x66 2m 2k", "write -P 0x67 2100k 3k", "write -z 2200k 6k", "write -z -u 2300k 2k")},
		{"extl2_32k", "extended_l2=on,cluster_size=32k", "4M", append(mixedWrites, "write -P 0x77 2m 1k")},
		{"compressed", "", "4M", append(mixedWrites, "write -c -P 0x88 2m 64k", "write -c -P 0x89 2112k 128k")},
		{"compressed_v2", "compat=0.10", "4M", []string{"write -c -P 0x88 0 64k", "write -P 1 64k 1k"}},
		{"compressed_zstd", "compression_type=zstd", "4M", append(mixedWrites, "write -c -P 0x88 2m 64k")},
		{"compressed_extl2", "extended_l2=on", "4M", []string{"write -c -P 0x88 0 128k", "write -P 2 1m 5k"}},
		{"compressed_512", "cluster_size=512", "1M", []string{"write -c -P 0x88 0 4k", "write -P 2 5000 700"}},
		{"lazy", "lazy_refcounts=on", "4M", mixedWrites},
		{"prealloc_metadata", "preallocation=metadata", "4M", mixedWrites},
		{"prealloc_falloc", "preallocation=falloc,cluster_size=4k", "4M", mixedWrites},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			p := filepath.Join(t.TempDir(), "img.qcow2")
			args := []string{}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			qimg(t, p, c.size, args...)
			qio(t, p, c.cmds...)
			checkReads(t, p, nil)
		})
	}
}

// TestReadConvertCompressed reads qemu-img convert -c output, deflate and
// zstd, including data that does not compress (stored uncompressed).
func TestReadConvertCompressed(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	data := pattern(1, 3<<20)
	copy(data[1<<20:], randomBytes(2, 256<<10)) // incompressible clusters
	src := writeRaw(t, filepath.Join(dir, "src.raw"), data)
	for _, ct := range []string{"zlib", "zstd"} {
		for _, cs := range []string{"64k", "4k", "2M"} {
			t.Run(ct+"_"+cs, func(t *testing.T) {
				p := filepath.Join(t.TempDir(), "c.qcow2")
				sh(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type="+ct+",cluster_size="+cs, src, p)
				checkReads(t, p, nil)
			})
		}
	}
}

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := seed*0x9e3779b97f4a7c15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

// TestReadBackingChains reads chains of qcow2 and raw images, with backing
// files shorter than their overlays, through several depths.
func TestReadBackingChains(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	writeRaw(t, filepath.Join(dir, "base.raw"), pattern(3, 1<<20+512))
	mid := qimg(t, filepath.Join(dir, "mid.qcow2"), "2M", "-b", "base.raw", "-F", "raw")
	qio(t, mid, "write -P 0x21 64k 64k", "write -P 0x22 1000k 100k", "write -z 300k 64k")
	mid2 := qimg(t, filepath.Join(dir, "mid2.qcow2"), "3M", "-b", "mid.qcow2", "-F", "qcow2", "-o", "compat=0.10")
	qio(t, mid2, "write -P 0x31 0 3k", "write -P 0x32 1900k 300k")
	top := qimg(t, filepath.Join(dir, "top.qcow2"), "4M", "-b", "mid2.qcow2", "-F", "qcow2", "-o", "extended_l2=on")
	qio(t, top, "write -P 0x41 70k 2k", "write -z 1m 4k", "write -P 0x42 3500k 10")
	for _, p := range []string{mid, mid2, top} {
		t.Run(filepath.Base(p), func(t *testing.T) { checkReads(t, p, nil) })
	}
	// A qcow2 chain with compressed and zero clusters at the bottom.
	cbase := qimg(t, filepath.Join(dir, "cbase.qcow2"), "1M")
	qio(t, cbase, "write -c -P 0x51 0 128k", "write -P 0x52 512k 64k")
	ctop := qimg(t, filepath.Join(dir, "ctop.qcow2"), "2M", "-b", "cbase.qcow2", "-F", "qcow2")
	qio(t, ctop, "write -P 0x61 10k 1k", "write -z 512k 64k")
	t.Run("compressed_base", func(t *testing.T) { checkReads(t, ctop, nil) })
}

// TestReadDataFile reads images with an external data file, raw and not.
func TestReadDataFile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, raw := range []string{"off", "on"} {
		t.Run("raw_"+raw, func(t *testing.T) {
			dir := t.TempDir()
			p := qimg(t, filepath.Join(dir, "d.qcow2"), "4M", "-o", "data_file="+filepath.Join(dir, "d.data")+",data_file_raw="+raw)
			qio(t, p, mixedWrites...)
			checkReads(t, p, nil)
			// Without the name in the header the option is needed.
			if raw == "off" {
				bdrvtest.WithNode(t, bdrv.Spec{Filename: p, ReadOnly: true, Options: bdrv.Options{qcow2.OptDataFile: filepath.Join(dir, "d.data")}},
					func(co *coroutine.Co, n *bdrv.Node) error { return nil })
			}
		})
	}
}

// TestReadSnapshots reads the active layer of an image with internal
// snapshots taken between writes (L2 tables and clusters shared).
func TestReadSnapshots(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := qimg(t, filepath.Join(t.TempDir(), "s.qcow2"), "4M")
	qio(t, p, "write -P 1 0 2M")
	sh(t, "qemu-img", "snapshot", "-c", "one", p)
	qio(t, p, "write -P 2 64k 64k", "write -z 1m 128k", "discard 1536k 64k")
	sh(t, "qemu-img", "snapshot", "-c", "two", p)
	qio(t, p, "write -P 3 100k 1")
	checkReads(t, p, nil)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: p, ReadOnly: true}, func(co *coroutine.Co, n *bdrv.Node) error {
		s := imageOf(t, n).Snapshots()
		if len(s) != 2 || s[0].Name != "one" || s[1].Name != "two" {
			t.Errorf("snapshots %+v", s)
		}
		return nil
	})
}

// pokeHeader sets bits in the 64-bit header field at off.
func pokeHeader(t testing.TB, path string, off int64, set uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint64(b[:], binary.BigEndian.Uint64(b[:])|set)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// TestOpenFeatureBits covers the header bits that restrict opening: dirty
// (lazy refcounts left unflushed), corrupt, unknown incompatible features.
func TestOpenFeatureBits(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()

	// A lazy-refcount image killed in the middle of writes stays dirty.
	dirty := qimg(t, filepath.Join(dir, "dirty.qcow2"), "4M", "-o", "lazy_refcounts=on")
	exec.Command("qemu-io", "-c", "write -P 7 0 1m", "-c", "sigraise 9", dirty).Run() // dies by SIGKILL
	if h := headerOf(t, dirty); !h.Dirty() {
		t.Fatalf("image not dirty after SIGKILL")
	}
	checkReads(t, dirty, nil)
	want := rawOf(t, dirty)
	// A read-write open repairs the refcounts first.
	bdrvtest.WithNode(t, bdrv.Spec{Filename: dirty}, func(co *coroutine.Co, n *bdrv.Node) error {
		return n.Pwritev(co, 2<<20, bdrv.IOVec{make([]byte, 4096)}, 0)
	})
	if h := headerOf(t, dirty); h.Dirty() {
		t.Error("image still dirty after a read-write open and close")
	}
	qcheck(t, dirty, false)
	if got := rawOf(t, dirty); firstDiff(got, want) >= 0 {
		t.Error("repair changed the content")
	}

	corrupt := qimg(t, filepath.Join(dir, "corrupt.qcow2"), "4M")
	qio(t, corrupt, "write -P 9 0 64k")
	pokeHeader(t, corrupt, 72, qcow2.IncompatCorrupt)
	checkReads(t, corrupt, nil)
	err := openErr(bdrv.Spec{Filename: corrupt})
	if err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("read-write open of a corrupt image: %v", err)
	}

	unknown := qimg(t, filepath.Join(dir, "unknown.qcow2"), "4M")
	pokeHeader(t, unknown, 72, 1<<12)
	err = openErr(bdrv.Spec{Filename: unknown, ReadOnly: true})
	var ue *qcow2.UnsupportedFeatureError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "Unsupported qcow2 feature") {
		t.Errorf("unknown incompatible bit: %v", err)
	}
}

// syscall-free header read for assertions.
func headerOf(t testing.TB, path string) *qcow2.Header {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ParseHeader(b[:min(len(b), 2<<20)], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestReadHostileL2 points an L2 entry at nonsense and expects an EIO error
// that names the problem, never a panic.
func TestReadHostileL2(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := qimg(t, filepath.Join(t.TempDir(), "h.qcow2"), "4M")
	qio(t, p, "write -P 1 0 64k")
	h := headerOf(t, p)
	b, _ := os.ReadFile(p)
	l2 := binary.BigEndian.Uint64(b[h.L1TableOffset:]) & qcow2.L1OffsetMask
	for _, bad := range []uint64{
		0x8000000000000000 | 0x123,                    // unaligned
		qcow2.OflagCompressed | 0x00ffffffffffff00,    // compressed far away
		0x8000000000000000 | 0x00fffffffffff0000,      // beyond 2^56 (masked) / EOF
		0x0000000000000002,                            // reserved bit
		qcow2.OflagCompressed | qcow2.OflagCopied | 7, // compressed with COPIED
	} {
		c := append([]byte(nil), b...)
		binary.BigEndian.PutUint64(c[l2:], bad)
		q := filepath.Join(t.TempDir(), "bad.qcow2")
		os.WriteFile(q, c, 0o644)
		bdrvtest.WithNode(t, bdrv.Spec{Filename: q, ReadOnly: true}, func(co *coroutine.Co, n *bdrv.Node) error {
			err := n.Preadv(co, 0, bdrv.IOVec{make([]byte, 4096)}, 0)
			if err == nil {
				if bad&qcow2.OflagCompressed == 0 && bad&qcow2.L2OffsetMask >= 1<<40 {
					return nil // plain data beyond EOF reads as zeros, like QEMU
				}
				t.Errorf("entry %#x: read succeeded", bad)
			} else if !errors.Is(err, unix.EIO) {
				t.Errorf("entry %#x: error %v is not EIO", bad, err)
			}
			return nil
		})
	}
}
