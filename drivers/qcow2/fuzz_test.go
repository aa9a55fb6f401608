package qcow2

// Fuzz targets. Their seeds come from images qemu-img makes in a temporary
// directory (when qemu-img is installed) plus synthetic ones, and run as
// normal tests under `go test`. To fuzz, run one target at a time, e.g.
//
//	go test -run '^$' -fuzz '^FuzzParseHeader$' -fuzztime 30s ./drivers/qcow2/
//
// Every target checks more than "no panic": what parses must re-encode to
// something that parses to the same value.

import (
	"bytes"
	"path/filepath"
	"reflect"
	"sync"
	"testing"

	"ublkimg/internal/fuzzlimit"
	"ublkimg/internal/qemutest"
)

// maxPad bounds how far fuzz inputs are padded with zeros to a full header
// cluster, to keep executions fast (and allocations small).
const maxPad = 64 << 10

// The seed images are created once per test binary. They live in the first
// fuzz target's temporary directory, which is removed when that target ends;
// that is fine because only their contents, read into memory, are used.
var (
	seedOnce sync.Once
	seedImgs []testImage
)

// qemuSeedImages creates a few images for seeds; it returns nil when
// qemu-img or qemu-io is missing (outside `make test`), so fuzzing still
// works with the synthetic seeds.
func qemuSeedImages(f *testing.F) []testImage {
	if !qemutest.Have(f, "qemu-img", "qemu-io") {
		return nil
	}
	seedOnce.Do(func() {
		dir := f.TempDir()
		base := qemuCreate(f, dir, "base.qcow2", "64M")
		zstd := ",compression_type=zstd"
		if zstdProbe() != "" {
			zstd = ""
		}
		for i, a := range [][]string{
			{"-o", "compat=0.10,cluster_size=4k"},
			{"-o", "cluster_size=512"},
			{"-o", "cluster_size=64k"},
			{"-o", "extended_l2=on,cluster_size=16k,lazy_refcounts=on,refcount_bits=8" + zstd},
			{"-b", base, "-F", "qcow2", "-o", "cluster_size=4k"},
			{"-o", "data_file=" + filepath.Join(dir, "data.raw") + ",data_file_raw=on,cluster_size=8k"},
		} {
			p := qemuCreate(f, dir, string(rune('a'+i))+".qcow2", "16M", a...)
			cmds := []string{"-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 256k 64k", "-c", "write -P 3 300k 3k"}
			if i != 5 { // no compression with a data file
				cmds = append(cmds, "-c", "write -c -P 2 64k 64k")
			}
			mustRun(f, "qemu-io", append(cmds, p)...)
			if i < 4 {
				mustRun(f, "qemu-img", "snapshot", "-c", "snap", p)
				mustRun(f, "qemu-img", "snapshot", "-c", "another one", p)
			}
			if i == 2 {
				mustRun(f, "qemu-img", "bitmap", "--add", p, "b")
			}
			seedImgs = append(seedImgs, readTestImage(f, p))
		}
	})
	return seedImgs
}

// padHeader extends a fuzz input with zeros to its cluster size (bounded by
// maxPad) so that trimmed seeds become complete header clusters again.
func padHeader(b []byte) []byte {
	if len(b) < 24 {
		return b
	}
	cb := be.Uint32(b[20:])
	if cb < MinClusterBits || cb > MaxClusterBits {
		return b
	}
	n := min(1<<cb, maxPad)
	if len(b) >= n {
		return b
	}
	return append(bytes.Clone(b), make([]byte, n-len(b))...)
}

