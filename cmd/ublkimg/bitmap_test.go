package main

import (
	"encoding/json"
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

// Images for the bitmap verb: bitmaps made by qemu-img, data written by
// qemu-io while they were enabled, one image whose bitmaps were left in
// use by a crash.
const bitmapImages = `
qemu-img create -q -f qcow2 q.qcow2 4M
qemu-img bitmap --add q.qcow2 b1
qemu-img bitmap --add -g 4k --disable q.qcow2 d1
qemu-io -c "write 0 4k" -c "write 1M 100k" q.qcow2 >/dev/null
qemu-img bitmap --add -g 512 q.qcow2 fine
qemu-io -c "write 3M 1k" q.qcow2 >/dev/null
qemu-img create -q -f qcow2 same.qcow2 4M
qemu-img bitmap --add -g 8k same.qcow2 s
qemu-io -c "write 2M 64k" same.qcow2 >/dev/null
qemu-img create -q -f qcow2 big.qcow2 8M
qemu-img bitmap --add big.qcow2 bb
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
qemu-img create -q -f raw r.raw 1M
qemu-img create -q -f qcow2 crashed.qcow2 1M
qemu-img bitmap --add crashed.qcow2 c1
qemu-img bitmap --add crashed.qcow2 c2
qemu-io -c "write 0 4k" -c abort crashed.qcow2 >/dev/null 2>&1 || true
`

// bitmapState is what a qcow2 image's bitmaps look like: qemu-img info's
// list (names, flags, granularity) and each usable bitmap's bits as this
// package reads them.
func bitmapState(t *testing.T, path string) string {
	t.Helper()
	r := runIn(t, "/", "qemu-img", "info", "-U", "--output=json", path)
	if r.code != 0 {
		t.Fatalf("qemu-img info %s: %s", path, r.stderr)
	}
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps json.RawMessage `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &info); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.Write(info.FormatSpecific.Data.Bitmaps)
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "qcow2", ReadOnly: true})
		if err != nil {
			return err
		}
		defer n.Close(co)
		q, ok := n.Driver().(bdrv.PersistentBitmaps)
		if !ok {
			return fmt.Errorf("%s: no persistent bitmaps", path)
		}
		bms, err := q.DirtyBitmaps(co)
		if err != nil {
			return err
		}
		for _, bm := range bms {
			b.WriteString("\n" + bm.Name + ": ")
			if bm.Inconsistent {
				b.WriteString("inconsistent")
				continue
			}
			d, err := q.ExportBitmap(co, bm.Name)
			if err != nil {
				return err
			}
			b.WriteString(hexRuns(bitmapBytes(d)))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// bitmapBytes is the bitmap in its on-disk form (bit i of byte j is granule
// 8j+i), made from its dirty ranges.
func bitmapBytes(d bdrv.BitmapData) []byte {
	g := d.Granularity()
	b := make([]byte, ((d.Size()+g-1)/g+7)/8)
	for off := uint64(0); ; {
		start, n := d.NextDirty(off)
		if n == 0 {
			return b
		}
		for i := start / g; i <= (start+n-1)/g; i++ {
			b[i/8] |= 1 << (i % 8)
		}
		off = start + n
	}
}

// hexRuns prints the non-zero bytes of a bitmap as offset:hex runs.
func hexRuns(b []byte) string {
	var s strings.Builder
	for i := 0; i < len(b); i++ {
		if b[i] == 0 {
			continue
		}
		j := i
		for j < len(b) && b[j] != 0 {
			j++
		}
		fmt.Fprintf(&s, "%d:%x ", i, b[i:j])
		i = j
	}
	return s.String()
}

// nodeName is the block node name qemu-img puts in some messages, where
// ublkimg names the file.
var nodeName = regexp.MustCompile(`#block[0-9]+`)

// TestBitmapVerb runs qemu-img bitmap's cases with ublkimg and with
// qemu-img on copies of the same images: exit status, stdout and the error
// must be the same, the images must pass qemu-img check, and their bitmaps
// (qemu-img info's list and their bits) must match. The images are then
// crossed over: what ublkimg wrote, qemu-img changes and the other way
// round.
func TestBitmapVerb(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := bitmapImageDir(t)
	cases := []struct {
		args []string
		// then runs after args, with the other tool.
		then []string
	}{
		{args: []string{"--add", "q.qcow2", "n"}, then: []string{"--remove", "q.qcow2", "n"}},
		{args: []string{"--add", "-g", "1k", "--disable", "q.qcow2", "n"}, then: []string{"--enable", "q.qcow2", "n"}},
		{args: []string{"--add", "-g", "0", "q.qcow2", "n"}},
		{args: []string{"--add", "q.qcow2", "b1"}},
		{args: []string{"--add", "q.qcow2", ""}},
		{args: []string{"--add", "-g", "100", "q.qcow2", "n"}},
		{args: []string{"--add", "-g", "4G", "q.qcow2", "n"}},
		{args: []string{"--add", "-g", "abc", "q.qcow2", "n"}},
		{args: []string{"--add", "q.qcow2", strings.Repeat("x", 1024)}},
		{args: []string{"--add", "v2.qcow2", "n"}},
		{args: []string{"--add", "-f", "raw", "r.raw", "n"}},
		{args: []string{"--remove", "q.qcow2", "b1"}, then: []string{"--add", "q.qcow2", "b1"}},
		{args: []string{"--remove", "q.qcow2", "nope"}},
		{args: []string{"--remove", "--add", "q.qcow2", "fine"}},
		{args: []string{"--clear", "q.qcow2", "b1"}, then: []string{"--merge", "fine", "q.qcow2", "b1"}},
		{args: []string{"--clear", "q.qcow2", "nope"}},
		{args: []string{"--disable", "q.qcow2", "b1"}, then: []string{"--enable", "q.qcow2", "b1"}},
		{args: []string{"--enable", "q.qcow2", "d1"}},
		{args: []string{"--enable", "--add", "q.qcow2", "n"}},
		{args: []string{"--merge", "fine", "q.qcow2", "d1"}, then: []string{"--merge", "b1", "q.qcow2", "fine"}},
		{args: []string{"--merge", "d1", "q.qcow2", "b1"}},
		{args: []string{"--add", "--merge", "b1", "--merge", "fine", "--disable", "q.qcow2", "m"}},
		{args: []string{"--merge", "nope", "q.qcow2", "b1"}},
		{args: []string{"--merge", "b1", "q.qcow2", "nope"}},
		{args: []string{"--merge", "s", "-b", "same.qcow2", "q.qcow2", "b1"}},
		{args: []string{"--add", "--merge", "s", "-b", "same.qcow2", "-F", "qcow2", "q.qcow2", "n"}},
		{args: []string{"--merge", "bb", "-b", "big.qcow2", "q.qcow2", "b1"}},
		{args: []string{"--merge", "s", "-b", "same.qcow2", "-F", "raw", "q.qcow2", "b1"}},
		{args: []string{"--merge", "s", "-b", "nope.qcow2", "q.qcow2", "b1"}},
		{args: []string{"--clear", "crashed.qcow2", "c1"}},
		{args: []string{"--enable", "crashed.qcow2", "c1"}},
		{args: []string{"--add", "--merge", "c1", "crashed.qcow2", "m"}},
		{args: []string{"--remove", "crashed.qcow2", "c1"}, then: []string{"--add", "crashed.qcow2", "c1"}},
		{args: []string{"q.qcow2", "b1"}},
		{args: []string{"--add", "q.qcow2"}},
		{args: []string{"--add", "q.qcow2", "a", "b"}},
		{args: []string{"-g", "64k", "--clear", "q.qcow2", "b1"}},
		{args: []string{"-F", "qcow2", "--add", "q.qcow2", "n"}},
		{args: []string{"-b", "same.qcow2", "--add", "q.qcow2", "n"}},
		{args: []string{"--add", "nope.qcow2", "n"}},
		{args: []string{"--bogus", "q.qcow2", "n"}},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			ours, theirs := twinDirs(t, src)
			images := []string{"q.qcow2", "crashed.qcow2", "same.qcow2"}
			compareBitmapRun(t, "first", ours, theirs, append([]string{"bitmap"}, tc.args...), "ublkimg", "qemu-img", images)
			if tc.then != nil {
				compareBitmapRun(t, "then", ours, theirs, append([]string{"bitmap"}, tc.then...), "qemu-img", "ublkimg", images)
			}
		})
	}
}

