package qcow2

import (
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestGeometry(t *testing.T) {
	cases := []struct {
		g                                 Geometry
		cs, l2Entries, bytesPerL2, scSize uint64
		refblockEntries                   uint64
		l1For1G                           uint64
	}{
		{Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}, 65536, 8192, 512 << 20, 65536, 32768, 2},
		{Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, ExtendedL2: true}, 65536, 4096, 256 << 20, 2048, 32768, 4},
		{Geometry{ClusterBits: 9, RefcountOrder: 0, Version: 3}, 512, 64, 32 << 10, 512, 4096, 32768},
		{Geometry{ClusterBits: 9, RefcountOrder: 6, Version: 3}, 512, 64, 32 << 10, 512, 64, 32768},
		{Geometry{ClusterBits: 21, RefcountOrder: 4, Version: 3}, 2 << 20, 262144, 512 << 30, 2 << 20, 1 << 20, 1},
		{Geometry{ClusterBits: 14, RefcountOrder: 2, Version: 3, ExtendedL2: true}, 16384, 1024, 16 << 20, 512, 32768, 64},
	}
	for _, c := range cases {
		g := c.g
		if err := g.Validate(); err != nil {
			t.Fatalf("%+v: %v", g, err)
		}
		if g.ClusterSize() != c.cs || g.L2Entries() != c.l2Entries || g.BytesPerL2Table() != c.bytesPerL2 ||
			g.SubclusterSize() != c.scSize || g.RefblockEntries() != c.refblockEntries || g.L1EntriesFor(1<<30) != c.l1For1G {
			t.Errorf("%+v: cs %d l2 %d perL2 %d sc %d rb %d l1(1G) %d", g, g.ClusterSize(), g.L2Entries(),
				g.BytesPerL2Table(), g.SubclusterSize(), g.RefblockEntries(), g.L1EntriesFor(1<<30))
		}
		// Index arithmetic against the formulas of the specification.
		for _, off := range []uint64{0, 1, c.cs - 1, c.cs, 3*c.bytesPerL2 + 5*c.cs + 17, 1<<40 + 12345} {
			if g.L1Index(off) != off/c.cs/c.l2Entries || g.L2Index(off) != off/c.cs%c.l2Entries {
				t.Errorf("%+v off %d: l1 %d l2 %d", g, off, g.L1Index(off), g.L2Index(off))
			}
			if g.RefTableIndex(off) != off/c.cs/c.refblockEntries || g.RefblockIndex(off) != off/c.cs%c.refblockEntries {
				t.Errorf("%+v off %d: reftable %d refblock %d", g, off, g.RefTableIndex(off), g.RefblockIndex(off))
			}
			if g.SubclusterIndex(off) != int(off%c.cs/c.scSize) {
				t.Errorf("%+v off %d: subcluster %d", g, off, g.SubclusterIndex(off))
			}
			if g.OffsetIntoCluster(off)+g.StartOfCluster(off) != off {
				t.Errorf("%+v off %d: cluster split", g, off)
			}
		}
		if g.L1EntriesFor(0) != 0 || g.L1EntriesFor(1) != 1 || g.L1EntriesFor(c.bytesPerL2) != 1 || g.L1EntriesFor(c.bytesPerL2+1) != 2 {
			t.Errorf("%+v: L1EntriesFor rounding", g)
		}
	}
	for _, bad := range []Geometry{
		{ClusterBits: 8, RefcountOrder: 4, Version: 3},
		{ClusterBits: 13, ExtendedL2: true, RefcountOrder: 4, Version: 3},
		{ClusterBits: 16, RefcountOrder: 7, Version: 3},
		{ClusterBits: 16, RefcountOrder: 4, Version: 1},
		{ClusterBits: 16, RefcountOrder: 3, Version: 2},
	} {
		if bad.Validate() == nil {
			t.Errorf("%+v: Validate accepted", bad)
		}
		// Methods must not panic on invalid geometries.
		_ = bad.L1Index(1<<62) + bad.L2Index(1<<62) + bad.L1EntriesFor(1<<63) + bad.RefcountMax()
		_, _ = bad.CompressedRange(^uint64(0))
	}
	var zero Geometry
	_ = zero.L1Index(12345) + zero.L2Index(1) + zero.L1EntriesFor(^uint64(0)) + zero.RefTableIndex(5) + zero.RefblockIndex(7)
}

