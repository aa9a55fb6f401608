package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// goldenCase describes one `qemu-img create` invocation of the golden matrix.
type goldenCase struct {
	name string
	size string
	// args returns the qemu-img create arguments; dir is the test's
	// directory, for backing and data files.
	args func(t *testing.T, dir string) []string
	// after runs extra qemu-img commands on the created image.
	after func(t *testing.T, path string)
	// infoArgs are extra qemu-img info arguments (secrets).
	infoArgs []string
	zstd     bool // needs qemu-img built with zstd
}

func createOpts(o string) func(*testing.T, string) []string {
	return func(*testing.T, string) []string { return []string{"-o", o} }
}

const lukssecret = "secret,id=sec0,data=123456"

func goldenCases() []goldenCase {
	var cs []goldenCase
	for _, c := range []string{"0.10", "1.1"} {
		for _, cl := range []string{"512", "1k", "4k", "64k", "2M"} {
			cs = append(cs, goldenCase{name: "compat=" + c + ",cluster_size=" + cl, size: "1G",
				args: createOpts("compat=" + c + ",cluster_size=" + cl)})
		}
	}
	for _, rb := range []string{"1", "2", "4", "8", "16", "32", "64"} {
		cs = append(cs, goldenCase{name: "refcount_bits=" + rb, size: "100M", args: createOpts("refcount_bits=" + rb)})
	}
	for _, cl := range []string{"16k", "64k", "2M"} {
		cs = append(cs, goldenCase{name: "extended_l2,cluster_size=" + cl, size: "1G",
			args: createOpts("extended_l2=on,cluster_size=" + cl)})
	}
	cs = append(cs,
		goldenCase{name: "lazy_refcounts", size: "1G", args: createOpts("lazy_refcounts=on")},
		goldenCase{name: "zstd", size: "1G", args: createOpts("compression_type=zstd"), zstd: true},
		goldenCase{name: "odd size", size: "1000001536", args: createOpts("cluster_size=4k")},
		goldenCase{name: "zero size", size: "0", args: createOpts("compat=1.1")},
		goldenCase{name: "large 512-byte clusters", size: "100G", args: createOpts("cluster_size=512")},
		goldenCase{name: "large 2M clusters", size: "64T", args: createOpts("cluster_size=2M")},
		goldenCase{name: "preallocation=metadata", size: "10M", args: createOpts("preallocation=metadata")},
		goldenCase{name: "data_file", size: "64M", args: func(t *testing.T, dir string) []string {
			return []string{"-o", "data_file=" + filepath.Join(dir, "data.raw")}
		}},
		goldenCase{name: "data_file_raw", size: "64M", args: func(t *testing.T, dir string) []string {
			return []string{"-o", "data_file=" + filepath.Join(dir, "data.raw") + ",data_file_raw=on"}
		}},
		goldenCase{name: "backing raw", args: func(t *testing.T, dir string) []string {
			base := filepath.Join(dir, "base.raw")
			mustRun(t, "qemu-img", "create", "-q", "-f", "raw", base, "32M")
			return []string{"-b", base, "-F", "raw"}
		}},
		goldenCase{name: "backing qcow2 v2", args: func(t *testing.T, dir string) []string {
			base := qemuCreate(t, dir, "base.qcow2", "32M")
			return []string{"-b", base, "-F", "qcow2", "-o", "compat=0.10"}
		}},
		goldenCase{name: "backing long name 512-byte clusters", args: func(t *testing.T, dir string) []string {
			// 200 characters of name; with 512-byte clusters QEMU omits the
			// feature name table so that the name fits.
			sub := filepath.Join(dir, strings.Repeat("d", 150))
			if err := os.Mkdir(sub, 0o755); err != nil {
				t.Fatal(err)
			}
			base := qemuCreate(t, sub, strings.Repeat("b", 40), "32M")
			return []string{"-b", base, "-F", "qcow2", "-o", "cluster_size=512"}
		}},
		goldenCase{name: "everything", size: "1G", zstd: true, args: func(t *testing.T, dir string) []string {
			base := qemuCreate(t, dir, "base.qcow2", "1G")
			return []string{"-b", base, "-F", "qcow2", "-o",
				"cluster_size=32k,extended_l2=on,lazy_refcounts=on,compression_type=zstd,refcount_bits=64"}
		}},
		goldenCase{name: "snapshots", size: "1G", args: createOpts("compat=1.1"), after: func(t *testing.T, p string) {
			mustRun(t, "qemu-io", "-c", "write -P 1 0 64k", p)
			mustRun(t, "qemu-img", "snapshot", "-c", "first", p)
			mustRun(t, "qemu-io", "-c", "write -P 2 0 128k", p)
			mustRun(t, "qemu-img", "snapshot", "-c", "second snapshot with a longer name", p)
			mustRun(t, "qemu-img", "snapshot", "-c", "3rd", p)
			mustRun(t, "qemu-img", "snapshot", "-d", "second snapshot with a longer name", p)
		}},
		goldenCase{name: "snapshots v2", size: "64M", args: createOpts("compat=0.10,cluster_size=4k"), after: func(t *testing.T, p string) {
			mustRun(t, "qemu-img", "snapshot", "-c", "s1", p)
			mustRun(t, "qemu-img", "snapshot", "-c", "s2", p)
		}},
		goldenCase{name: "bitmaps", size: "1G", args: createOpts("compat=1.1"), after: func(t *testing.T, p string) {
			mustRun(t, "qemu-img", "bitmap", "--add", p, "bm0")
			mustRun(t, "qemu-img", "bitmap", "--add", "--granularity", "512", "--disable", p, "fine")
			mustRun(t, "qemu-img", "bitmap", "--add", "-g", "2M", p, strings.Repeat("n", 300))
		}},
		goldenCase{name: "luks", size: "16M", infoArgs: []string{"--object", lukssecret},
			args: func(t *testing.T, dir string) []string {
				return []string{"--object", lukssecret, "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"}
			}},
		goldenCase{name: "luks 4k clusters", size: "16M", infoArgs: []string{"--object", lukssecret},
			args: func(t *testing.T, dir string) []string {
				return []string{"--object", lukssecret, "-o", "cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"}
			}},
	)
	return cs
}