// TestBitmapTools compares convert --bitmaps, convert -n into an image with
// enabled bitmaps (which mark what convert writes), resize of images with
// bitmaps, and info and measure of them with qemu-img's: exit status, output, errors, and the
// resulting bitmaps.
func TestBitmapTools(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := bitmapImageDir(t)
	for _, args := range [][]string{
		{"convert", "--bitmaps", "-O", "qcow2", "q.qcow2", "out.qcow2"},
		{"convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", "same.qcow2", "out.qcow2"},
		{"convert", "--bitmaps", "-O", "qcow2", "crashed.qcow2", "out.qcow2"},
		{"convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "crashed.qcow2", "out.qcow2"},
		{"convert", "--skip-broken-bitmaps", "-O", "qcow2", "q.qcow2", "out.qcow2"},
		{"convert", "--bitmaps", "-O", "raw", "q.qcow2", "out.raw"},
		{"convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "q.qcow2", "out.qcow2"},
		{"convert", "--bitmaps", "-O", "qcow2", "r.raw", "out.qcow2"},
		{"convert", "--bitmaps", "-O", "qcow2", "v2.qcow2", "out.qcow2"},
		{"convert", "--bitmaps", "-O", "qcow2", "q.qcow2", "same.qcow2", "out.qcow2"},
		{"convert", "-n", "-O", "qcow2", "same.qcow2", "q.qcow2"},
		{"convert", "-n", "--bitmaps", "-O", "qcow2", "same.qcow2", "q.qcow2"},
		{"convert", "-n", "--bitmaps", "-O", "qcow2", "q.qcow2", "big.qcow2"},
		{"convert", "-n", "--bitmaps", "-O", "qcow2", "big.qcow2", "big.qcow2"},
		{"info", "q.qcow2"},
		{"info", "--output=json", "crashed.qcow2"},
		{"measure", "-O", "qcow2", "q.qcow2"},
		{"measure", "--output=json", "-O", "qcow2", "crashed.qcow2"},
		{"resize", "q.qcow2", "8M"},
		{"resize", "--shrink", "q.qcow2", "1M"},
		{"resize", "crashed.qcow2", "+1M"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			ours, theirs := twinDirs(t, src)
			compareBitmapRun(t, args[0], ours, theirs, args, "ublkimg", "qemu-img",
				[]string{"out.qcow2", "q.qcow2", "big.qcow2", "crashed.qcow2"})
		})
	}
}

// bitmapImageDir makes bitmapImages in a new directory.
func bitmapImageDir(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	sh := exec.Command("bash", "-e", "-c", bitmapImages)
	sh.Dir = src
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("making images: %v\n%s", err, out)
	}
	return src
}