func TestDecodeL1(t *testing.T) {
	g := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	cases := []struct {
		e      uint64
		off    uint64
		copied bool
		want   string
	}{
		{0, 0, false, ""},
		{0x40000, 0x40000, false, ""},
		{OflagCopied | 0x40000, 0x40000, true, ""},
		{OflagCopied, 0, true, ""},
		{0x00fffffffff0000 | OflagCopied, 0x00fffffffff0000, true, ""},
		{0x40001, 0, false, "L1 entry 0x0000000000040001 has reserved bits set"},
		{0x40000 | 1<<56, 0, false, "reserved bits set"},
		{0x40000 | 1<<62, 0, false, "reserved bits set"},
		{0x40200, 0, false, "L2 table offset 0x40200 unaligned (L1 table offset: 0x30000, index: 0x7)"},
	}
	for _, c := range cases {
		off, copied, err := g.DecodeL1(c.e, 0x30000, 7)
		if c.want != "" {
			if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrCorrupt) {
				t.Errorf("DecodeL1(%#x) error %v, want %q", c.e, err, c.want)
			}
			continue
		}
		if err != nil || off != c.off || copied != c.copied {
			t.Errorf("DecodeL1(%#x) = %#x, %v, %v", c.e, off, copied, err)
		}
		if off != 0 {
			e, err := g.EncodeL1(off, copied)
			if err != nil || e != c.e {
				t.Errorf("EncodeL1(%#x, %v) = %#x, %v", off, copied, e, err)
			}
		}
	}
	for _, off := range []uint64{0, 0x40200, 1 << 56} {
		if _, err := g.EncodeL1(off, false); err == nil {
			t.Errorf("EncodeL1(%#x) accepted", off)
		}
	}
	// Refcount table entries.
	if off, err := g.DecodeRefTable(0x20000, 0x10000, 0); err != nil || off != 0x20000 {
		t.Errorf("DecodeRefTable = %#x, %v", off, err)
	}
	if _, err := g.DecodeRefTable(0x20001, 0x10000, 3); err == nil || !strings.Contains(err.Error(), "reserved bits") {
		t.Errorf("DecodeRefTable reserved: %v", err)
	}
	if _, err := g.DecodeRefTable(0x20200, 0x10000, 3); err == nil || !strings.Contains(err.Error(), "refblock offset 0x20200 unaligned") {
		t.Errorf("DecodeRefTable unaligned: %v", err)
	}
	// Refcount table entries may point beyond 2^56 (bits 9-63).
	if off, err := g.DecodeRefTable(1<<60, 0x10000, 0); err != nil || off != 1<<60 {
		t.Errorf("DecodeRefTable high = %#x, %v", off, err)
	}
	if e, err := g.EncodeRefTable(0x20000); err != nil || e != 0x20000 {
		t.Errorf("EncodeRefTable = %#x, %v", e, err)
	}
	if _, err := g.EncodeRefTable(0x20100); err == nil {
		t.Error("EncodeRefTable accepted an unaligned offset")
	}
}

