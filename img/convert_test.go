package img

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

func defaultConvertOptions(src []string, dst string) ConvertOptions {
	return ConvertOptions{
		Sources: src, Target: dst, TargetFormat: "raw",
		SparseSize: DefaultSparseSize, Coroutines: DefaultCoroutines,
		SourceCache: bdrv.CacheWriteback, TargetCache: bdrv.CacheUnsafe,
	}
}

// withZeroRun is an image whose data extent holds a run of zeros that
// block status cannot see (it is allocated): only -S finds it.
func withZeroRun(t *testing.T, dir, name string, size, zeroOff, zeroLen int64) string {
	t.Helper()
	path, content := image{size: size, extents: [][2]int64{{0, size}}}.make(t, dir, name)
	clear(content[zeroOff : zeroOff+zeroLen])
	if err := os.WriteFile(path, content, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestConvertMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	sparse, _ := image{size: 64 << 20}.make(t, dir, "sparse.raw")
	full, _ := image{size: 8 << 20, extents: [][2]int64{{0, 8 << 20}}}.make(t, dir, "full.raw")
	holes, _ := image{size: 64 << 20, extents: [][2]int64{{0, 4096}, {1 << 20, 3 << 20}, {(40 << 20) + 512, 65536}, {(64 << 20) - 4096, 4096}}}.make(t, dir, "holes.raw")
	odd, _ := image{size: 100000, extents: [][2]int64{{0, 100000}}}.make(t, dir, "odd.raw")
	zeroRun := withZeroRun(t, dir, "zerorun.raw", 4<<20, 1<<20, 64<<10)
	smallRun := withZeroRun(t, dir, "smallrun.raw", 4<<20, (1<<20)+512, 8<<10)

	for _, tc := range []struct {
		name    string
		srcs    []string
		flags   []string
		mutate  func(*ConvertOptions)
		noAlloc bool // allocation may legitimately differ (cache=none alignment)
	}{
		{name: "sparse", srcs: []string{sparse}},
		{name: "full", srcs: []string{full}},
		{name: "holes", srcs: []string{holes}},
		{name: "holes -S 0", srcs: []string{holes}, flags: []string{"-S", "0"}, mutate: func(o *ConvertOptions) { o.SparseSize = 0 }},
		{name: "holes -S 64k", srcs: []string{holes}, flags: []string{"-S", "64k"}, mutate: func(o *ConvertOptions) { o.SparseSize = 64 << 10 }},
		{name: "holes -m 1", srcs: []string{holes}, flags: []string{"-m", "1"}, mutate: func(o *ConvertOptions) { o.Coroutines = 1 }},
		{name: "holes -W", srcs: []string{holes}, flags: []string{"-W"}, mutate: func(o *ConvertOptions) { o.OutOfOrder = true }},
		{name: "holes -t none", srcs: []string{holes}, flags: []string{"-t", "none"}, mutate: func(o *ConvertOptions) { o.TargetCache = bdrv.CacheNone }, noAlloc: true},
		{name: "holes -T none", srcs: []string{holes}, flags: []string{"-T", "none"}, mutate: func(o *ConvertOptions) { o.SourceCache = bdrv.CacheNone }},
		{name: "odd size", srcs: []string{odd}},
		{name: "zero run", srcs: []string{zeroRun}},
		{name: "zero run -S 0", srcs: []string{zeroRun}, flags: []string{"-S", "0"}, mutate: func(o *ConvertOptions) { o.SparseSize = 0 }},
		{name: "zero run -S 128k", srcs: []string{zeroRun}, flags: []string{"-S", "128k"}, mutate: func(o *ConvertOptions) { o.SparseSize = 128 << 10 }},
		{name: "small run", srcs: []string{smallRun}},
		{name: "concatenated", srcs: []string{odd, holes, full}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ours := filepath.Join(dir, "ours.raw")
			theirs := filepath.Join(dir, "theirs.raw")
			opts := defaultConvertOptions(tc.srcs, ours)
			if tc.mutate != nil {
				tc.mutate(&opts)
			}
			if err := runCo(t, func(co *coroutine.Co) error { return Convert(co, opts) }); err != nil {
				t.Fatal(err)
			}
			args := append([]string{"convert", "-O", "raw"}, tc.flags...)
			args = append(append(args, tc.srcs...), theirs)
			if _, errs, code := qemuImg(t, args...); code != 0 {
				t.Fatalf("qemu-img %v: %s", args, errs)
			}
			out, errs, code := qemuImg(t, "compare", "-f", "raw", "-F", "raw", ours, theirs)
			if code != 0 {
				t.Errorf("qemu-img compare: exit %d: %s%s", code, out, errs)
			}
			ourSize, _ := os.Stat(ours)
			theirSize, _ := os.Stat(theirs)
			if ourSize.Size() != theirSize.Size() {
				t.Errorf("size %d, qemu-img's %d", ourSize.Size(), theirSize.Size())
			}
			// qemu-img allocates the first block of every file it
			// creates (file-posix's allocate_first_block); apart from
			// that the sparse layout must be the same.
			a, b := allocatedBytes(t, ours), allocatedBytes(t, theirs)
			if !tc.noAlloc && a != b && (b-a != 4096) {
				t.Errorf("allocated %d bytes, qemu-img %d", a, b)
			}
		})
	}
}