// twinDirs copies the images of src into two new directories, one for
// each tool.
func twinDirs(t *testing.T, src string) (ours, theirs string) {
	t.Helper()
	ours, theirs = t.TempDir(), t.TempDir()
	cp := exec.Command("bash", "-c", "cp -a . "+ours+" && cp -a . "+theirs)
	cp.Dir = src
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return ours, theirs
}

// compareBitmapRun runs args with one tool in ours and with the other in
// theirs and compares exit status, stdout and the error; then the images
// (those that exist) must pass qemu-img check and hold the same bitmaps.
func compareBitmapRun(t *testing.T, step, ours, theirs string, args []string, ourTool, theirTool string, images []string) {
	t.Helper()
	run := func(dir, tool string) result {
		if tool == "ublkimg" {
			tool = binary
		}
		return runIn(t, dir, tool, args...)
	}
	got, want := run(ours, ourTool), run(theirs, theirTool)
	if got.code != want.code || got.stdout != want.stdout {
		t.Errorf("%s: %s exit %d, stdout %q; %s: exit %d, stdout %q (stderr %s | %s)", step,
			ourTool, got.code, got.stdout, theirTool, want.code, want.stdout, got.stderr, want.stderr)
	}
	if g, w := normBitmapStderr(t, got, ourTool), normBitmapStderr(t, want, theirTool); g != w {
		t.Errorf("%s: %s's stderr:\n%s\n%s's:\n%s", step, ourTool, g, theirTool, w)
	}
	for _, name := range images {
		a, b := filepath.Join(ours, name), filepath.Join(theirs, name)
		_, errA := os.Stat(a)
		_, errB := os.Stat(b)
		if (errA == nil) != (errB == nil) {
			t.Errorf("%s: %s exists: %v with %s, %v with %s", step, name, errA == nil, ourTool, errB == nil, theirTool)
			continue
		}
		if errA != nil {
			continue
		}
		for _, p := range []string{a, b} {
			if r := runIn(t, "/", "qemu-img", "check", "-U", p); r.code != 0 {
				t.Errorf("%s: qemu-img check %s: exit %d\n%s", step, p, r.code, r.stdout)
			}
		}
		if sa, sb := bitmapState(t, a), bitmapState(t, b); sa != sb {
			t.Errorf("%s: %s bitmaps:\n%s\n%s's:\n%s", step, name, sa, theirTool, sb)
		}
	}
}

