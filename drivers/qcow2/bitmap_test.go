package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// rawBitmap encodes a bitmap directory entry.
func rawBitmap(b Bitmap, nameSize int) []byte {
	e := make([]byte, bitmapEntryFixed)
	be.PutUint64(e, b.TableOffset)
	be.PutUint32(e[8:], b.TableSize)
	be.PutUint32(e[12:], b.Flags)
	e[16], e[17] = b.Type, b.GranularityBits
	be.PutUint16(e[18:], uint16(nameSize))
	be.PutUint32(e[20:], uint32(len(b.ExtraData)))
	e = append(e, b.ExtraData...)
	e = append(e, b.Name...)
	for len(e)%8 != 0 {
		e = append(e, 0)
	}
	return e
}

func goodBitmaps() []Bitmap {
	return []Bitmap{
		{TableOffset: 0x50000, TableSize: 1, Flags: BitmapFlagAuto, Type: 1, GranularityBits: 16, Name: "bm0"},
		{TableOffset: 0x60000, TableSize: 4, Flags: BitmapFlagExtraDataCompatible, Type: 1, GranularityBits: 9,
			Name: "fine", ExtraData: []byte("xyz")},
	}
}

func bitmapDirOf(bms []Bitmap) ([]byte, BitmapsExt) {
	var d []byte
	for _, b := range bms {
		d = append(d, rawBitmap(b, len(b.Name))...)
	}
	return d, BitmapsExt{Count: uint32(len(bms)), DirectorySize: uint64(len(d)), DirectoryOffset: 0x40000}
}

func TestParseBitmapDirectory(t *testing.T) {
	d, ext := bitmapDirOf(goodBitmaps())
	// 1 GiB disk: 64 KiB granularity needs 2 KiB of bitmap (one cluster);
	// 512-byte granularity needs 256 KiB (4 clusters).
	bms, err := ParseBitmapDirectory(d, ext, 16, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if len(bms) != 2 || bms[0].Name != "bm0" || !bms[0].Auto() || bms[0].InUse() || bms[0].Granularity() != 65536 ||
		bms[1].Name != "fine" || string(bms[1].ExtraData) != "xyz" || !bms[1].Usable() {
		t.Errorf("got %+v", bms)
	}

	cases := []struct {
		name   string
		mutate func(b []Bitmap) []Bitmap
		edit   func(d []byte, ext *BitmapsExt) []byte
		size   uint64
		want   string
	}{
		{name: "type 2", mutate: func(b []Bitmap) []Bitmap { b[0].Type = 2; return b }, want: `bitmap "bm0": type 2 unsupported`},
		{name: "reserved flags", mutate: func(b []Bitmap) []Bitmap { b[1].Flags |= 8; return b }, want: "reserved flags 0x8 set"},
		{name: "granularity 8", mutate: func(b []Bitmap) []Bitmap { b[0].GranularityBits = 8; return b }, want: "granularity_bits 8 out of range 9..31"},
		{name: "granularity 32", mutate: func(b []Bitmap) []Bitmap { b[0].GranularityBits = 32; return b }, want: "granularity_bits 32"},
		{name: "table size 0", mutate: func(b []Bitmap) []Bitmap { b[0].TableSize = 0; return b }, want: "table size 0 out of range"},
		{name: "table size huge", mutate: func(b []Bitmap) []Bitmap { b[0].TableSize = 0xffffffff; return b }, want: "table size 4294967295 out of range"},
		{name: "table too much data", mutate: func(b []Bitmap) []Bitmap { b[0].TableSize = 8193; return b }, want: "exceed 536870912 bytes"},
		{name: "table unaligned", mutate: func(b []Bitmap) []Bitmap { b[0].TableOffset = 0x50200; return b }, want: "table offset 0x50200 invalid"},
		{name: "table at 0", mutate: func(b []Bitmap) []Bitmap { b[0].TableOffset = 0; return b }, want: "table offset 0x0 invalid"},
		{name: "table too small", mutate: func(b []Bitmap) []Bitmap { b[1].TableSize = 3; return b }, want: `bitmap "fine": table of 3 entries covers 805306368 bytes, disk is 1073741824`},
		{name: "duplicate name", mutate: func(b []Bitmap) []Bitmap { b[1].Name = "bm0"; return b }, want: `bitmap name "bm0" used twice`},
		{name: "empty name", mutate: func(b []Bitmap) []Bitmap { b[1].Name = ""; return b }, want: "name size 0 out of range 1..1023"},
		{name: "long name", mutate: func(b []Bitmap) []Bitmap { b[1].Name = strings.Repeat("x", 1024); return b }, want: "name size 1024"},
		{name: "padding", edit: func(d []byte, ext *BitmapsExt) []byte { d[31] = 1; return d }, want: `bitmap "bm0": padding not zero`},
		{name: "fewer entries", edit: func(d []byte, ext *BitmapsExt) []byte { ext.Count = 3; return d }, want: "directory holds 2 bitmaps, nb_bitmaps is 3"},
		{name: "more entries", edit: func(d []byte, ext *BitmapsExt) []byte { ext.Count = 1; return d }, want: "more entries than nb_bitmaps 1"},
		{name: "size cuts entry", edit: func(d []byte, ext *BitmapsExt) []byte { ext.DirectorySize -= 8; return d }, want: "exceeds the directory"},
		{name: "size cuts fixed part", edit: func(d []byte, ext *BitmapsExt) []byte { ext.DirectorySize = 40; return d }, want: "entry truncated"},
		{name: "short buffer", edit: func(d []byte, ext *BitmapsExt) []byte { return d[:10] }, want: "directory truncated"},
		{name: "zero count", edit: func(d []byte, ext *BitmapsExt) []byte { ext.Count = 0; return d }, want: "0 bitmaps"},
		{name: "extra size huge", edit: func(d []byte, ext *BitmapsExt) []byte { be.PutUint32(d[20:], 0xffffffff); return d }, want: "exceeds the directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bms := goodBitmaps()
			if c.mutate != nil {
				bms = c.mutate(bms)
			}
			d, ext := bitmapDirOf(bms)
			if c.edit != nil {
				d = c.edit(d, &ext)
			}
			_, err := ParseBitmapDirectory(d, ext, 16, 1<<30)
			if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrCorrupt) {
				t.Errorf("got %v, want %q", err, c.want)
			}
		})
	}

	// An in-use bitmap may have a stale table size; extra data without the
	// compatible flag makes a bitmap unusable but not corrupt.
	bms = goodBitmaps()
	bms[1].TableSize = 1
	bms[1].Flags = BitmapFlagInUse
	d, ext = bitmapDirOf(bms)
	got, err := ParseBitmapDirectory(bytes.Clone(d), ext, 16, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if !got[1].InUse() || got[1].Usable() {
		t.Errorf("in-use bitmap: %+v", got[1])
	}
	if _, err := ParseBitmapDirectory(d, ext, 8, 1<<30); err == nil {
		t.Error("cluster_bits 8 accepted")
	}
}