func TestClusterTypes(t *testing.T) {
	std := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	v2 := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 2}
	ext := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, ExtendedL2: true}
	df := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, DataFile: true}
	dfExt := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, DataFile: true, ExtendedL2: true}
	const host = 0x50000
	cases := []struct {
		name   string
		g      Geometry
		e, bm  uint64
		sc     int
		ct     ClusterType
		st     SubclusterType
		runLen int
		check  string // CheckL2 error substring, "" = valid
	}{
		{"unallocated", std, 0, 0, 0, ClusterUnallocated, SubclusterUnallocatedPlain, 1, ""},
		{"normal", std, host | OflagCopied, 0, 0, ClusterNormal, SubclusterNormal, 1, ""},
		{"normal shared", std, host, 0, 0, ClusterNormal, SubclusterNormal, 1, ""},
		{"zero plain", std, OflagZero, 0, 0, ClusterZeroPlain, SubclusterZeroPlain, 1, ""},
		{"zero alloc", std, host | OflagZero | OflagCopied, 0, 0, ClusterZeroAlloc, SubclusterZeroAlloc, 1, ""},
		{"compressed", std, OflagCompressed | 0x50123, 0, 0, ClusterCompressed, SubclusterCompressed, 1, ""},
		{"unallocated copied offset 0", std, OflagCopied, 0, 0, ClusterUnallocated, SubclusterUnallocatedPlain, 1, ""},
		{"data file cluster 0", df, OflagCopied, 0, 0, ClusterNormal, SubclusterNormal, 1, ""},
		{"data file unallocated", df, 0, 0, 0, ClusterUnallocated, SubclusterUnallocatedPlain, 1, ""},
		{"v2 zero", v2, OflagZero, 0, 0, ClusterZeroPlain, SubclusterZeroPlain, 1, "zero cluster entry 0x0000000000000001 in pre-v3 image"},
		{"reserved bit 1", std, host | 2, 0, 0, ClusterNormal, SubclusterNormal, 1, "reserved bits set"},
		{"reserved bit 61", std, host | 1<<61, 0, 0, ClusterNormal, SubclusterNormal, 1, "reserved bits set"},
		{"unaligned", std, 0x50200 | OflagCopied, 0, 0, ClusterNormal, SubclusterNormal, 1, "cluster allocation offset 0x50200 unaligned (L2 table offset: 0x40000, index: 0x9)"},
		{"std with bitmap", std, host, 1, 0, ClusterNormal, SubclusterNormal, 1, "standard L2 entry given a bitmap word"},
		{"compressed copied", std, OflagCompressed | OflagCopied | 0x50123, 0, 0, ClusterCompressed, SubclusterCompressed, 1, "has COPIED set"},
		{"compressed with data file", df, OflagCompressed | 0x50123, 0, 0, ClusterCompressed, SubclusterCompressed, 1, "external data file"},
		{"compressed beyond 2^56", Geometry{ClusterBits: 9, RefcountOrder: 4, Version: 3}, OflagCompressed | 1<<56, 0, 0, ClusterCompressed, SubclusterCompressed, 1, "beyond the 2^56 limit"},

		// Extended L2: sc 3 of various bitmaps.
		{"ext unallocated", ext, 0, 0, 3, ClusterUnallocated, SubclusterUnallocatedPlain, 29, ""},
		{"ext zero plain", ext, 0, SubZeroRange(2, 6), 3, ClusterUnallocated, SubclusterZeroPlain, 3, ""},
		{"ext unalloc next to zero", ext, 0, SubZeroRange(5, 6), 3, ClusterUnallocated, SubclusterUnallocatedPlain, 2, ""},
		{"ext normal", ext, host | OflagCopied, SubAllocRange(0, 32), 3, ClusterNormal, SubclusterNormal, 29, ""},
		{"ext normal run", ext, host | OflagCopied, SubAllocRange(3, 7) | SubZeroRange(7, 9), 3, ClusterNormal, SubclusterNormal, 4, ""},
		{"ext unallocated alloc", ext, host | OflagCopied, SubAllocRange(0, 3) | SubAllocRange(10, 11), 3, ClusterNormal, SubclusterUnallocatedAlloc, 7, ""},
		{"ext zero alloc", ext, host | OflagCopied, SubZeroRange(3, 32), 3, ClusterNormal, SubclusterZeroAlloc, 29, ""},
		{"ext compressed", ext, OflagCompressed | 0x50123, 0, 3, ClusterCompressed, SubclusterCompressed, 29, ""},
		{"ext both bits", ext, host, SubAllocRange(3, 4) | SubZeroRange(3, 4), 3, ClusterNormal, SubclusterInvalid, 29, "both allocated and zero"},
		{"ext both bits elsewhere", ext, host, SubAllocRange(9, 10) | SubZeroRange(9, 10), 3, ClusterNormal, SubclusterInvalid, 29, "both allocated and zero"},
		{"ext alloc without cluster", ext, 0, SubAllocRange(9, 10), 3, ClusterUnallocated, SubclusterInvalid, 29, "allocates subclusters of an unallocated cluster"},
		{"ext zero flag is reserved", ext, host | OflagZero, SubAllocRange(0, 32), 3, ClusterNormal, SubclusterNormal, 29, "reserved bits set"},
		{"ext compressed bitmap", ext, OflagCompressed | 0x50123, 1, 3, ClusterCompressed, SubclusterCompressed, 29, "subcluster bitmap 0x0000000000000001, must be zero"},
		{"ext data file offset 0", dfExt, OflagCopied, SubAllocRange(0, 32), 3, ClusterNormal, SubclusterNormal, 29, ""},
		{"sc out of range", ext, 0, 0, 32, ClusterUnallocated, SubclusterInvalid, 0, ""},
		{"sc negative", std, 0, 0, -1, ClusterUnallocated, SubclusterInvalid, 0, ""},
		{"std sc 1", std, host, 0, 1, ClusterNormal, SubclusterInvalid, 0, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if ct := c.g.ClusterType(c.e); ct != c.ct {
				t.Errorf("ClusterType = %v, want %v", ct, c.ct)
			}
			if st := c.g.SubclusterType(c.e, c.bm, c.sc); st != c.st {
				t.Errorf("SubclusterType = %v, want %v", st, c.st)
			}
			st, n := c.g.SubclusterRun(c.e, c.bm, c.sc)
			if st != c.st || n != c.runLen {
				t.Errorf("SubclusterRun = %v, %d, want %v, %d", st, n, c.st, c.runLen)
			}
			err := c.g.CheckL2(c.e, c.bm, 0x40000, 9)
			if c.check == "" && err != nil {
				t.Errorf("CheckL2: %v", err)
			}
			if c.check != "" && (err == nil || !strings.Contains(err.Error(), c.check) || !errors.Is(err, ErrCorrupt)) {
				t.Errorf("CheckL2 = %v, want %q", err, c.check)
			}
		})
	}
	if s := ClusterType(9).String() + SubclusterType(9).String() + ClusterZeroAlloc.String() + SubclusterUnallocatedAlloc.String(); s != "ClusterType(9)SubclusterType(9)zero-allocunallocated-alloc" {
		t.Errorf("String: %q", s)
	}
}