// normBitmapStderr is a tool's stderr in comparable form: warnings and the
// error without the tool's prefix, qemu-img's hint lines left out, on one
// line; "Could not open 'x': " said once and the node name or file name in
// messages masked.
func normBitmapStderr(t *testing.T, r result, tool string) string {
	t.Helper()
	if tool == "ublkimg" && r.code != 0 {
		l := joinHint(strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n"))
		oneErrorLine(t, result{stderr: l[len(l)-1] + "\n"})
	}
	var parts []string
	for _, l := range strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n") {
		if strings.HasPrefix(l, "Try ") || strings.HasPrefix(l, "WARNING") || strings.HasPrefix(l, "  ") {
			continue
		}
		l = strings.TrimPrefix(strings.TrimPrefix(l, "qemu-img: "), "ublkimg: ")
		parts = append(parts, l)
	}
	s := strings.Join(strings.Fields(strings.Join(parts, " ")), " ")
	s = regexp.MustCompile(`(Could not open '[^']*': )+`).ReplaceAllString(s, "$1")
	s = nodeName.ReplaceAllString(s, "NODE")
	s = regexp.MustCompile(`persistent in '[^']*'`).ReplaceAllString(s, "persistent in 'NODE'")
	s = regexp.MustCompile(`inactivation of node '[^']*'`).ReplaceAllString(s, "inactivation of node 'NODE'")
	s = regexp.MustCompile(`bitmaps to [^:]*:`).ReplaceAllString(s, "bitmaps to NODE:")
	return s
}

// TestCheckInUseBitmapTooSmall: a resize that cannot keep a bitmap (its
// table would exceed 512 MiB at this granularity) leaves it in use and
// sized for the old disk; check accepts that, as qemu-img's does (QEMU
// exempts in-use bitmaps from the size constraint), instead of failing.
func TestCheckInUseBitmapTooSmall(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	img := filepath.Join(t.TempDir(), "bm.qcow2")
	for _, args := range [][]string{
		{"create", "-q", "-f", "qcow2", img, "1T"},
		{"bitmap", "--add", "-g", "512", img, "b0"},
		{"resize", img, "+2T"},
	} {
		if r := qemuImg(t, args...); r.code != 0 {
			t.Fatalf("qemu-img %q: exit %d: %s", args, r.code, r.stderr)
		}
	}
	want := qemuImg(t, "check", img)
	got := ublkimg(t, "check", img)
	if got.code != want.code || got.stdout != want.stdout {
		t.Errorf("check: exit %d, stdout %q; qemu-img: exit %d, %q (stderr %q)", got.code, got.stdout, want.code, want.stdout, got.stderr)
	}
}