func FuzzParseHeader(f *testing.F) {
	for _, img := range qemuSeedImages(f) {
		f.Add(trimZeros(img.data[:img.h.ClusterSize()]), int64(len(img.data)))
	}
	h, size := baseHeader()
	h.BackingFile, h.BackingFormat = "base", "raw"
	h.Unknown = []Extension{{7, []byte("x")}}
	f.Add(trimZeros(mustMarshalHeader(f, h)), size)
	h.Version, h.HeaderTail = 2, nil
	h.ClusterBits = 12
	h.L1TableOffset, h.RefcountTableOffset, h.L1Size = 0x3000, 0x1000, 2048
	f.Add(trimZeros(mustMarshalHeader(f, h)), int64(-1))

	f.Fuzz(func(t *testing.T, data []byte, fileSize int64) {
		fuzzlimit.Guard(t, parseLimits)
		b := padHeader(data)
		h, err := ParseHeader(b, fileSize)
		if err != nil {
			return
		}
		if err := h.Geometry().Validate(); err != nil {
			t.Fatalf("parsed header has invalid geometry: %v", err)
		}
		out, err := h.Marshal(int(h.ClusterSize()))
		if err != nil {
			// Legitimate: QEMU's feature name table or a re-laid-out
			// extension area may not fit where the original did.
			return
		}
		h2, err := ParseHeader(out, fileSize)
		if err != nil {
			t.Fatalf("ParseHeader(Marshal(h)): %v\nheader %+v", err, h)
		}
		// Marshal normalizes the layout; everything else must survive.
		want := *h
		want.HeaderLength = h2.HeaderLength
		want.BackingFileOffset, want.BackingFileSize = h2.BackingFileOffset, h2.BackingFileSize
		want.FeatureTable = h2.FeatureTable
		want.BitmapsIgnored = false
		if want.HeaderLength > MinHeaderLengthV3 && len(want.HeaderTail) == 0 {
			want.HeaderTail = make([]byte, HeaderLengthV3-MinHeaderLengthV3-1)
		}
		if !reflect.DeepEqual(&want, h2) {
			t.Fatalf("round trip changed the header:\n got %+v\nwant %+v", h2, &want)
		}
		out2, err := h2.Marshal(int(h2.ClusterSize()))
		if err != nil || !bytes.Equal(out, out2) {
			t.Fatalf("Marshal not idempotent: %v", err)
		}
	})
}

// FuzzHeaderExtensions fuzzes the extension area and the fields that
// govern it (feature bits, crypt method, backing file offset and size) in an
// otherwise valid header, so mutations reach the extension parser instead of
// failing on the fixed fields.
func FuzzHeaderExtensions(f *testing.F) {
	for _, img := range qemuSeedImages(f) {
		h := img.h
		if h.Version == 3 {
			f.Add(trimZeros(img.data[h.HeaderLength:min(h.ClusterSize(), 4096)]), h.IncompatibleFeatures,
				h.AutoclearFeatures, h.CryptMethod, uint16(h.BackingFileOffset), uint16(h.BackingFileSize))
		}
	}
	f.Add(bytes.Join([][]byte{rawExt(ExtBackingFormat, []byte("raw")), rawExt(0x77, []byte("?")),
		rawExt(ExtFeatureTable, rawFeature(0, 7, "x"))}, nil), uint64(1<<7), uint64(0), uint32(0), uint16(0), uint16(0))
	f.Fuzz(func(t *testing.T, area []byte, incompat, autoclear uint64, crypt uint32, bfo, bfs uint16) {
		fuzzlimit.Guard(t, parseLimits)
		h, size := baseHeader()
		h.ClusterBits = 12
		h.L1TableOffset, h.RefcountTableOffset, h.L1Size = 0x3000, 0x1000, 1024
		b := mustMarshalHeader(t, h)
		clear(b[HeaderLengthV3:])
		copy(b[HeaderLengthV3:], area)
		putBE64(b, 72, incompat)
		putBE64(b, 88, autoclear)
		putBE32(b, 32, crypt)
		putBE64(b, 8, uint64(bfo))
		putBE32(b, 16, uint32(bfs))
		if incompat&IncompatCompression != 0 {
			b[104] = CompressionZstd
		}
		h2, err := ParseHeader(b, size)
		if err != nil {
			return
		}
		out, err := h2.Marshal(int(h2.ClusterSize()))
		if err != nil {
			return
		}
		h3, err := ParseHeader(out, size)
		if err != nil {
			t.Fatalf("ParseHeader(Marshal(h)): %v", err)
		}
		if h3.BackingFile != h2.BackingFile || h3.BackingFormat != h2.BackingFormat || h3.DataFile != h2.DataFile ||
			!reflect.DeepEqual(h3.Unknown, h2.Unknown) || !reflect.DeepEqual(h3.Bitmaps, h2.Bitmaps) ||
			!reflect.DeepEqual(h3.Crypto, h2.Crypto) {
			t.Fatalf("round trip changed extensions:\n got %+v\nwant %+v", h3, h2)
		}
	})
}

