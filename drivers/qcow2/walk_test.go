package qcow2

import (
	"bytes"
	"compress/flate"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// l2Visit is one L2 entry reached from an L1 table.
type l2Visit struct {
	guest     uint64 // guest offset of the cluster
	e, bitmap uint64
	l2Offset  uint64
	index     int64
}

// walkL1 decodes an L1 table and every L2 table it points to, failing the
// test on any entry DecodeL1 or CheckL2 refuses, and returns the L2 tables
// and entries visited.
func walkL1(t *testing.T, img testImage, l1Off uint64, l1Size uint32) (l2Tables []uint64, visits []l2Visit) {
	t.Helper()
	g := img.h.Geometry()
	cs := g.ClusterSize()
	l1 := img.data[l1Off : l1Off+uint64(l1Size)*8]
	for i := range int(l1Size) {
		raw, err := TableEntry(l1, i)
		if err != nil {
			t.Fatal(err)
		}
		l2Off, _, err := g.DecodeL1(raw, l1Off, int64(i))
		if err != nil {
			t.Fatalf("DecodeL1: %v", err)
		}
		if l2Off == 0 {
			continue
		}
		l2Tables = append(l2Tables, l2Off)
		table := img.data[l2Off : l2Off+cs]
		for j := range int(g.L2Entries()) {
			e, bm, err := g.L2EntryAt(table, j)
			if err != nil {
				t.Fatal(err)
			}
			if err := g.CheckL2(e, bm, l2Off, int64(j)); err != nil {
				t.Fatalf("CheckL2 on a qemu-img testImage: %v", err)
			}
			guest := uint64(i)*g.BytesPerL2Table() + uint64(j)*cs
			if err := g.CheckDataFileOffset(e, guest+cs-1, l2Off, int64(j)); err != nil {
				t.Fatalf("CheckDataFileOffset on a qemu-img testImage: %v", err)
			}
			visits = append(visits, l2Visit{guest, e, bm, l2Off, int64(j)})
		}
	}
	return l2Tables, visits
}

type qemuMapEntry struct {
	Start   uint64  `json:"start"`
	Length  uint64  `json:"length"`
	Depth   int     `json:"depth"`
	Present bool    `json:"present"`
	Zero    bool    `json:"zero"`
	Data    bool    `json:"data"`
	Offset  *uint64 `json:"offset"`
}

// mapScenario is an image made by qemu-img and written by qemu-io.
type mapScenario struct {
	name string
	size string
	opts string // qemu-img create -o (data_file is added by dataFile)
	// dataFile puts guest data in an external data file.
	dataFile bool
	cmds     []string // qemu-io commands
	deflate  bool     // compressed clusters can be checked with compress/flate
}

func mapScenarios() []mapScenario {
	return []mapScenario{
		{name: "v3 64k", size: "8M", opts: "cluster_size=64k", deflate: true, cmds: []string{
			"write -P 1 0 64k", "write -c -P 2 64k 64k", "write -z 128k 64k",
			"write -P 3 192k 64k", "write -z 192k 64k", "write -P 4 1M 100k",
			"write -P 5 2M 128k", "discard 2M 64k", "write -c -P 6 4M 192k",
			"write -P 7 7M 4k",
		}},
		{name: "v2 4k", size: "4M", opts: "compat=0.10,cluster_size=4k", deflate: true, cmds: []string{
			"write -P 1 0 8k", "write -c -P 2 8k 8k", "write -z 64k 4k", "write -P 3 1M 6k", "discard 1M 4k",
		}},
		{name: "extended L2 32k", size: "8M", opts: "cluster_size=32k,extended_l2=on", deflate: true, cmds: []string{
			"write -P 1 0 1k", "write -P 2 5k 3k", "write -z 40k 2k", "write -z -u 64k 32k",
			"write -c -P 3 128k 32k", "write -P 4 200k 32k", "write -z 200k 4k", "write -z 210k 1k",
			"write -P 5 1M 1k", "discard 1M 32k",
		}},
		{name: "extended L2 2M", size: "16M", opts: "cluster_size=2M,extended_l2=on", deflate: true, cmds: []string{
			"write -P 1 0 64k", "write -P 2 130k 64k", "write -z 4M 64k", "write -c -P 3 8M 2M",
		}},
		{name: "512-byte clusters", size: "2M", opts: "cluster_size=512", deflate: true, cmds: []string{
			"write -c -P 7 0 64k", "write -P 1 64k 1k", "write -z 80k 512", "write -c -P 8 100k 512",
		}},
		{name: "2M clusters", size: "16M", opts: "cluster_size=2M", deflate: true, cmds: []string{
			"write -c -P 7 0 2M", "write -P 1 4M 4k", "write -c -P 9 6M 4M",
		}},
		{name: "zstd", size: "4M", opts: "compression_type=zstd", cmds: []string{
			"write -c -P 7 0 256k", "write -P 1 1M 64k",
		}},
		{name: "data file", size: "4M", opts: "cluster_size=64k", dataFile: true, cmds: []string{
			"write -P 1 0 64k", "write -z 128k 64k", "write -P 2 1M 4k",
		}},
		{name: "data file extended L2", size: "4M", opts: "cluster_size=64k,extended_l2=on", dataFile: true, cmds: []string{
			"write -P 1 0 4k", "write -z 128k 8k", "write -P 2 1M 4k",
		}},
		{name: "preallocation=metadata", size: "4M", opts: "preallocation=metadata", cmds: []string{
			"write -P 1 64k 4k",
		}},
		{name: "preallocation=metadata extended L2", size: "4M", opts: "preallocation=metadata,extended_l2=on", cmds: []string{
			"write -P 1 64k 4k",
		}},
	}
}

// TestGoldenMapping writes images with qemu-io and checks, for every
// subcluster, that the types decoded from the L2 entries agree with
// `qemu-img map`, and that the data found through our host offsets
// (including decompressing deflate clusters at the ranges CompressedRange
// returns) equals what `qemu-img convert -O raw` reads.
func TestGoldenMapping(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, sc := range mapScenarios() {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			if strings.Contains(sc.opts, "zstd") {
				requireZstd(t)
			}
			dir := t.TempDir()
			o := sc.opts
			dataPath := filepath.Join(dir, "data.raw")
			if sc.dataFile {
				o += ",data_file=" + dataPath
			}
			p := qemuCreate(t, dir, "t.qcow2", sc.size, "-o", o)
			args := []string{"-f", "qcow2"}
			for _, c := range sc.cmds {
				args = append(args, "-c", c)
			}
			mustRun(t, "qemu-io", append(args, p)...)
			mustRun(t, "qemu-img", "check", "-q", p)

			img := readTestImage(t, p)
			h := img.h
			g := h.Geometry()
			_, visits := walkL1(t, img, h.L1TableOffset, h.L1Size)
			byCluster := map[uint64]l2Visit{}
			for _, v := range visits {
				byCluster[v.guest] = v
			}

			var mp []qemuMapEntry
			if err := json.Unmarshal(mustRun(t, "qemu-img", "map", "--output=json", p), &mp); err != nil {
				t.Fatal(err)
			}
			rawPath := filepath.Join(dir, "out.raw")
			mustRun(t, "qemu-img", "convert", "-O", "raw", p, rawPath)
			raw, err := os.ReadFile(rawPath)
			if err != nil {
				t.Fatal(err)
			}
			hostData := img.data
			if sc.dataFile {
				if hostData, err = os.ReadFile(dataPath); err != nil {
					t.Fatal(err)
				}
			}

			scSize := g.SubclusterSize()
			counts := map[SubclusterType]int{}
			for _, m := range mp {
				for off := m.Start; off < m.Start+m.Length; off += scSize {
					v := byCluster[g.StartOfCluster(off)] // zero value: unallocated
					st := g.SubclusterType(v.e, v.bitmap, g.SubclusterIndex(off))
					counts[st]++
					unalloc := st == SubclusterUnallocatedPlain || st == SubclusterUnallocatedAlloc
					wantData := st == SubclusterNormal || st == SubclusterCompressed
					wantZero := st == SubclusterZeroPlain || st == SubclusterZeroAlloc || unalloc
					// With preallocated metadata QEMU looks into the
					// file for normal clusters and reports zero data
					// as zero too (BDRV_BLOCK_RECURSE).
					zeroOK := m.Zero == wantZero || (st == SubclusterNormal && m.Zero &&
						allZero(raw[off:min(off+scSize, uint64(len(raw)))]))
					if m.Data != wantData || !zeroOK || m.Present == unalloc || st == SubclusterInvalid {
						t.Fatalf("guest %#x: we say %v (entry %#x bitmap %#x), qemu-img map says %+v", off, st, v.e, v.bitmap, m)
					}
					host := HostOffset(v.e) + g.OffsetIntoCluster(off)
					if st == SubclusterNormal || (st == SubclusterZeroAlloc && m.Offset != nil) {
						if m.Offset == nil || *m.Offset+(off-m.Start) != host {
							t.Fatalf("guest %#x: host offset %#x, qemu-img map says %+v", off, host, m)
						}
					}
					want := raw[off:min(off+scSize, uint64(len(raw)))]
					switch st {
					case SubclusterNormal:
						got := hostData[host:min(host+uint64(len(want)), uint64(len(hostData)))]
						if !bytes.Equal(got, want) {
							t.Fatalf("guest %#x: data at host %#x differs from qemu-img convert", off, host)
						}
					case SubclusterZeroPlain, SubclusterZeroAlloc, SubclusterUnallocatedPlain, SubclusterUnallocatedAlloc:
						if !allZero(want) {
							t.Fatalf("guest %#x: %v but qemu-img convert reads data", off, st)
						}
					}
				}
			}
			if sc.deflate {
				checkCompressed(t, img, visits, raw)
			}
			t.Logf("subcluster types: %v", counts)
			// Every scenario must exercise what it was written for.
			if counts[SubclusterNormal] == 0 {
				t.Error("no normal subclusters seen")
			}
			checkRefcounts(t, img)
		})
	}
}

