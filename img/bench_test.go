package img

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// benchTime is the variable part of bench's output.
var benchTime = regexp.MustCompile(`^Run completed in \d+\.\d{3} seconds\.$`)

// benchLines checks bench output: every line equal to qemu-img's except the
// time, which must have qemu-img's shape.
func benchLines(t *testing.T, got, want string) {
	t.Helper()
	g, w := lines(got), lines(want)
	if len(g) != len(w) {
		t.Fatalf("output:\n%s\nqemu-img:\n%s", got, want)
	}
	for i := range g {
		if benchTime.MatchString(w[i]) {
			if !benchTime.MatchString(g[i]) {
				t.Errorf("line %q, want %q", g[i], benchTime)
			}
			continue
		}
		if g[i] != w[i] {
			t.Errorf("line %q, qemu-img %q", g[i], w[i])
		}
	}
}

func TestBenchMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	path, _ := image{size: 16 << 20, extents: [][2]int64{{0, 16 << 20}}}.make(t, dir, "a.raw")
	for _, tc := range []struct {
		args []string
		opts BenchOptions
	}{
		{[]string{"-c", "1000"}, BenchOptions{Count: 1000}},
		{[]string{"-c", "1000", "-d", "8", "-s", "512", "-S", "8k", "-o", "1M"}, BenchOptions{Count: 1000, Depth: 8, BufSize: 512, Step: 8192, Offset: 1 << 20}},
		{[]string{"-c", "5000", "-d", "32", "-t", "none"}, BenchOptions{Count: 5000, Depth: 32, Cache: bdrv.CacheNone}},
		{[]string{"-c", "2000", "-w", "--pattern", "0xab"}, BenchOptions{Count: 2000, Write: true, Pattern: 0xab}},
		{[]string{"-c", "2000", "-w", "-d", "16", "--flush-interval", "100"}, BenchOptions{Count: 2000, Write: true, Depth: 16, FlushInterval: 100}},
		{[]string{"-c", "2000", "-w", "-d", "16", "--flush-interval", "100", "--no-drain"}, BenchOptions{Count: 2000, Write: true, Depth: 16, FlushInterval: 100, NoDrain: true}},
		{[]string{"-c", "0"}, BenchOptions{Count: 0}},
		{[]string{"-c", "5000", "-o", "15M"}, BenchOptions{Count: 5000, Offset: 15 << 20}}, // wraps to 0
		{[]string{"-c", "10", "-s", "0"}, BenchOptions{Count: 10, BufSize: 0}},
		{[]string{"-c", "100", "-d", "1000"}, BenchOptions{Count: 100, Depth: 1000}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			opts := tc.opts
			opts.Filename, opts.Format = path, "raw"
			if opts.Depth == 0 {
				opts.Depth = DefaultBenchDepth
			}
			if opts.BufSize == 0 && !contains(tc.args, "-s") {
				opts.BufSize = DefaultBenchBufSize
			}
			var out bytes.Buffer
			err := runCo(t, func(co *coroutine.Co) error {
				_, err := Bench(co, opts, &out)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			want, errs, code := qemuImg(t, append(append([]string{"bench", "-f", "raw"}, tc.args...), path)...)
			if code != 0 {
				t.Fatalf("qemu-img bench: %s", errs)
			}
			benchLines(t, out.String(), want)
		})
	}
	// The write tests wrote the pattern where qemu-img did.
	content, _ := os.ReadFile(path)
	if content[0] != 0xab && content[0] != 0 {
		t.Errorf("first byte %#x after the write tests", content[0])
	}
}

func contains(l []string, s string) bool {
	for _, e := range l {
		if e == s {
			return true
		}
	}
	return false
}

func TestBenchWritesPattern(t *testing.T) {
	dir := t.TempDir()
	path, _ := image{size: 1 << 20}.make(t, dir, "a.raw")
	opts := BenchOptions{Filename: path, Count: 100, Depth: 4, BufSize: 4096, Step: 8192, Write: true, Pattern: 0x5a}
	if err := runCo(t, func(co *coroutine.Co) error { _, err := Bench(co, opts, nil); return err }); err != nil {
		t.Fatal(err)
	}
	content, _ := os.ReadFile(path)
	for i := 0; i < 100; i++ {
		off := i * 8192
		if content[off] != 0x5a || content[off+4095] != 0x5a || content[off+4096] != 0 {
			t.Fatalf("request %d at %d not written as expected", i, off)
		}
	}
}