// TestGoldenHeaders creates images with qemu-img in every option combination
// the project supports and checks ParseHeader against qemu-img info, and
// Marshal against the bytes QEMU wrote.
func TestGoldenHeaders(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, gc := range goldenCases() {
		t.Run(gc.name, func(t *testing.T) {
			t.Parallel()
			if gc.zstd {
				requireZstd(t)
			}
			dir := t.TempDir()
			p := qemuCreate(t, dir, "t.qcow2", gc.size, gc.args(t, dir)...)
			if gc.after != nil {
				gc.after(t, p)
			}
			img := readTestImage(t, p)
			h := img.h
			qi := qemuImgInfo(t, p, gc.infoArgs...)
			checkAgainstInfo(t, img, qi)

			// Marshal must reproduce QEMU's header cluster byte for byte.
			cs := int(h.ClusterSize())
			out, err := h.Marshal(cs)
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			if !bytes.Equal(out, img.data[:cs]) {
				i := 0
				for i < cs && out[i] == img.data[i] {
					i++
				}
				t.Errorf("Marshal differs from qemu-img's header cluster at byte %#x\nqemu: % x\nours: % x",
					i, img.data[i:min(cs, i+32)], out[i:min(cs, i+32)])
			}
			h2, err := ParseHeader(out, int64(len(img.data)))
			if err != nil {
				t.Fatalf("ParseHeader(Marshal): %v", err)
			}
			if !reflect.DeepEqual(h, h2) {
				t.Errorf("round trip changed the header:\n got %+v\nwant %+v", h2, h)
			}
		})
	}
}

func checkAgainstInfo(t *testing.T, img testImage, qi qemuImgInfoJSON) {
	t.Helper()
	h, d := img.h, qi.FormatSpecific.Data
	wantVersion := map[string]uint32{"0.10": 2, "1.1": 3}[d.Compat]
	eq := func(what string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %v, qemu-img info says %v", what, got, want)
		}
	}
	eq("version", h.Version, wantVersion)
	eq("size", h.Size, qi.VirtualSize)
	eq("cluster size", h.ClusterSize(), qi.ClusterSize)
	eq("refcount bits", h.RefcountBits(), d.RefcountBits)
	eq("lazy refcounts", h.LazyRefcounts(), d.LazyRefcounts)
	eq("corrupt", h.Corrupt(), d.Corrupt)
	eq("dirty", h.Dirty(), qi.DirtyFlag)
	if h.Version == 3 {
		eq("extended L2", h.ExtendedL2(), d.ExtendedL2)
		eq("compression type", map[uint8]string{0: "zlib", 1: "zstd"}[h.CompressionType], d.CompressionType)
		eq("data file raw", h.DataFileRaw(), d.DataFileRaw)
	}
	eq("data file", h.DataFile, d.DataFile)
	eq("has data file", h.HasDataFile(), d.DataFile != "")
	eq("backing file", h.BackingFile, qi.BackingFilename)
	eq("backing format", h.BackingFormat, qi.BackingFilenameFormat)
	eq("nb_snapshots", int(h.NbSnapshots), len(qi.Snapshots))
	if d.Encrypt != nil {
		eq("crypt method", h.CryptMethod, uint32(CryptLUKS))
		if h.Crypto == nil || h.Crypto.Length == 0 {
			t.Errorf("LUKS image without a usable crypto header extension: %+v", h.Crypto)
		}
	} else {
		eq("crypt method", h.CryptMethod, uint32(CryptNone))
	}
	if h.Version == 3 && h.ClusterSize() > 4096 {
		eq("feature table", h.FeatureTable, DefaultFeatureTable())
	}
	if len(h.Unknown) != 0 {
		t.Errorf("unexpected unknown extensions %v", h.Unknown)
	}
	if err := h.Geometry().Validate(); err != nil {
		t.Errorf("Geometry().Validate: %v", err)
	}

	// Snapshots, when present.
	if h.NbSnapshots > 0 {
		snaps, n, err := ParseSnapshotTable(img.data[h.SnapshotsOffset:], h.NbSnapshots, h.Size)
		if err != nil {
			t.Fatalf("ParseSnapshotTable: %v", err)
		}
		if err := CheckSnapshots(snaps, h.Geometry(), h.SnapshotsOffset, int64(len(img.data))); err != nil {
			t.Errorf("CheckSnapshots: %v", err)
		}
		for i, s := range snaps {
			q := qi.Snapshots[i]
			eq("snapshot id", s.ID, q.ID)
			eq("snapshot name", s.Name, q.Name)
			eq("snapshot vm state size", s.VMStateSize, q.VMStateSize)
			eq("snapshot date", [2]uint32{s.DateSec, s.DateNsec}, [2]uint32{q.DateSec, q.DateNsec})
			eq("snapshot vm clock", s.VMClockNsec, q.VMClockSec*1e9+q.VMClockNsec)
			eq("snapshot disk size", s.DiskSize, h.Size)
			if q.Icount != nil {
				eq("snapshot icount", s.Icount, *q.Icount)
			}
		}
		out, err := MarshalSnapshotTable(snaps)
		if err != nil {
			t.Fatalf("MarshalSnapshotTable: %v", err)
		}
		if !bytes.Equal(out, img.data[h.SnapshotsOffset:h.SnapshotsOffset+uint64(n)]) {
			t.Errorf("MarshalSnapshotTable differs from qemu-img's table")
		}
	}

	// Bitmaps, when present.
	eq("bitmaps present", h.Bitmaps != nil, len(d.Bitmaps) > 0)
	if h.Bitmaps != nil {
		dir := img.data[h.Bitmaps.DirectoryOffset:]
		bms, err := ParseBitmapDirectory(dir, *h.Bitmaps, h.ClusterBits, h.Size)
		if err != nil {
			t.Fatalf("ParseBitmapDirectory: %v", err)
		}
		eq("bitmap count", len(bms), len(d.Bitmaps))
		for i := range min(len(bms), len(d.Bitmaps)) {
			b, q := bms[i], d.Bitmaps[i]
			eq("bitmap name", b.Name, q.Name)
			eq("bitmap granularity", b.Granularity(), q.Granularity)
			var flags []string
			if b.InUse() {
				flags = append(flags, "in-use")
			}
			if b.Auto() {
				flags = append(flags, "auto")
			}
			eq("bitmap flags", fmt.Sprint(flags), fmt.Sprint(q.Flags))
		}
	}
}