// fuzzGeometry derives a valid geometry from fuzz bytes.
func fuzzGeometry(cb, flags uint8) Geometry {
	g := Geometry{
		ClusterBits:   MinClusterBits + uint32(cb)%(MaxClusterBits-MinClusterBits+1),
		RefcountOrder: uint32(flags>>4) % 7,
		Version:       3,
	}
	if flags&1 != 0 && g.ClusterBits >= MinClusterBitsExtendedL2 {
		g.ExtendedL2 = true
	}
	if flags&2 != 0 {
		g.DataFile = true
	}
	if flags&4 != 0 && !g.ExtendedL2 && !g.DataFile {
		g.Version, g.RefcountOrder = 2, 4
	}
	return g
}

func FuzzL2Entry(f *testing.F) {
	for _, img := range qemuSeedImages(f) {
		g := img.h.Geometry()
		flags := uint8(0)
		if g.ExtendedL2 {
			flags |= 1
		}
		if g.DataFile {
			flags |= 2
		}
		if g.Version == 2 {
			flags |= 4
		}
		cb := uint8(g.ClusterBits - MinClusterBits)
		l1 := img.data[img.h.L1TableOffset : img.h.L1TableOffset+uint64(img.h.L1Size)*8]
		for i := range int(img.h.L1Size) {
			e, _ := TableEntry(l1, i)
			l2, _, err := g.DecodeL1(e, 0, 0)
			if err != nil || l2 == 0 {
				continue
			}
			seen := map[[2]uint64]bool{}
			for j := range int(g.L2Entries()) {
				e, bm, _ := g.L2EntryAt(img.data[l2:l2+g.ClusterSize()], j)
				if !seen[[2]uint64{e, bm}] {
					seen[[2]uint64{e, bm}] = true
					f.Add(e, bm, cb, flags)
				}
			}
		}
	}
	f.Add(uint64(0x50000|OflagCopied), uint64(0), uint8(7), uint8(0))
	f.Add(uint64(0x50000|OflagCopied), SubAllocRange(0, 3)|SubZeroRange(5, 9), uint8(7), uint8(1))
	f.Add(OflagCompressed|3<<54|0x50123, uint64(0), uint8(7), uint8(0))

	f.Fuzz(func(t *testing.T, e, bm uint64, cb, flags uint8) {
		fuzzlimit.Guard(t, parseLimits)
		g := fuzzGeometry(cb, flags)
		ct := g.ClusterType(e)
		checkErr := g.CheckL2(e, bm, 0x10000, 1)
		// Subcluster types agree with runs, and with the cluster type.
		for sc := 0; sc < g.Subclusters(); {
			st, n := g.SubclusterRun(e, bm, sc)
			if n < 1 || sc+n > g.Subclusters() {
				t.Fatalf("run %d at %d", n, sc)
			}
			for i := sc; i < sc+n; i++ {
				if g.SubclusterType(e, bm, i) != st {
					t.Fatalf("subcluster %d differs from its run type %v", i, st)
				}
			}
			if checkErr == nil && st == SubclusterInvalid {
				t.Fatalf("CheckL2 accepted an entry with invalid subcluster %d", sc)
			}
			if (st == SubclusterCompressed) != (ct == ClusterCompressed) {
				t.Fatalf("subcluster %v in cluster %v", st, ct)
			}
			sc += n
		}
		if checkErr != nil {
			return
		}
		// A valid entry re-encodes to itself.
		copied := e&OflagCopied != 0
		var re uint64
		var err error
		switch ct {
		case ClusterUnallocated:
			if e&^OflagCopied != 0 {
				t.Fatalf("unallocated entry %#x has other bits", e)
			}
			return
		case ClusterNormal:
			re, err = g.EncodeL2Normal(HostOffset(e), copied)
		case ClusterZeroPlain:
			re, err = g.EncodeL2Zero(0, copied)
		case ClusterZeroAlloc:
			re, err = g.EncodeL2Zero(HostOffset(e), copied)
		case ClusterCompressed:
			off, n := g.CompressedRange(e)
			re, err = g.EncodeCompressed(off, n)
		}
		if err != nil || re != e {
			t.Fatalf("%v entry %#x re-encodes to %#x, %v", ct, e, re, err)
		}
	})
}