func TestSubclusterRunExhaustive(t *testing.T) {
	// Compare SubclusterRun with a per-subcluster loop over SubclusterType.
	ext := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, ExtendedL2: true}
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		alloc := uint32(r.Uint64())
		zero := uint32(r.Uint64()) &^ alloc
		if r.IntN(4) == 0 {
			zero = 0
		}
		e := uint64(0)
		if r.IntN(2) == 0 {
			e = 0x50000 | OflagCopied
		} else {
			alloc = 0
		}
		bm := uint64(zero)<<32 | uint64(alloc)
		for sc := range 32 {
			st, n := ext.SubclusterRun(e, bm, sc)
			want := 0
			for i := sc; i < 32 && ext.SubclusterType(e, bm, i) == st; i++ {
				want++
			}
			if n != want {
				t.Fatalf("e %#x bm %#x sc %d: run %d (%v), want %d", e, bm, sc, n, st, want)
			}
		}
	}
}

func TestCompressedDescriptor(t *testing.T) {
	// Hand-computed examples (spec "Compressed Clusters Descriptor").
	g := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	// x = 62 - 8 = 54: offset in bits 0..53, 8 sector bits 54..61.
	e := OflagCompressed | 3<<54 | 0x50123
	off, n := g.CompressedRange(e)
	if off != 0x50123 || n != 4*512-0x123 {
		t.Errorf("CompressedRange = %#x, %d", off, n)
	}
	g9 := Geometry{ClusterBits: 9, RefcountOrder: 4, Version: 3}
	// x = 61: one sector bit (bit 61).
	if off, n := g9.CompressedRange(OflagCompressed | 1<<61 | 0x1ff); off != 0x1ff || n != 1024-511 {
		t.Errorf("cb 9: CompressedRange = %#x, %d", off, n)
	}
	g21 := Geometry{ClusterBits: 21, RefcountOrder: 4, Version: 3}
	// x = 49: 13 sector bits.
	if off, n := g21.CompressedRange(OflagCompressed | 0x1fff<<49 | (1<<49 - 1)); off != 1<<49-1 || n != 8192*512-511 {
		t.Errorf("cb 21: CompressedRange = %#x, %d", off, n)
	}

	for cb := uint32(MinClusterBits); cb <= MaxClusterBits; cb++ {
		g := Geometry{ClusterBits: cb, RefcountOrder: 4, Version: 3}
		cs := g.ClusterSize()
		r := rand.New(rand.NewPCG(uint64(cb), 7))
		for range 500 {
			hostOff := r.Uint64N(min(uint64(1)<<(70-cb), MaxHostOffset))
			size := 1 + r.Uint64N(cs)
			e, err := g.EncodeCompressed(hostOff, size)
			if err != nil {
				t.Fatalf("cb %d: EncodeCompressed(%#x, %d): %v", cb, hostOff, size, err)
			}
			if err := g.CheckL2(e, 0, 0, 0); err != nil {
				t.Fatalf("cb %d: CheckL2(%#x): %v", cb, e, err)
			}
			if g.ClusterType(e) != ClusterCompressed {
				t.Fatalf("cb %d: not compressed", cb)
			}
			off, n := g.CompressedRange(e)
			if off != hostOff || n < size || n > size+CompressedSectorSize || n > 2*cs {
				t.Fatalf("cb %d: encode(%#x, %d) decodes to %#x, %d", cb, hostOff, size, off, n)
			}
			if (off+n)%CompressedSectorSize != 0 {
				t.Fatalf("cb %d: range %#x+%d does not end on a sector", cb, off, n)
			}
		}
		// Errors: too big, offset too large, zero size.
		// The sector field holds up to 2 clusters of sectors; an
		// unaligned start needs one more.
		if _, err := g.EncodeCompressed(0x200, 2*cs); err != nil {
			t.Errorf("cb %d: 2 clusters at a sector boundary refused: %v", cb, err)
		}
		if _, err := g.EncodeCompressed(0x201, 2*cs); err == nil {
			t.Errorf("cb %d: accepted a size beyond the sector field", cb)
		}
		if _, err := g.EncodeCompressed(0x200, 2*cs+1); err == nil {
			t.Errorf("cb %d: accepted a size beyond 2 clusters", cb)
		}
		if _, err := g.EncodeCompressed(MaxHostOffset, 100); err == nil {
			t.Errorf("cb %d: accepted offset 2^56", cb)
		}
		if _, err := g.EncodeCompressed(0x200, 0); err == nil {
			t.Errorf("cb %d: accepted size 0", cb)
		}
		// Largest descriptor: n is at most 2 clusters.
		if _, n := g.CompressedRange(^uint64(0)); n > 2*cs || n == 0 {
			t.Errorf("cb %d: max length %d", cb, n)
		}
	}
	df := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, DataFile: true}
	if _, err := df.EncodeCompressed(0x200, 100); err == nil {
		t.Error("EncodeCompressed accepted a data file image")
	}
}