// base returns a valid synthetic header (no qemu-img needed) and its file size.
func baseHeader() (*Header, int64) {
	return &Header{
		Version: 3, ClusterBits: 16, Size: 1 << 30, L1Size: 2, L1TableOffset: 0x30000,
		RefcountTableOffset: 0x10000, RefcountTableClusters: 1, RefcountOrder: 4,
		CompressionType: 0, HeaderTail: make([]byte, 7),
	}, 0x50000
}

func mustMarshalHeader(t testing.TB, h *Header) []byte {
	t.Helper()
	b, err := h.Marshal(int(h.ClusterSize()))
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	return b
}

// ext encodes a raw header extension with padding.
func rawExt(typ uint32, data []byte) []byte {
	b := make([]byte, 8+roundUp8(uint64(len(data))))
	be.PutUint32(b, typ)
	be.PutUint32(b[4:], uint32(len(data)))
	copy(b[8:], data)
	return b
}

// withExts replaces the extension area of a marshaled 112-byte-header image
// with the given raw extensions followed by an end marker.
func withExts(b []byte, exts ...[]byte) {
	clear(b[HeaderLengthV3:])
	off := HeaderLengthV3
	for _, e := range exts {
		off += copy(b[off:], e)
	}
}

func rawFeature(typ, bit byte, name string) []byte {
	e := make([]byte, featureEntrySize)
	e[0], e[1] = typ, bit
	copy(e[2:], name)
	return e
}

func putBE32(b []byte, off int, v uint32) { be.PutUint32(b[off:], v) }
func putBE64(b []byte, off int, v uint64) { be.PutUint64(b[off:], v) }