func FuzzCompressedDescriptor(f *testing.F) {
	for _, img := range qemuSeedImages(f) {
		g := img.h.Geometry()
		l1 := img.data[img.h.L1TableOffset : img.h.L1TableOffset+uint64(img.h.L1Size)*8]
		for i := range int(img.h.L1Size) {
			e, _ := TableEntry(l1, i)
			l2, _, _ := g.DecodeL1(e, 0, 0)
			for j := 0; l2 != 0 && j < int(g.L2Entries()); j++ {
				if e, _, _ := g.L2EntryAt(img.data[l2:l2+g.ClusterSize()], j); g.ClusterType(e) == ClusterCompressed {
					f.Add(e, uint8(g.ClusterBits-MinClusterBits))
				}
			}
		}
	}
	f.Add(^uint64(0), uint8(0))
	f.Add(OflagCompressed|1<<61|0x1ff, uint8(0))
	f.Add(OflagCompressed|0x1fff<<49|(1<<49-1), uint8(12))

	f.Fuzz(func(t *testing.T, e uint64, cb uint8) {
		fuzzlimit.Guard(t, parseLimits)
		g := fuzzGeometry(cb, 0)
		cs := g.ClusterSize()
		x := 62 - (g.ClusterBits - 8)
		off, n := g.CompressedRange(e)
		if n < 1 || n > 2*cs {
			t.Fatalf("length %d out of 1..%d", n, 2*cs)
		}
		if off >= 1<<x || (off+n)%CompressedSectorSize != 0 {
			t.Fatalf("range %#x+%d", off, n)
		}
		valid := g.CheckL2(e|OflagCompressed, 0, 0, 0) == nil
		if valid != (off < MaxHostOffset && e&OflagCopied == 0) {
			t.Fatalf("CheckL2 validity %v for offset %#x", valid, off)
		}
		if !valid {
			return
		}
		re, err := g.EncodeCompressed(off, n)
		if err != nil {
			t.Fatalf("EncodeCompressed(%#x, %d): %v", off, n, err)
		}
		if re != e|OflagCompressed {
			t.Fatalf("re-encoded %#x, want %#x", re, e|OflagCompressed)
		}
	})
}