// checkCompressed inflates every compressed cluster from the byte range
// CompressedRange gives and compares it with the guest data.
func checkCompressed(t *testing.T, img testImage, visits []l2Visit, raw []byte) {
	t.Helper()
	g := img.h.Geometry()
	cs := g.ClusterSize()
	n := 0
	for _, v := range visits {
		if g.ClusterType(v.e) != ClusterCompressed || v.guest >= uint64(len(raw)) {
			continue
		}
		off, length := g.CompressedRange(v.e)
		// The last sector of the range may lie beyond the end of the file
		// when it is the last thing written; QEMU reads zeros there.
		end := min(off+length, uint64(len(img.data)))
		zr := flate.NewReader(bytes.NewReader(img.data[off:end]))
		got := make([]byte, cs)
		if _, err := io.ReadFull(zr, got); err != nil {
			t.Fatalf("guest %#x: inflating %#x+%d: %v", v.guest, off, length, err)
		}
		if !bytes.Equal(got, raw[v.guest:v.guest+cs]) {
			t.Fatalf("guest %#x: compressed cluster at %#x+%d inflates to different data", v.guest, off, length)
		}
		n++
	}
	if n == 0 {
		t.Error("scenario has no compressed clusters to check")
	}
}

// checkRefcounts recomputes the references to every host cluster the way
// qemu-img check does and compares them with the refcounts read through the
// refcount table and blocks, and checks the COPIED flags of the active
// tables against them.
func checkRefcounts(t *testing.T, img testImage) {
	t.Helper()
	h := img.h
	g := h.Geometry()
	cs := g.ClusterSize()
	refs := map[uint64]uint64{} // host cluster index -> references
	ref := func(off, length uint64) {
		for c := off / cs; c*cs < off+length; c++ {
			refs[c]++
		}
	}
	ref(0, cs)
	ref(h.RefcountTableOffset, uint64(h.RefcountTableClusters)*cs)

	// Refcounts as stored.
	reftable := img.data[h.RefcountTableOffset : h.RefcountTableOffset+uint64(h.RefcountTableClusters)*cs]
	refcount := func(cluster uint64) uint64 {
		rt, err := TableEntry(reftable, int(g.RefTableIndex(cluster*cs)))
		if err != nil {
			return 0
		}
		rb, err := g.DecodeRefTable(rt, h.RefcountTableOffset, int64(g.RefTableIndex(cluster*cs)))
		if err != nil {
			t.Fatal(err)
		}
		if rb == 0 {
			return 0
		}
		v, err := g.Refcount(img.data[rb:rb+cs], g.RefblockIndex(cluster*cs))
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for i := range len(reftable) / 8 {
		rt, _ := TableEntry(reftable, i)
		rb, err := g.DecodeRefTable(rt, h.RefcountTableOffset, int64(i))
		if err != nil {
			t.Fatal(err)
		}
		if rb != 0 {
			ref(rb, cs)
		}
	}

	walk := func(l1Off uint64, l1Size uint32, active bool) {
		ref(l1Off, uint64(l1Size)*8)
		l2s, visits := walkL1(t, img, l1Off, l1Size)
		for _, l2 := range l2s {
			ref(l2, cs)
		}
		for _, v := range visits {
			switch g.ClusterType(v.e) {
			case ClusterNormal, ClusterZeroAlloc:
				if !h.HasDataFile() {
					ref(HostOffset(v.e), cs)
				}
			case ClusterCompressed:
				off, n := g.CompressedRange(v.e)
				// Only the clusters holding compressed bytes are
				// referenced; the range may end past the data.
				ref(off, min(n, uint64(len(img.data))-off))
			}
		}
		if !active {
			return
		}
		// COPIED must be set exactly on entries with refcount 1.
		defer func() {
			for i := range int(l1Size) {
				e, _ := TableEntry(img.data[l1Off:l1Off+uint64(l1Size)*8], i)
				l2, copied, _ := g.DecodeL1(e, l1Off, int64(i))
				if l2 != 0 && copied != (refcount(l2/cs) == 1) {
					t.Errorf("L1[%d] = %#x: COPIED %v but refcount %d", i, e, copied, refcount(l2/cs))
				}
			}
			for _, v := range visits {
				ct := g.ClusterType(v.e)
				if (ct == ClusterNormal || ct == ClusterZeroAlloc) && !h.HasDataFile() {
					rc := refcount(HostOffset(v.e) / cs)
					if (v.e&OflagCopied != 0) != (rc == 1) {
						t.Errorf("L2 entry %#x (guest %#x): COPIED vs refcount %d", v.e, v.guest, rc)
					}
				}
			}
		}()
	}
	walk(h.L1TableOffset, h.L1Size, true)
	if h.NbSnapshots > 0 {
		snaps, n, err := ParseSnapshotTable(img.data[h.SnapshotsOffset:], h.NbSnapshots, h.Size)
		if err != nil {
			t.Fatal(err)
		}
		ref(h.SnapshotsOffset, uint64(n))
		for _, s := range snaps {
			walk(s.L1TableOffset, s.L1Size, false)
		}
	}
	if h.Crypto != nil {
		ref(h.Crypto.Offset, h.Crypto.Length)
	}
	if h.Bitmaps != nil {
		ref(h.Bitmaps.DirectoryOffset, h.Bitmaps.DirectorySize)
		bms, err := ParseBitmapDirectory(img.data[h.Bitmaps.DirectoryOffset:], *h.Bitmaps, h.ClusterBits, h.Size)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range bms {
			ref(b.TableOffset, uint64(b.TableSize)*8)
			for i := range int(b.TableSize) {
				e, _ := TableEntry(img.data[b.TableOffset:b.TableOffset+uint64(b.TableSize)*8], i)
				if off := e & L2OffsetMask; off != 0 {
					ref(off, cs)
				}
			}
		}
	}

	clusters := (uint64(len(img.data)) + cs - 1) / cs
	nonzero, maxRC := 0, uint64(0)
	for c := range clusters {
		rc := refcount(c)
		maxRC = max(maxRC, rc)
		if rc != refs[c] {
			t.Errorf("host cluster %d (%#x): refcount %d, referenced %d times", c, c*cs, rc, refs[c])
		}
		if rc != 0 {
			nonzero++
		}
	}
	for c := range refs {
		if c >= clusters {
			t.Errorf("host cluster %d referenced beyond end of file", c)
		}
	}
	if nonzero < 3 {
		t.Errorf("only %d clusters have a refcount", nonzero)
	}
	t.Logf("%d-bit refcounts: %d clusters in use, highest refcount %d", g.RefcountBits(), nonzero, maxRC)
}

// TestGoldenRefcounts checks refcount decoding for every refcount width on
// images with internal snapshots (refcounts of 2 and more), bitmaps and
// LUKS.
func TestGoldenRefcounts(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	type rc struct {
		name  string
		o     string
		snaps int
		extra []string
		bmap  bool
	}
	cases := []rc{
		{name: "refcount_bits=1", o: "refcount_bits=1,cluster_size=4k"},
		// Narrow refcounts overflow when snapshots add references to
		// host clusters shared by compressed clusters (QEMU: -EINVAL); the
		// sharing alone gives refcounts above 1.
		{name: "refcount_bits=2", o: "refcount_bits=2,cluster_size=4k"},
		{name: "refcount_bits=4", o: "refcount_bits=4,cluster_size=512"},
		{name: "refcount_bits=8", o: "refcount_bits=8", snaps: 3},
		{name: "refcount_bits=16", o: "refcount_bits=16", snaps: 3, bmap: true},
		{name: "refcount_bits=32", o: "refcount_bits=32,cluster_size=1k", snaps: 2},
		{name: "refcount_bits=64", o: "refcount_bits=64,cluster_size=2M", snaps: 2},
		{name: "v2 snapshots", o: "compat=0.10,cluster_size=4k", snaps: 3},
		{name: "extended L2 snapshots bitmaps", o: "extended_l2=on,cluster_size=16k", snaps: 2, bmap: true},
		{name: "luks", o: "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100",
			extra: []string{"--object", lukssecret}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := qemuCreate(t, dir, "t.qcow2", "16M", append(c.extra, "-o", c.o)...)
			ioArgs := []string{"-f", "qcow2"}
			if c.extra != nil {
				ioArgs = []string{"--object", lukssecret, "--image-opts"}
			}
			target := p
			if c.extra != nil {
				target = "driver=qcow2,file.filename=" + p + ",encrypt.key-secret=sec0"
			}
			io := func(cmds ...string) {
				a := append([]string(nil), ioArgs...)
				for _, cmd := range cmds {
					a = append(a, "-c", cmd)
				}
				mustRun(t, "qemu-io", append(a, target)...)
			}
			io("write -P 1 0 1M", "write -c -P 2 2M 2M", "write -z 4M 64k")
			for i := range c.snaps {
				mustRun(t, "qemu-img", "snapshot", "-c", "s"+string(rune('a'+i)), p)
				io("write -P 3 " + []string{"0", "512k", "2M"}[i%3] + " 128k")
			}
			if c.bmap {
				mustRun(t, "qemu-img", "bitmap", "--add", p, "b0")
				mustRun(t, "qemu-img", "bitmap", "--add", "-g", "1M", p, "b1")
				io("write -P 4 8M 1M") // dirties the enabled bitmaps
			}
			if c.extra != nil {
				mustRun(t, "qemu-img", "check", "-q", "--object", lukssecret, "--image-opts", target)
			} else {
				mustRun(t, "qemu-img", "check", "-q", p)
			}
			img := readTestImage(t, p)
			if c.snaps > 0 && img.h.NbSnapshots != uint32(c.snaps) {
				t.Fatalf("%d snapshots, want %d", img.h.NbSnapshots, c.snaps)
			}
			checkRefcounts(t, img)
		})
	}
}