// TestParseHeaderHostile feeds broken headers to ParseHeader; every one must
// be refused with an error naming the problem, and none may panic.
func TestParseHeaderHostile(t *testing.T) {
	bitmapsExt := func(count, reserved uint32, size, off uint64) []byte {
		d := make([]byte, 24)
		be.PutUint32(d, count)
		be.PutUint32(d[4:], reserved)
		be.PutUint64(d[8:], size)
		be.PutUint64(d[16:], off)
		return rawExt(ExtBitmaps, d)
	}
	cases := []struct {
		name     string
		mutate   func(b []byte) []byte
		fileSize int64 // 0: base size
		want     string
		is       error
	}{
		{"empty", func(b []byte) []byte { return nil }, 0, "truncated", ErrInvalid},
		{"short v2", func(b []byte) []byte { return b[:71] }, 0, "truncated", ErrInvalid},
		{"short v3", func(b []byte) []byte { return b[:100] }, 0, "truncated: 100 bytes", ErrInvalid},
		{"short cluster", func(b []byte) []byte { return b[:4096] }, 0, "extension area ends at 65536", ErrInvalid},
		{"magic", func(b []byte) []byte { b[3] = 0xfc; return b }, 0, "magic 0x514649fc is not a qcow2 image", ErrInvalid},
		{"version 1", func(b []byte) []byte { putBE32(b, 4, 1); return b }, 0, "version 1 not supported", ErrUnsupported},
		{"version 4", func(b []byte) []byte { putBE32(b, 4, 4); return b }, 0, "version 4 not supported", ErrUnsupported},
		{"cluster_bits 8", func(b []byte) []byte { putBE32(b, 20, 8); return b }, 0, "cluster_bits 8 out of range 9..21", ErrInvalid},
		{"cluster_bits 30", func(b []byte) []byte { putBE32(b, 20, 30); return b }, 0, "cluster_bits 30 out of range 9..21", ErrInvalid},
		{"cluster_bits huge", func(b []byte) []byte { putBE32(b, 20, 0xffffffff); return b }, 0, "cluster_bits 4294967295 out of range", ErrInvalid},
		{"header_length 100", func(b []byte) []byte { putBE32(b, 100, 100); return b }, 0, "header_length 100 too short", ErrInvalid},
		{"header_length 108", func(b []byte) []byte { putBE32(b, 100, 108); return b }, 0, "header_length 108 not a multiple of 8", ErrInvalid},
		{"header_length > cluster", func(b []byte) []byte { putBE32(b, 20, 9); putBE32(b, 100, 520); return b }, 0, "header_length 520 exceeds cluster size 512", ErrInvalid},
		{"refcount_order 7", func(b []byte) []byte { putBE32(b, 96, 7); return b }, 0, "refcount_order 7 too large", ErrInvalid},
		{"crypt_method 3", func(b []byte) []byte { putBE32(b, 32, 3); return b }, 0, "crypt_method 3 unknown", ErrUnsupported},
		{"size > int64", func(b []byte) []byte { putBE64(b, 24, 1<<63); return b }, 0, "size 9223372036854775808 too large", ErrInvalid},
		{"l1_size huge", func(b []byte) []byte { putBE32(b, 36, 0xffffffff); return b }, 0, "l1_size 4294967295 too large", ErrInvalid},
		{"l1_size just over limit", func(b []byte) []byte { putBE32(b, 36, 4<<20+1); return b }, 0, "l1_size 4194305 too large", ErrInvalid},
		{"l1 unaligned", func(b []byte) []byte { putBE64(b, 40, 0x30200); return b }, 0, "l1_table_offset 0x30200 not aligned", ErrInvalid},
		{"l1 beyond 2^56", func(b []byte) []byte { putBE64(b, 40, 1<<56); return b }, 0, "beyond the 2^56 offset limit", ErrInvalid},
		{"l1 offset overflow", func(b []byte) []byte { putBE64(b, 40, 0xffffffffffff0000); return b }, 0, "l1_table_offset", ErrInvalid},
		{"l1 at 0", func(b []byte) []byte { putBE64(b, 40, 0); return b }, 0, "l1_table_offset 0 overlaps the header", ErrInvalid},
		{"l1 beyond EOF", func(b []byte) []byte { putBE64(b, 40, 0x50000); return b }, 0, "beyond end of file", ErrInvalid},
		{"l1 too small", func(b []byte) []byte { putBE64(b, 24, 1<<40); return b }, 0, "l1_size 2 too small for virtual size 1099511627776 (need 2048 entries)", ErrInvalid},
		{"no refcount table", func(b []byte) []byte { putBE32(b, 56, 0); return b }, 0, "refcount_table_clusters 0", ErrInvalid},
		{"refcount table huge", func(b []byte) []byte { putBE32(b, 56, 129); return b }, 0, "refcount_table_clusters 129 too large", ErrInvalid},
		{"refcount table unaligned", func(b []byte) []byte { putBE64(b, 48, 0x10008); return b }, 0, "refcount_table_offset 0x10008 not aligned", ErrInvalid},
		{"refcount table beyond EOF", func(b []byte) []byte { putBE32(b, 56, 5); return b }, 0, "refcount_table_offset 0x10000: table ends at 0x60000, beyond end of file", ErrInvalid},
		{"too many snapshots", func(b []byte) []byte { putBE32(b, 60, 65537); putBE64(b, 64, 0x40000); return b }, 0, "nb_snapshots 65537 too large", ErrInvalid},
		{"snapshots unaligned", func(b []byte) []byte { putBE64(b, 64, 0x40001); return b }, 0, "snapshots_offset 0x40001 not aligned", ErrInvalid},
		{"snapshots at 0", func(b []byte) []byte { putBE32(b, 60, 1); return b }, 0, "snapshots_offset 0 overlaps the header", ErrInvalid},
		{"backing offset beyond cluster", func(b []byte) []byte { putBE64(b, 8, 0x10001); putBE32(b, 16, 4); return b }, 0, "backing_file_offset 0x10001 beyond the header cluster", ErrInvalid},
		{"backing offset inside header", func(b []byte) []byte { putBE64(b, 8, 64); putBE32(b, 16, 4); return b }, 0, "backing_file_offset 0x40 overlaps the header", ErrInvalid},
		{"backing name 1024", func(b []byte) []byte { putBE64(b, 8, 0x1000); putBE32(b, 16, 1024); return b }, 0, "backing_file_size 1024 too long", ErrInvalid},
		{"backing name crosses cluster", func(b []byte) []byte { putBE64(b, 8, 0xfff0); putBE32(b, 16, 17); return b }, 0, "backing_file_size 17 too long (maximum 16", ErrInvalid},
		{"zstd without bit", func(b []byte) []byte { b[104] = 1; return b }, 0, "compression_type 1 without the compression type incompatible bit", ErrInvalid},
		{"bit without zstd", func(b []byte) []byte { putBE64(b, 72, IncompatCompression); return b }, 0, "compression type bit set but compression_type is 0", ErrInvalid},
		{"compression type 2", func(b []byte) []byte { b[104] = 2; putBE64(b, 72, IncompatCompression); return b }, 0, "compression_type 2 unknown", ErrUnsupported},
		{"v2 ignores compression byte", func(b []byte) []byte {
			putBE32(b, 4, 2)
			putBE32(b, 20, 12)
			putBE64(b, 24, 1<<20)
			clear(b[72:80]) // v2 extensions start here: end marker
			b[104] = 7
			return b[:4096]
		}, 0, "", nil},
		{"extended L2 with 8k clusters", func(b []byte) []byte { putBE32(b, 20, 13); putBE64(b, 72, IncompatExtendedL2); return b[:8192] }, 0, "cluster_bits 13 too small for extended L2", ErrInvalid},
		{"unknown incompatible bit named", func(b []byte) []byte {
			putBE64(b, 72, 1<<5|1<<9)
			withExts(b, rawExt(ExtFeatureTable, bytes.Join([][]byte{rawFeature(0, 5, "zoned"), rawFeature(1, 9, "not this one")}, nil)))
			return b
		}, 0, "Unsupported qcow2 feature(s): zoned, Unknown incompatible feature: 200", ErrUnsupported},
		{"unknown incompatible bit unnamed", func(b []byte) []byte { putBE64(b, 72, 1<<31); return b }, 0,
			"Unsupported qcow2 feature(s): Unknown incompatible feature: 80000000", ErrUnsupported},
		{"unknown incompatible bits with garbage table", func(b []byte) []byte {
			putBE64(b, 72, 1<<63)
			withExts(b, rawExt(ExtFeatureTable, []byte{0, 200, 'x'}))
			return b
		}, 0, "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000", ErrUnsupported},
		{"extension too long", func(b []byte) []byte {
			withExts(b, rawExt(0x6803f857, nil))
			putBE32(b, 116, 900)
			putBE64(b, 8, 0x300)
			putBE32(b, 16, 1)
			return b
		}, 0, "extension 0x6803f857 length 900 exceeds header", ErrInvalid},
		{"extension length 4G", func(b []byte) []byte { withExts(b, rawExt(0x12345678, nil)); putBE32(b, 116, 0xffffffff); return b }, 0, "length 4294967295 exceeds header", ErrInvalid},
		{"extension overlaps backing name", func(b []byte) []byte {
			withExts(b, rawExt(ExtBackingFormat, []byte("raw")))
			putBE64(b, 8, 0x78)
			putBE32(b, 16, 8)
			return b
		}, 0, "extension 0xe2792aca length 3 exceeds header (0 bytes left before 0x78)", ErrInvalid},
		{"extension header crosses area end", func(b []byte) []byte {
			withExts(b, rawExt(0x99, []byte("12345678")))
			putBE64(b, 8, 0x80+4)
			putBE32(b, 16, 4)
			b[0x80] = 1
			return b
		}, 0, "extension header at 0x80 crosses the end of the extension area", ErrInvalid},
		{"duplicate backing format", func(b []byte) []byte {
			withExts(b, rawExt(ExtBackingFormat, []byte("raw")), rawExt(ExtBackingFormat, []byte("qcow2")))
			return b
		}, 0, "extension 0xe2792aca appears more than once", ErrInvalid},
		{"duplicate feature table", func(b []byte) []byte {
			withExts(b, rawExt(ExtFeatureTable, nil), rawExt(ExtFeatureTable, nil))
			return b
		}, 0, "extension 0x6803f857 appears more than once", ErrInvalid},
		{"backing format too long", func(b []byte) []byte { withExts(b, rawExt(ExtBackingFormat, []byte("0123456789abcdef"))); return b }, 0,
			"length 16 too long for a format name", ErrInvalid},
		{"end marker with length", func(b []byte) []byte { withExts(b, rawExt(ExtEnd, []byte{1})); return b }, 0, "end marker has length 1", ErrInvalid},
		{"feature table length 47", func(b []byte) []byte { withExts(b, rawExt(ExtFeatureTable, make([]byte, 47))); return b }, 0,
			"length 47 not a multiple of 48", ErrInvalid},
		{"feature type 3", func(b []byte) []byte { withExts(b, rawExt(ExtFeatureTable, rawFeature(3, 0, "x"))); return b }, 0,
			"entry 0: feature type 3 unknown", ErrInvalid},
		{"feature bit 64", func(b []byte) []byte { withExts(b, rawExt(ExtFeatureTable, rawFeature(0, 64, "x"))); return b }, 0,
			"entry 0: bit 64 out of range 0..63", ErrInvalid},
		{"feature name garbage after NUL", func(b []byte) []byte {
			f := rawFeature(1, 3, "abc")
			f[20] = 'z'
			withExts(b, rawExt(ExtFeatureTable, f))
			return b
		}, 0, "entry 0: name not zero padded", ErrInvalid},
		{"feature empty name", func(b []byte) []byte { withExts(b, rawExt(ExtFeatureTable, rawFeature(1, 3, ""))); return b }, 0,
			"entry 0: empty name for type 1 bit 3", ErrInvalid},
		{"feature named twice", func(b []byte) []byte {
			withExts(b, rawExt(ExtFeatureTable, append(rawFeature(2, 7, "a"), rawFeature(2, 7, "b")...)))
			return b
		}, 0, "entry 1: type 2 bit 7 named twice", ErrInvalid},
		{"bitmaps ext length", func(b []byte) []byte {
			putBE64(b, 88, AutoclearBitmaps)
			withExts(b, rawExt(ExtBitmaps, make([]byte, 16)))
			return b
		}, 0,
			"extension 0x23852875 length 16, want 24", ErrInvalid},
		{"bitmaps reserved", func(b []byte) []byte {
			putBE64(b, 88, AutoclearBitmaps)
			withExts(b, bitmapsExt(1, 1, 32, 0x40000))
			return b
		}, 0,
			"reserved field is 0x1", ErrInvalid},
		{"bitmaps zero count", func(b []byte) []byte {
			putBE64(b, 88, AutoclearBitmaps)
			withExts(b, bitmapsExt(0, 0, 32, 0x40000))
			return b
		}, 0,
			"nb_bitmaps is 0", ErrInvalid},
		{"bitmaps too many", func(b []byte) []byte {
			putBE64(b, 88, AutoclearBitmaps)
			withExts(b, bitmapsExt(65536, 0, 32<<20, 0x40000))
			return b
		}, 0,
			"nb_bitmaps 65536 exceeds", ErrInvalid},
		{"bitmaps dir unaligned", func(b []byte) []byte {
			putBE64(b, 88, AutoclearBitmaps)
			withExts(b, bitmapsExt(1, 0, 32, 0x40008))
			return b
		}, 0,
			"bitmap directory offset 0x40008 not aligned", ErrInvalid},
		{"bitmaps dir huge", func(b []byte) []byte {
			putBE64(b, 88, AutoclearBitmaps)
			withExts(b, bitmapsExt(1, 0, 1<<40, 0x40000))
			return b
		}, 0,
			"bitmap_directory_size 1099511627776 exceeds", ErrInvalid},
		{"bitmaps dir beyond EOF", func(b []byte) []byte {
			putBE64(b, 88, AutoclearBitmaps)
			withExts(b, bitmapsExt(1, 0, 32, 0x50000))
			return b
		}, 0,
			"beyond end of file", ErrInvalid},
		{"bitmaps ignored without autoclear bit", func(b []byte) []byte { withExts(b, bitmapsExt(0, 5, 1<<40, 3)); return b }, 0, "", nil},
		{"crypto ext without LUKS", func(b []byte) []byte { withExts(b, rawExt(ExtCryptoHeader, make([]byte, 16))); return b }, 0,
			"extension 0x0537be77 present but crypt_method is 0", ErrInvalid},
		{"crypto ext unaligned", func(b []byte) []byte {
			putBE32(b, 32, CryptLUKS)
			d := make([]byte, 16)
			be.PutUint64(d, 0x40010)
			withExts(b, rawExt(ExtCryptoHeader, d))
			return b
		}, 0, "encryption header offset 0x40010 not aligned", ErrInvalid},
		{"crypto ext overflow", func(b []byte) []byte {
			putBE32(b, 32, CryptLUKS)
			d := make([]byte, 16)
			be.PutUint64(d, 0x40000)
			be.PutUint64(d[8:], 1<<63)
			withExts(b, rawExt(ExtCryptoHeader, d))
			return b
		}, -1, "out of range", ErrInvalid},
		{"LUKS without crypto ext", func(b []byte) []byte { putBE32(b, 32, CryptLUKS); return b }, 0, "crypt_method 2 (LUKS) without", ErrInvalid},
		{"data_file_raw without data file", func(b []byte) []byte { putBE64(b, 88, AutoclearDataFileRaw); return b }, 0,
			"raw external data bit without the external data file bit", ErrInvalid},
		{"data file with snapshots", func(b []byte) []byte {
			putBE64(b, 72, IncompatDataFile)
			putBE32(b, 60, 1)
			putBE64(b, 64, 0x40000)
			return b
		}, 0,
			"internal snapshots are not allowed with an external data file", ErrInvalid},
		{"data_file_raw with backing", func(b []byte) []byte {
			putBE64(b, 72, IncompatDataFile)
			putBE64(b, 88, AutoclearDataFileRaw)
			putBE64(b, 8, 0x200)
			putBE32(b, 16, 4)
			copy(b[0x200:], "base")
			return b
		}, 0, "backing files are incompatible with raw external data files", ErrInvalid},
		{"backing name beyond buffer", func(b []byte) []byte { putBE64(b, 8, 0x8000); putBE32(b, 16, 100); return b[:0x8010] }, 0,
			"backing file name ends at 32868", ErrInvalid},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h, size := baseHeader()
			b := c.mutate(mustMarshalHeader(t, h))
			if c.fileSize != 0 {
				size = c.fileSize
			}
			got, err := ParseHeader(b, size)
			if c.want == "" {
				if err != nil {
					t.Fatalf("want success, got %v", err)
				}
				if got == nil {
					t.Fatal("nil header")
				}
				return
			}
			if err == nil {
				t.Fatalf("want error %q, got header %+v", c.want, got)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not contain %q", err, c.want)
			}
			if !errors.Is(err, c.is) {
				t.Errorf("error %q does not match %v", err, c.is)
			}
		})
	}
}