func FuzzSnapshotTable(f *testing.F) {
	for _, img := range qemuSeedImages(f) {
		if img.h.NbSnapshots > 0 {
			f.Add(img.data[img.h.SnapshotsOffset:min(img.h.SnapshotsOffset+512, uint64(len(img.data)))], img.h.NbSnapshots, img.h.Size)
		}
	}
	b, _ := MarshalSnapshotTable(sampleSnapshots())
	f.Add(b, uint32(3), uint64(1<<30))
	f.Add(rawSnapshot(0x10000, 1, "1", "v2", 4096, nil), uint32(1), uint64(1<<20))

	f.Fuzz(func(t *testing.T, data []byte, count uint32, diskSize uint64) {
		fuzzlimit.Guard(t, parseLimits)
		count %= MaxSnapshots + 2
		snaps, n, err := ParseSnapshotTable(data, count, diskSize)
		if err != nil {
			return
		}
		if len(snaps) != int(count) || n > len(data) {
			t.Fatalf("%d entries, length %d of %d", len(snaps), n, len(data))
		}
		_ = CheckSnapshots(snaps, Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}, 0, int64(len(data)))
		out, err := MarshalSnapshotTable(snaps)
		if err != nil {
			t.Fatalf("MarshalSnapshotTable: %v", err)
		}
		again, _, err := ParseSnapshotTable(out, count, diskSize+1)
		if err != nil {
			t.Fatalf("ParseSnapshotTable(Marshal): %v", err)
		}
		for i := range snaps {
			s := snaps[i]
			s.ExtraDataSize = uint32(snapshotExtraKnown + len(s.UnknownExtra))
			if !reflect.DeepEqual(s, again[i]) {
				t.Fatalf("entry %d round trip:\n got %+v\nwant %+v", i, again[i], s)
			}
		}
	})
}

func FuzzBitmapDirectory(f *testing.F) {
	for _, img := range qemuSeedImages(f) {
		if bm := img.h.Bitmaps; bm != nil {
			f.Add(img.data[bm.DirectoryOffset:bm.DirectoryOffset+bm.DirectorySize], bm.Count, uint8(img.h.ClusterBits), img.h.Size)
		}
	}
	d, ext := bitmapDirOf(goodBitmaps())
	f.Add(d, ext.Count, uint8(16), uint64(1<<30))
	f.Fuzz(func(t *testing.T, dir []byte, count uint32, cb uint8, size uint64) {
		fuzzlimit.Guard(t, parseLimits)
		ext := BitmapsExt{Count: count, DirectorySize: uint64(len(dir)), DirectoryOffset: 0x10000}
		bms, err := ParseBitmapDirectory(dir, ext, uint32(cb), size)
		if err != nil {
			return
		}
		if len(bms) != int(count) {
			t.Fatalf("%d bitmaps, want %d", len(bms), count)
		}
		var re []byte
		for _, b := range bms {
			re = append(re, rawBitmap(b, len(b.Name))...)
		}
		if !bytes.Equal(re, dir) {
			t.Fatalf("re-encoded directory differs")
		}
	})
}

func FuzzRefcount(f *testing.F) {
	f.Add([]byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0}, uint8(0), uint64(3), uint64(1))
	f.Add([]byte{0xff}, uint8(6), uint64(0), uint64(1))
	f.Fuzz(func(t *testing.T, block []byte, order uint8, i, v uint64) {
		fuzzlimit.Guard(t, parseLimits)
		g := Geometry{ClusterBits: 9, RefcountOrder: uint32(order % 8), Version: 3}
		old := bytes.Clone(block)
		if err := g.SetRefcount(block, i, v); err != nil {
			return
		}
		if got, err := g.Refcount(block, i); err != nil || got != v {
			t.Fatalf("Refcount after Set(%d) = %d, %v", v, got, err)
		}
		// Every other entry is unchanged.
		for j := range uint64(len(block)) * 8 / uint64(g.RefcountBits()) {
			if j == i {
				continue
			}
			a, _ := g.Refcount(old, j)
			b, _ := g.Refcount(block, j)
			if a != b {
				t.Fatalf("entry %d changed from %d to %d", j, a, b)
			}
		}
	})
}

// parseLimits bound one input of the parser targets, which decode what the
// input holds (its seeds allocate under 1 MiB).
var parseLimits = fuzzlimit.Limits{Alloc: 64 << 20}