func TestBenchErrors(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	path, _ := image{size: 1 << 20}.make(t, dir, "a.raw")
	for _, tc := range []struct {
		args []string
		opts BenchOptions
	}{
		// Past the end: BlockBackend's EIO, after the "Sending" line.
		{[]string{"-c", "1", "-o", "1M"}, BenchOptions{Count: 1, Offset: 1 << 20}},
		{[]string{"-c", "1000", "-S", "3000"}, BenchOptions{Count: 1000, Step: 3000}},
		{[]string{"-c", "1", "--flush-interval", "64"}, BenchOptions{Count: 1, FlushInterval: 64}},
		{[]string{"-c", "1", "-w", "--flush-interval", "10"}, BenchOptions{Count: 1, Write: true, FlushInterval: 10}},
		{[]string{"-c", "1", "-n"}, BenchOptions{Count: 1, Native: true}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			opts := tc.opts
			opts.Filename, opts.Format = path, "raw"
			opts.Depth, opts.BufSize = DefaultBenchDepth, DefaultBenchBufSize
			var out bytes.Buffer
			err := runCo(t, func(co *coroutine.Co) error {
				_, err := Bench(co, opts, &out)
				return err
			})
			want, errs, code := qemuImg(t, append(append([]string{"bench", "-f", "raw"}, tc.args...), path)...)
			if code == 0 || err == nil {
				t.Fatalf("error %v, qemu-img exit %d", err, code)
			}
			if got := "qemu-img: " + err.Error(); got != strings.TrimSpace(errs) {
				t.Errorf("error %q, qemu-img %q", got, errs)
			}
			if out.String() != want {
				t.Errorf("output %q, qemu-img %q", out.String(), want)
			}
		})
	}
}

// TestBenchAllocations keeps the request path free of allocations: a run
// of many requests allocates as much as a run of few (through bdrv, raw and
// file as well as this package).
func TestBenchAllocations(t *testing.T) {
	dir := t.TempDir()
	path, _ := image{size: 4 << 20, extents: [][2]int64{{0, 4 << 20}}}.make(t, dir, "a.raw")
	for _, write := range []bool{false, true} {
		run := func(count int) float64 {
			return testingAllocs(func() {
				opts := BenchOptions{Filename: path, Format: "raw", Count: count, Depth: 8, BufSize: 4096, Write: write}
				if err := coroutine.Run(func(co *coroutine.Co) error { _, err := Bench(co, opts, nil); return err }); err != nil {
					t.Fatal(err)
				}
			})
		}
		few, many := run(100), run(20100)
		if perReq := (many - few) / 20000; perReq > 0.1 {
			t.Errorf("write=%v: %.2f allocations per request", write, perReq)
		}
	}
}

// TestBenchQcow2Writes runs write benches on a qcow2 image through the page
// cache, on the disk's file system (on ext4 the whole-page writes go out
// synchronously, the others through the ring: see drivers/file): first
// allocating (a new cluster every 16 requests, the rest of it zeroed),
// then rewriting allocated clusters beside new ones, then requests of part
// of a page. qemu-img check must find the image clean, and qemu-img's and
// qemu-io's reads must see every request's pattern where it was last
// written and zeros elsewhere.
func TestBenchQcow2Writes(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	const size = 16 << 20
	dir := t.TempDir()
	path := filepath.Join(dir, "a.qcow2")
	if _, errs, code := qemuImg(t, "create", "-q", "-f", "qcow2", path, "16M"); code != 0 {
		t.Fatal(errs)
	}
	want := make([]byte, size)
	for _, o := range []BenchOptions{
		{Count: 2048, Depth: 32, BufSize: 4096, Pattern: 0x11},
		{Count: 900, Depth: 32, BufSize: 4096, Step: 12288, Offset: 4 << 20, Pattern: 0x22},
		{Count: 500, Depth: 16, BufSize: 1536, Step: 8192, Offset: 512, Pattern: 0x33},
	} {
		o.Filename, o.Format, o.Write, o.Cache = path, "qcow2", true, bdrv.CacheWriteback
		if err := runCo(t, func(co *coroutine.Co) error { _, err := Bench(co, o, nil); return err }); err != nil {
			t.Fatalf("pattern %#x: %v", o.Pattern, err)
		}
		step := int64(o.Step)
		if step == 0 {
			step = int64(o.BufSize)
		}
		for i := range int64(o.Count) {
			off := (o.Offset + i*step) % size
			for j := range int64(o.BufSize) {
				want[off+j] = o.Pattern
			}
		}
	}
	checkClean(t, path)
	raw := filepath.Join(dir, "a.raw")
	if _, errs, code := qemuImg(t, "convert", "-O", "raw", path, raw); code != 0 {
		t.Fatal(errs)
	}
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("qemu-img convert: byte %d is %#x, want %#x", i, got[i], want[i])
	}
	// The same through qemu-io, at the edges of the requests.
	for _, r := range [][2]int64{
		{0, 512}, {512, 1536}, {2048, 2048}, {4 << 20, 4096}, {4<<20 + 4096, 8192},
		{4<<20 + 12288*899, 4096}, {4<<20 + 12288*899 + 4096, 8192},
	} {
		off, n := r[0], r[1]
		p := want[off]
		if bytes.Count(want[off:off+n], []byte{p}) != int(n) {
			t.Fatalf("test bug: %d+%d holds more than one pattern", off, n)
		}
		cmd := fmt.Sprintf("read -P %#x %d %d", p, off, n)
		out, err := exec.Command("qemu-io", "-f", "qcow2", "-r", "-c", cmd, path).CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), "read ") {
			t.Errorf("qemu-io -c %q: %v\n%s", cmd, err, out)
		}
	}
}

// firstDiff is the index of the first byte where a and b differ, -1 if none
// (a shorter slice differs where it ends).
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}