// TestParseHeaderKeepsUnknown checks that unknown extensions, unknown
// additional header fields, unknown compatible and autoclear bits and
// foreign feature names survive a Parse/Marshal round trip.
func TestParseHeaderKeepsUnknown(t *testing.T) {
	h, size := baseHeader()
	h.HeaderTail = []byte{0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb, 0xcc, 0, 0, 0, 0, 0xdd} // header_length 120
	h.CompatibleFeatures = 1<<0 | 1<<40
	h.AutoclearFeatures = 1 << 17
	h.Unknown = []Extension{{0x12345678, []byte("first")}, {0xabcdef01, []byte{}}, {0x12345678, []byte("again, kept twice")}}
	h.FeatureTable = append(DefaultFeatureTable(), FeatureName{FeatureCompatible, 40, "future compat"})
	h.BackingFile = "base.img"
	h.BackingFormat = "qcow2"
	b := mustMarshalHeader(t, h)
	if hl := be.Uint32(b[100:]); hl != 120 {
		t.Errorf("header_length %d, want 120", hl)
	}
	got, err := ParseHeader(b, size)
	if err != nil {
		t.Fatal(err)
	}
	h.HeaderLength = 120
	h.BackingFileOffset = uint64(be.Uint64(b[8:]))
	h.BackingFileSize = 8
	if !reflect.DeepEqual(got, h) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, h)
	}
	if n := got.FeatureNameFor(FeatureCompatible, 40); n != "future compat" {
		t.Errorf("FeatureNameFor = %q", n)
	}
	if n := got.FeatureNameFor(FeatureIncompatible, 4); n != "extended L2 entries" {
		t.Errorf("FeatureNameFor = %q", n)
	}
}