// TestParseBitmapDirectoryMax parses the largest directory QEMU allows,
// 65535 entries, and finds a duplicate name at its very end: names are
// checked with a set (comparing every pair took over a minute).
func TestParseBitmapDirectoryMax(t *testing.T) {
	bms := make([]Bitmap, MaxBitmaps)
	for i := range bms {
		bms[i] = Bitmap{TableOffset: 0x50000, TableSize: 1, Type: 1, GranularityBits: 16, Name: fmt.Sprintf("bitmap-%05d", i)}
	}
	d, ext := bitmapDirOf(bms)
	start := time.Now()
	got, err := ParseBitmapDirectory(d, ext, 16, 1<<30)
	if err != nil || len(got) != MaxBitmaps {
		t.Fatalf("%d bitmaps, %v", len(got), err)
	}
	bms[len(bms)-1].Name = bms[0].Name
	d, ext = bitmapDirOf(bms)
	if _, err := ParseBitmapDirectory(d, ext, 16, 1<<30); err == nil || !strings.Contains(err.Error(), "used twice") {
		t.Fatalf("duplicate name: %v", err)
	}
	// Generous for the race detector on a loaded machine; the pairwise
	// comparison took over 60 s.
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("parsing two directories of %d bitmaps took %v", MaxBitmaps, d)
	}
}

// TestBitmapConstraints: QEMU 7.2's check_constraints_on_bitmap limits
// the bitmap's bytes (512 MiB), not the disk size shifted by the
// granularity: 512-byte granules cover up to 2 TiB.
func TestBitmapConstraints(t *testing.T) {
	img := &Image{cs: 64 << 10}
	for _, tc := range []struct {
		size uint64
		gb   uint8
		ok   bool
	}{
		{1 << 40, 9, true},
		{2 << 40, 9, true},
		{2<<40 + 1, 9, false},
		{4 << 40, 10, true},
		{4<<40 + 512, 10, false},
		{1 << 50, 31, true},
	} {
		if err := img.bitmapConstraints(tc.size, tc.gb, "b"); (err == nil) != tc.ok {
			t.Errorf("size %d, granularity bits %d: %v", tc.size, tc.gb, err)
		}
	}
}