func TestEncodeL2(t *testing.T) {
	std := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	v2 := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 2}
	ext := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, ExtendedL2: true}
	df := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, DataFile: true}
	type enc func() (uint64, error)
	cases := []struct {
		name string
		f    enc
		want uint64
		g    Geometry
		ct   ClusterType
		err  bool
	}{
		{"normal", func() (uint64, error) { return std.EncodeL2Normal(0x50000, true) }, 0x50000 | OflagCopied, std, ClusterNormal, false},
		{"normal shared", func() (uint64, error) { return std.EncodeL2Normal(0x50000, false) }, 0x50000, std, ClusterNormal, false},
		{"normal 0", func() (uint64, error) { return std.EncodeL2Normal(0, true) }, 0, std, 0, true},
		{"normal unaligned", func() (uint64, error) { return std.EncodeL2Normal(0x50200, true) }, 0, std, 0, true},
		{"normal 2^56", func() (uint64, error) { return std.EncodeL2Normal(1<<56, true) }, 0, std, 0, true},
		{"data file 0", func() (uint64, error) { return df.EncodeL2Normal(0, true) }, OflagCopied, df, ClusterNormal, false},
		{"data file 0 not copied", func() (uint64, error) { return df.EncodeL2Normal(0, false) }, 0, df, 0, true},
		{"zero plain", func() (uint64, error) { return std.EncodeL2Zero(0, false) }, OflagZero, std, ClusterZeroPlain, false},
		{"zero plain copied", func() (uint64, error) { return std.EncodeL2Zero(0, true) }, 0, std, 0, true},
		{"zero alloc", func() (uint64, error) { return std.EncodeL2Zero(0x50000, true) }, 0x50000 | OflagZero | OflagCopied, std, ClusterZeroAlloc, false},
		{"zero v2", func() (uint64, error) { return v2.EncodeL2Zero(0, false) }, 0, v2, 0, true},
		{"zero ext", func() (uint64, error) { return ext.EncodeL2Zero(0, false) }, 0, ext, 0, true},
	}
	for _, c := range cases {
		e, err := c.f()
		if c.err {
			if err == nil {
				t.Errorf("%s: no error", c.name)
			}
			continue
		}
		if err != nil || e != c.want {
			t.Errorf("%s = %#x, %v, want %#x", c.name, e, err, c.want)
			continue
		}
		if ct := c.g.ClusterType(e); ct != c.ct {
			t.Errorf("%s: type %v, want %v", c.name, ct, c.ct)
		}
		if err := c.g.CheckL2(e, 0, 0, 0); err != nil {
			t.Errorf("%s: CheckL2: %v", c.name, err)
		}
	}
	if SubAllocRange(0, 32) != BitmapAllAlloc || SubZeroRange(0, 32) != BitmapAllZero ||
		SubAllocRange(3, 5) != 0x18 || SubZeroRange(31, 32) != 1<<63 || SubAllocRange(5, 3) != 0 ||
		SubAllocRange(-4, 99) != BitmapAllAlloc {
		t.Error("SubAllocRange/SubZeroRange")
	}
}