func TestConvertSparseSize(t *testing.T) {
	dir := t.TempDir()
	src := withZeroRun(t, dir, "src.raw", 8<<20, 2<<20, 1<<20)
	for _, tc := range []struct {
		sparse int64
		want   int64 // allocated bytes of the output
	}{
		{0, 8 << 20},
		{4096, 7 << 20},
		{1 << 20, 7 << 20},
		{2 << 20, 8 << 20},
	} {
		t.Run(fmt.Sprint("S=", tc.sparse), func(t *testing.T) {
			dst := filepath.Join(dir, "dst.raw")
			opts := defaultConvertOptions([]string{src}, dst)
			opts.SparseSize = tc.sparse
			if err := runCo(t, func(co *coroutine.Co) error { return Convert(co, opts) }); err != nil {
				t.Fatal(err)
			}
			if got := allocatedBytes(t, dst); got != tc.want {
				t.Errorf("-S %d: %d bytes allocated, want %d", tc.sparse, got, tc.want)
			}
		})
	}
}

func TestConvertErrors(t *testing.T) {
	dir := t.TempDir()
	src, _ := image{size: 1 << 20, extents: [][2]int64{{0, 4096}}}.make(t, dir, "src.raw")
	for _, tc := range []struct {
		name   string
		mutate func(*ConvertOptions)
		want   string
	}{
		{"missing source", func(o *ConvertOptions) { o.Sources = []string{filepath.Join(dir, "nope")} },
			"Could not open '" + filepath.Join(dir, "nope") + "': No such file or directory"},
		{"unknown format", func(o *ConvertOptions) { o.TargetFormat = "bogus" }, "Unknown file format 'bogus'"},
		{"bad option", func(o *ConvertOptions) { o.Options = bdrv.Options{"bogus": "1"} }, "Invalid parameter 'bogus'"},
		{"compress raw", func(o *ConvertOptions) { o.Compress = true }, "Compression not supported for this file format"},
		{"target dir missing", func(o *ConvertOptions) { o.Target = filepath.Join(dir, "no/dir/out.raw") },
			filepath.Join(dir, "no/dir/out.raw") + ": error while converting raw: Could not create '" + filepath.Join(dir, "no/dir/out.raw") + "': No such file or directory"},
		{"sparse size", func(o *ConvertOptions) { o.SparseSize = 100 },
			"Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output)."},
		{"no-create smaller", func(o *ConvertOptions) {
			small, _ := image{size: 4096}.make(t, dir, "small.raw")
			o.Target, o.NoCreate = small, true
		}, "output file is smaller than input file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(dir, "out.raw")
			opts := defaultConvertOptions([]string{src}, dst)
			tc.mutate(&opts)
			err := runCo(t, func(co *coroutine.Co) error { return Convert(co, opts) })
			if err == nil || err.Error() != tc.want {
				t.Fatalf("got %v\nwant %s", err, tc.want)
			}
			if _, err := os.Stat(dst); err == nil {
				t.Errorf("%s exists after a failed convert", dst)
			}
		})
	}
}

// TestConvertENOSPC fills a small tmpfs: the error names the offset and
// ENOSPC, and the partial target is gone.
func TestConvertENOSPC(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	src, _ := image{size: 4 << 20, extents: [][2]int64{{0, 4 << 20}}}.make(t, dir, "src.raw")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v: %s", err, out)
	}
	defer exec.Command("umount", mnt).Run()
	dst := filepath.Join(mnt, "out.raw")
	for _, cache := range []bdrv.CacheMode{bdrv.CacheUnsafe, bdrv.CacheWriteback} {
		opts := defaultConvertOptions([]string{src}, dst)
		opts.TargetCache = cache
		err := runCo(t, func(co *coroutine.Co) error { return Convert(co, opts) })
		if !errors.Is(err, unix.ENOSPC) {
			t.Fatalf("cache=%v: got %v, want ENOSPC", cache, err)
		}
		if !strings.HasPrefix(err.Error(), "error while writing at byte ") || !strings.HasSuffix(err.Error(), ": No space left on device") {
			t.Errorf("message %q", err.Error())
		}
		if _, err := os.Stat(dst); err == nil {
			t.Errorf("partial target %s left behind", dst)
		}
	}
}

func TestIsAllocatedSectors(t *testing.T) {
	sector := func(data bool) []byte {
		b := make([]byte, 512)
		if data {
			b[100] = 1
		}
		return b
	}
	build := func(pattern string) []byte {
		var buf []byte
		for _, c := range pattern {
			buf = append(buf, sector(c == 'D')...)
		}
		return buf
	}
	for _, tc := range []struct {
		pattern       string
		sector, align int64
		min           int64
		wantUsed      bool
		wantN         int64
	}{
		{"DDDD", 0, 1, 8, true, 4},
		{"ZZZZ", 0, 1, 8, false, 4},
		{"DDZZZZZZZZZZDD", 0, 1, 8, true, 2},
		{"DDZZZZDD", 0, 1, 8, true, 8}, // short hole absorbed
		{"ZZZDDDDD", 0, 8, 8, true, 8}, // zeros up to data inside one aligned block become data
		{"ZZZZZZZZZZDD", 0, 8, 8, false, 8},
	} {
		buf := build(tc.pattern)
		used, n := isAllocatedSectorsMin(buf, int64(len(tc.pattern)), tc.min, tc.sector, tc.align)
		if used != tc.wantUsed || n != tc.wantN {
			t.Errorf("%s align %d: (%v, %d), want (%v, %d)", tc.pattern, tc.align, used, n, tc.wantUsed, tc.wantN)
		}
	}
}