// TestParseHeaderV3Short accepts a 104-byte version 3 header (no
// compression_type field) and the end of the area without an end marker.
func TestParseHeaderV3Short(t *testing.T) {
	h, size := baseHeader()
	b := mustMarshalHeader(t, h)
	putBE32(b, 100, 104)
	clear(b[104:])
	got, err := ParseHeader(b, size)
	if err != nil {
		t.Fatal(err)
	}
	if got.HeaderLength != 104 || got.CompressionType != 0 || got.HeaderTail != nil {
		t.Errorf("got %+v", got)
	}
	// Extension area filled exactly by one extension, no end marker.
	b = mustMarshalHeader(t, h)
	withExts(b, rawExt(0x42, make([]byte, 0x10000-112-8)))
	got, err = ParseHeader(b, size)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Unknown) != 1 || len(got.Unknown[0].Data) != 0x10000-120 {
		t.Errorf("unknown extensions %d", len(got.Unknown))
	}
}

// TestMarshalErrors checks that Marshal refuses headers it cannot write.
func TestMarshalErrors(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(h *Header)
		cs     int
		want   string
	}{
		{"cluster size mismatch", func(h *Header) {}, 4096, "does not match cluster size 4096"},
		{"bad cluster bits", func(h *Header) { h.ClusterBits = 22 }, 1 << 22, "cluster_bits 22 out of range"},
		{"v2 features", func(h *Header) { h.Version = 2; h.HeaderTail = nil; h.CompatibleFeatures = 1 }, 0, "2 cannot store feature bits"},
		{"v2 refcount order", func(h *Header) { h.Version = 2; h.HeaderTail = nil; h.RefcountOrder = 3 }, 0, "version 2 requires 4"},
		{"version 5", func(h *Header) { h.Version = 5 }, 0, "version 5 not supported"},
		{"backing name too long", func(h *Header) { h.BackingFile = strings.Repeat("x", 1024) }, 0, "backing_file_size 1024 too long"},
		{"extensions overflow cluster", func(h *Header) {
			h.ClusterBits = 9
			h.L1TableOffset, h.RefcountTableOffset = 0x600, 0x200
			h.L1Size = 1 << 16
			h.Unknown = []Extension{{1, make([]byte, 400)}}
		}, 512, "extension 0x00000000 length 0 does not fit"},
		{"backing name does not fit", func(h *Header) {
			h.ClusterBits = 9
			h.L1TableOffset, h.RefcountTableOffset = 0x600, 0x200
			h.L1Size = 1 << 16
			h.BackingFile = strings.Repeat("y", 393)
		}, 512, "backing_file_size 393 too long (maximum 1023, 392 bytes left"},
		{"invalid result", func(h *Header) { h.L1Size = 1 }, 0, "l1_size 1 too small"},
		{"format name too long", func(h *Header) { h.BackingFormat = "0123456789abcdef" }, 0, "too long for a format name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h, _ := baseHeader()
			c.mutate(h)
			cs := c.cs
			if cs == 0 {
				cs = 1 << 16
			}
			_, err := h.Marshal(cs)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Marshal error %v, want %q", err, c.want)
			}
		})
	}
}

