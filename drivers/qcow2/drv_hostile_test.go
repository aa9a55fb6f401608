package qcow2_test

import (
	"encoding/binary"
	"errors"
	"os"
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

// l2Of returns the offset of the first L2 table of an image.
func l2Of(t testing.TB, path string) uint64 {
	t.Helper()
	h := headerOf(t, path)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[h.L1TableOffset:]) & qcow2.L1OffsetMask
}

func poke64(t testing.TB, path string, off uint64, v uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], int64(off)); err != nil {
		t.Fatal(err)
	}
}

// TestOverlapMarksCorrupt points a writable (COPIED) L2 entry at the L1
// table: the write must be refused with EIO and a CorruptError, the corrupt
// bit set, later requests refused, and the metadata left intact.
func TestOverlapMarksCorrupt(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := qimg(t, filepath.Join(t.TempDir(), "o.qcow2"), "4M")
	qio(t, p, "write -P 1 0 64k")
	h := headerOf(t, p)
	poke64(t, p, l2Of(t, p), qcow2.OflagCopied|h.L1TableOffset)
	before, _ := os.ReadFile(p)
	bdrvtest.WithCorruptNode(t, bdrv.Spec{Filename: p}, func(co *coroutine.Co, n *bdrv.Node) error {
		err := n.Pwritev(co, 0, bdrv.IOVec{make([]byte, 4096)}, 0)
		var ce *qcow2.CorruptError
		if !errors.Is(err, unix.EIO) || !errors.As(err, &ce) || !strings.Contains(err.Error(), "L1") {
			t.Errorf("write over the L1 table: %v", err)
		}
		if err := n.Preadv(co, 65536, bdrv.IOVec{make([]byte, 512)}, 0); !errors.Is(err, unix.EIO) {
			t.Errorf("read after corruption: %v", err)
		}
		return nil
	})
	after, _ := os.ReadFile(p)
	if h2 := headerOf(t, p); !h2.Corrupt() {
		t.Error("corrupt bit not set")
	}
	// Only the header's feature word may have changed.
	copy(after[72:80], before[72:80])
	if i := firstDiff(after, before); i >= 0 {
		t.Errorf("image changed at %#x", i)
	}
	if err := openErr(bdrv.Spec{Filename: p}); err == nil {
		t.Error("read-write open of the now corrupt image succeeded")
	}
}

// TestHostileWrites feeds writes to images with broken metadata: errors,
// never panics, never writes outside the image.
func TestHostileWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	base := qimg(t, filepath.Join(t.TempDir(), "b.qcow2"), "4M")
	qio(t, base, "write -P 1 0 128k")
	h := headerOf(t, base)
	l2 := l2Of(t, base)
	cases := []struct {
		name     string
		off, val uint64
	}{
		{"l2_unaligned", l2, qcow2.OflagCopied | 0x50100},
		{"l2_beyond_eof", l2, qcow2.OflagCopied | 0x10000000000},
		{"l2_reserved", l2, qcow2.OflagCopied | 0x50000 | 2},
		{"l1_unaligned", h.L1TableOffset, qcow2.OflagCopied | l2 | 0x100},
		{"l1_beyond_eof", h.L1TableOffset, qcow2.OflagCopied | 0x100000000},
		{"l1_copied_no_table", h.L1TableOffset, qcow2.OflagCopied},
		{"reftable_unaligned", h.RefcountTableOffset, 0x20100},
		{"reftable_beyond_eof", h.RefcountTableOffset, 0x1000000000},
		{"refblock_zero", 0x20000, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "h.qcow2")
			b, _ := os.ReadFile(base)
			os.WriteFile(p, b, 0o644)
			poke64(t, p, c.off, c.val)
			size0 := int64(len(b))
			bdrvtest.WithCorruptNode(t, bdrv.Spec{Filename: p}, func(co *coroutine.Co, n *bdrv.Node) error {
				for _, off := range []int64{0, 100, 1 << 20, 4<<20 - 4096} {
					err := n.Pwritev(co, off, bdrv.IOVec{make([]byte, 70000)[:min(70000, 4<<20-off)]}, 0)
					if err != nil && !errors.Is(err, unix.EIO) {
						t.Errorf("write at %d: %v is not EIO", off, err)
					}
					n.Preadv(co, off, bdrv.IOVec{make([]byte, 4096)}, 0)
				}
				n.Flush(co)
				return nil
			})
			st, _ := os.Stat(p)
			if st.Size() > size0+8<<20 {
				t.Errorf("image grew from %d to %d bytes", size0, st.Size())
			}
		})
	}
}