func TestTableAccess(t *testing.T) {
	ext := Geometry{ClusterBits: 14, RefcountOrder: 4, Version: 3, ExtendedL2: true}
	table := make([]byte, ext.ClusterSize())
	n := int(ext.L2Entries())
	if err := ext.SetL2EntryAt(table, n-1, 0x50000|OflagCopied, SubAllocRange(0, 2)); err != nil {
		t.Fatal(err)
	}
	e, bm, err := ext.L2EntryAt(table, n-1)
	if err != nil || e != 0x50000|OflagCopied || bm != 3 {
		t.Errorf("L2EntryAt = %#x %#x %v", e, bm, err)
	}
	if be.Uint64(table[len(table)-8:]) != 3 {
		t.Error("bitmap word not at bytes 8..15 of the entry")
	}
	for _, i := range []int{-1, n, 1 << 40} {
		if _, _, err := ext.L2EntryAt(table, i); err == nil {
			t.Errorf("L2EntryAt(%d) accepted", i)
		}
		if err := ext.SetL2EntryAt(table, i, 0, 0); err == nil {
			t.Errorf("SetL2EntryAt(%d) accepted", i)
		}
		if _, err := TableEntry(table, i*2); err == nil {
			t.Errorf("TableEntry(%d) accepted", i*2)
		}
		if err := SetTableEntry(table, i*2, 0); err == nil {
			t.Errorf("SetTableEntry(%d) accepted", i*2)
		}
	}
	if err := SetTableEntry(table[:16], 1, 0xdeadbeef); err != nil {
		t.Fatal(err)
	}
	if v, err := TableEntry(table, 1); err != nil || v != 0xdeadbeef {
		t.Errorf("TableEntry = %#x, %v", v, err)
	}
}