// TestMarshalAcceptedByQemu rewrites the header of a qemu-img testImage with
// Marshal (new backing file, unknown extension, extra header fields) and
// checks that qemu-img accepts it, reports the new values, and preserves the
// unknown extension across its own header rewrite (qemu-img amend).
func TestMarshalAcceptedByQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	baseImg := qemuCreate(t, dir, "base.qcow2", "64M")
	p := qemuCreate(t, dir, "t.qcow2", "64M")
	img := readTestImage(t, p)
	h := img.h
	h.BackingFile = baseImg
	h.BackingFormat = "qcow2"
	h.Unknown = []Extension{{0x7e57e570, []byte("kept by qemu")}, {0x7e57e571, []byte("me too")}}
	h.HeaderTail = append(make([]byte, 7), 0, 0, 0, 0, 0, 0, 0, 0) // an unknown 8-byte field, zero
	b := mustMarshalHeader(t, h)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()

	qi := qemuImgInfo(t, p)
	if qi.BackingFilename != baseImg || qi.BackingFilenameFormat != "qcow2" {
		t.Errorf("qemu-img info: backing %q fmt %q", qi.BackingFilename, qi.BackingFilenameFormat)
	}
	mustRun(t, "qemu-img", "check", "-q", p)

	// QEMU rewrites the header on amend; our unknown extension and the
	// extra header field must survive it.
	mustRun(t, "qemu-img", "amend", "-o", "lazy_refcounts=on", p)
	h2 := readTestImage(t, p).h
	if !h2.LazyRefcounts() {
		t.Error("amend did not set lazy refcounts")
	}
	// QEMU 7.2 keeps unknown extensions but reverses their order on every
	// header rewrite (it prepends each to a list while reading); Marshal
	// keeps the on-disk order.
	if len(h2.Unknown) != 2 || string(h2.Unknown[0].Data) != "me too" || string(h2.Unknown[1].Data) != "kept by qemu" {
		t.Errorf("unknown extensions after qemu-img amend: %+v", h2.Unknown)
	}
	if h2.HeaderLength != 120 {
		t.Errorf("header_length after amend %d, want 120", h2.HeaderLength)
	}
}