// TestHeaderBitsOnWrite: a read-write open clears unknown autoclear bits
// (and the bitmaps bit, whose bitmaps it does not maintain), keeps unknown
// header extensions, and a lazy-refcount image is clean after close.
func TestHeaderBitsOnWrite(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := qimg(t, filepath.Join(dir, "a.qcow2"), "4M", "-o", "lazy_refcounts=on")
	b, _ := os.ReadFile(p)
	h, err := qcow2.ParseHeader(b[:65536], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	h.AutoclearFeatures |= 1 << 40
	h.Unknown = append(h.Unknown, qcow2.Extension{Type: 0x12345678, Data: []byte("keep me")})
	hb, err := h.Marshal(65536)
	if err != nil {
		t.Fatal(err)
	}
	copy(b, hb)
	os.WriteFile(p, b, 0o644)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: p}, func(co *coroutine.Co, n *bdrv.Node) error {
		if err := n.Pwritev(co, 0, bdrv.IOVec{make([]byte, 100000)}, 0); err != nil {
			return err
		}
		if hh := imageOf(t, n).Header(); !hh.Dirty() {
			t.Error("lazy refcounts: image not marked dirty while in use")
		}
		return nil
	})
	h2 := headerOf(t, p)
	if h2.AutoclearFeatures&(1<<40) != 0 {
		t.Error("unknown autoclear bit survived a read-write open")
	}
	if h2.Dirty() {
		t.Error("lazy refcounts: image still dirty after close")
	}
	if len(h2.Unknown) != 1 || string(h2.Unknown[0].Data) != "keep me" {
		t.Errorf("unknown extension lost: %+v", h2.Unknown)
	}
	qcheck(t, p, false)
}

// TestNoIODataFile: a metadata-only open (bdrv.Spec.NoIO, qemu-img info)
// of an image with an external data file does not open the data file
// (here a FIFO, whose open for reading would hang): guest I/O fails with
// EIO, flush and close succeed.
func TestNoIODataFile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "d.qcow2")
	data := filepath.Join(dir, "data.raw")
	qimg(t, p, "1M", "-o", "data_file="+data)
	os.Remove(data)
	if err := unix.Mkfifo(data, 0o644); err != nil {
		t.Fatal(err)
	}
	bdrvtest.WithNode(t, bdrv.Spec{Filename: p, ReadOnly: true, NoIO: true}, func(co *coroutine.Co, n *bdrv.Node) error {
		if err := n.Preadv(co, 0, bdrv.IOVec{make([]byte, 4096)}, 0); !errors.Is(err, unix.EIO) {
			t.Errorf("read: %v, want EIO", err)
		}
		if _, err := n.BlockStatus(co, true, 0, 4096); !errors.Is(err, unix.EIO) {
			t.Errorf("block status: %v, want EIO", err)
		}
		return n.Flush(co)
	})
	bdrvtest.WithNode(t, bdrv.Spec{Filename: p, NoIO: true}, func(co *coroutine.Co, n *bdrv.Node) error {
		if err := n.Pwritev(co, 0, bdrv.IOVec{make([]byte, 4096)}, 0); !errors.Is(err, unix.EIO) {
			t.Errorf("write: %v, want EIO", err)
		}
		return n.Flush(co)
	})
	if err := openErr(bdrv.Spec{Filename: p, ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "to be a regular file or a block device") {
		t.Errorf("open for I/O: %v", err)
	}
}