func TestRefcountWidths(t *testing.T) {
	// Bit layout of sub-byte widths: entry 0 in the least significant bits.
	layout := []struct {
		order uint32
		index uint64
		value uint64
		bytes []byte
	}{
		{0, 0, 1, []byte{0x01, 0}},
		{0, 7, 1, []byte{0x80, 0}},
		{0, 9, 1, []byte{0, 0x02}},
		{1, 1, 3, []byte{0x0c, 0}},
		{1, 3, 2, []byte{0x80, 0}},
		{2, 0, 0xa, []byte{0x0a, 0}},
		{2, 1, 0xf, []byte{0xf0, 0}},
		{3, 1, 0x7f, []byte{0, 0x7f}},
		{4, 0, 0x1234, []byte{0x12, 0x34}},
		{5, 0, 0x12345678, []byte{0x12, 0x34, 0x56, 0x78}},
		{6, 0, 0x0102030405060708, []byte{1, 2, 3, 4, 5, 6, 7, 8}},
	}
	for _, c := range layout {
		g := Geometry{ClusterBits: 9, RefcountOrder: c.order, Version: 3}
		block := make([]byte, 8)
		if err := g.SetRefcount(block, c.index, c.value); err != nil {
			t.Fatalf("order %d: %v", c.order, err)
		}
		if string(block[:len(c.bytes)]) != string(c.bytes) {
			t.Errorf("order %d index %d value %#x: bytes % x, want % x", c.order, c.index, c.value, block[:len(c.bytes)], c.bytes)
		}
		if v, err := g.Refcount(block, c.index); err != nil || v != c.value {
			t.Errorf("order %d: Refcount = %#x, %v", c.order, v, err)
		}
	}
	// Random set/get against a model, for every width; neighbours must
	// not be disturbed.
	for order := uint32(0); order <= MaxRefcountOrder; order++ {
		g := Geometry{ClusterBits: 9, RefcountOrder: order, Version: 3}
		block := make([]byte, 512)
		n := g.RefblockEntries()
		model := make([]uint64, n)
		r := rand.New(rand.NewPCG(uint64(order), 3))
		for range 5000 {
			i := r.Uint64N(n)
			v := r.Uint64() & g.RefcountMax()
			if err := g.SetRefcount(block, i, v); err != nil {
				t.Fatal(err)
			}
			model[i] = v
		}
		for i := range n {
			if v, _ := g.Refcount(block, i); v != model[i] {
				t.Fatalf("order %d entry %d: %#x, want %#x", order, i, v, model[i])
			}
		}
		if order < 6 {
			if err := g.SetRefcount(block, 0, g.RefcountMax()+1); err == nil {
				t.Errorf("order %d: overflow accepted", order)
			}
		}
		if _, err := g.Refcount(block, n); err == nil {
			t.Errorf("order %d: index %d accepted", order, n)
		}
		if err := g.SetRefcount(block, n, 0); err == nil {
			t.Errorf("order %d: set index %d accepted", order, n)
		}
		if _, err := g.Refcount(block[:0], 0); err == nil {
			t.Errorf("order %d: empty block accepted", order)
		}
	}
	bad := Geometry{ClusterBits: 9, RefcountOrder: 7}
	if _, err := bad.Refcount(make([]byte, 64), 0); err == nil {
		t.Error("order 7 accepted")
	}
}

func TestCheckDataFileOffset(t *testing.T) {
	df := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, DataFile: true}
	ok := []struct{ e, guest uint64 }{
		{OflagCopied, 0x1234},             // host cluster 0
		{0x50000 | OflagCopied, 0x5ffff},  // normal
		{0x50000 | OflagZero, 0x50000},    // zero-alloc
		{OflagZero, 0x90000},              // zero-plain: no host offset
		{0, 0x90000},                      // unallocated
		{OflagCompressed | 0x123, 0x1000}, // CheckL2's business
	}
	for _, c := range ok {
		if err := df.CheckDataFileOffset(c.e, c.guest, 0x30000, 1); err != nil {
			t.Errorf("%#x at %#x: %v", c.e, c.guest, err)
		}
	}
	err := df.CheckDataFileOffset(0x50000|OflagCopied, 0x60000, 0x30000, 1)
	if err == nil || !errors.Is(err, ErrCorrupt) ||
		!strings.Contains(err.Error(), "host cluster offset 0x50000 does not match guest cluster offset 0x60000") {
		t.Errorf("mismatch: %v", err)
	}
	std := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	if err := std.CheckDataFileOffset(0x50000, 0x60000, 0, 0); err != nil {
		t.Errorf("without a data file: %v", err)
	}
}

// TestHotPathAllocs pins that the functions on the I/O path (mapping a
// guest offset through an L2 entry) do not allocate.
func TestHotPathAllocs(t *testing.T) {
	g := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3, ExtendedL2: true}
	table := make([]byte, g.ClusterSize())
	_ = g.SetL2EntryAt(table, 5, 0x50000|OflagCopied, SubAllocRange(0, 7))
	block := make([]byte, g.ClusterSize())
	var sink uint64
	n := testing.AllocsPerRun(100, func() {
		e, bm, _ := g.L2EntryAt(table, 5)
		if g.CheckL2(e, bm, 0x40000, 5) != nil || g.CheckDataFileOffset(e, 0, 0, 0) != nil {
			panic("invalid")
		}
		st, run := g.SubclusterRun(e, bm, g.SubclusterIndex(0x51000))
		off, length := g.CompressedRange(OflagCompressed | 0x1234)
		l2, _, _ := g.DecodeL1(0x40000|OflagCopied, 0x30000, 0)
		_ = g.SetRefcount(block, 7, 2)
		rc, _ := g.Refcount(block, 7)
		sink += uint64(st) + uint64(run) + off + length + l2 + rc + g.L1Index(1<<40) + g.L2Index(1<<40)
	})
	if n != 0 {
		t.Errorf("%v allocations per lookup, want 0", n)
	}
	_ = sink
}