// TestQemuRefusesWhatWeRefuse spot-checks that qemu-img refuses some
// headers ParseHeader refuses, with the same unsupported-feature message.
func TestQemuRefusesWhatWeRefuse(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	p := qemuCreate(t, dir, "t.qcow2", "64M")
	img := readTestImage(t, p)
	b := img.data[:img.h.ClusterSize()]
	putBE64(b, 72, 1<<31)
	if err := os.WriteFile(p, img.data, 0o644); err != nil {
		t.Fatal(err)
	}
	_, ourErr := ParseHeader(b, int64(len(img.data)))
	out, err := tryRun("qemu-img", "info", p)
	if err == nil {
		t.Fatalf("qemu-img accepted an unknown incompatible bit:\n%s", out)
	}
	if ourErr == nil || !strings.Contains(out, ourErr.Error()) {
		t.Errorf("qemu-img says %q, we say %v", out, ourErr)
	}
}

// TestQemuAgreement applies header mutations to a qemu-img image and
// records whether qemu-img 7.2 opens the result, next to what ParseHeader
// says. Where ParseHeader is deliberately stricter than QEMU the case says
// so; every other case must agree.
func TestQemuAgreement(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	cases := []struct {
		name     string
		mutate   func(b []byte)
		stricter bool // we refuse, QEMU opens
	}{
		{"unchanged", func(b []byte) {}, false},
		{"cluster_bits 22", func(b []byte) { putBE32(b, 20, 22) }, false},
		{"header_length 96", func(b []byte) { putBE32(b, 100, 96) }, false},
		{"header_length not a multiple of 8", func(b []byte) {
			// The extension area then starts at 108; put an end marker there.
			putBE32(b, 100, 108)
			clear(b[104:0x200])
		}, true},
		{"refcount_order 7", func(b []byte) { putBE32(b, 96, 7) }, false},
		{"zstd without the incompatible bit", func(b []byte) { b[104] = 1 }, false},
		{"compression bit without zstd", func(b []byte) { putBE64(b, 72, IncompatCompression) }, false},
		{"unknown incompatible bit", func(b []byte) { putBE64(b, 72, 1<<20) }, false},
		{"unknown compatible bit", func(b []byte) { putBE64(b, 80, 1<<20) }, false},
		{"L1 table too small", func(b []byte) { putBE32(b, 36, 0) }, false},
		{"L1 table unaligned", func(b []byte) { putBE64(b, 40, 0x30008) }, false},
		{"L1 table beyond end of file", func(b []byte) { putBE64(b, 40, 0x100000) }, true},
		{"no refcount table", func(b []byte) { putBE32(b, 56, 0) }, false},
		{"snapshot table unaligned", func(b []byte) { putBE64(b, 64, 0x100) }, false},
		// Only qemu-img info opens it: QEMU checks data-file-raw when it
		// opens the data file, which info skips; qemu-io and qemu-img check
		// refuse with "data-file-raw requires a data file".
		{"raw data file bit without data file", func(b []byte) { putBE64(b, 88, AutoclearDataFileRaw) }, true},
		{"end marker with a length", func(b []byte) { putBE32(b, 0x1f8+4, 8) }, true},
		{"feature table entry with bit 64", func(b []byte) { b[0x78+1] = 64 }, true},
		{"feature table length not a multiple of 48", func(b []byte) { putBE32(b, 0x74, 0x180-8) }, true},
		{"backing file name too long", func(b []byte) { putBE64(b, 8, 0x200); putBE32(b, 16, 1024) }, false},
		{"backing file offset inside the header", func(b []byte) { putBE64(b, 8, 0x40); putBE32(b, 16, 3) }, true},
		{"extension longer than the header cluster", func(b []byte) { putBE32(b, 0x74, 0x10000) }, false},
	}
	dir := t.TempDir()
	orig := readTestImage(t, qemuCreate(t, dir, "orig.qcow2", "64M"))
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := bytes.Clone(orig.data)
			c.mutate(data)
			p := filepath.Join(dir, fmt.Sprintf("m%d.qcow2", i))
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Fatal(err)
			}
			_, ourErr := ParseHeader(data[:orig.h.ClusterSize()], int64(len(data)))
			out, qemuErr := tryRun("qemu-img", "info", p)
			switch {
			case c.stricter && (ourErr == nil || qemuErr != nil):
				t.Errorf("expected ParseHeader to refuse and qemu-img to accept: ours %v, qemu-img %v %s", ourErr, qemuErr, out)
			case !c.stricter && (ourErr == nil) != (qemuErr == nil):
				t.Errorf("disagreement: ours %v, qemu-img %v %s", ourErr, qemuErr, out)
			}
			if ourErr != nil {
				t.Logf("ours: %v", ourErr)
			}
			if qemuErr != nil {
				t.Logf("qemu-img: %s", strings.TrimSpace(out))
			}
		})
	}
}
