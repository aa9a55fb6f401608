package main

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// Image locking from the command line: no verb writes to an image another
// process holds (here qemu-io, read-write or read-only), nor to its own
// source; each refuses with qemu-img 7.2's message and exit status and
// leaves every file as it was. The other way round, qemu-img cannot write
// an image ublkimg has open. And a verb's locks are gone the moment it
// returns.

// lockImages: busy.qcow2 is the image held (it has a snapshot and a
// bitmap, so that every snapshot and bitmap operation has something to
// act on); top.qcow2 and top2.qcow2 are overlays above it.
const lockImages = `
qemu-img create -q -f qcow2 a.qcow2 1M
qemu-io -c "write -P 1 0 64k" a.qcow2 >/dev/null
qemu-img create -q -f qcow2 busy.qcow2 1M
qemu-io -c "write -P 2 0 64k" busy.qcow2 >/dev/null
qemu-img snapshot -c s1 busy.qcow2
qemu-img bitmap --add busy.qcow2 b0
qemu-img create -q -f qcow2 -b busy.qcow2 -F qcow2 top.qcow2
qemu-io -c "write -P 3 0 4k" top.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 top2.qcow2
qemu-io -c "write -P 4 4k 4k" top2.qcow2 >/dev/null
qemu-img create -q -f raw r.raw 1M
qemu-io -f raw -c "write -P 5 0 64k" r.raw >/dev/null
`

// copyImages copies the images of src into a new directory.
func copyImages(t *testing.T, src string) string {
	t.Helper()
	dir := t.TempDir()
	cp := exec.Command("cp", "-a", "--sparse=always", src+"/.", dir)
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return dir
}

// dirFiles is the content of every file in dir, by name, as a digest.
func dirFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		files[e.Name()] = hex.EncodeToString(sum[:])
	}
	return files
}

// changedFiles names the files that differ between two dirFiles, or that
// one of them lacks.
func changedFiles(before, after map[string]string) []string {
	var names []string
	for n, s := range before {
		if after[n] != s {
			names = append(names, n)
		}
	}
	for n := range after {
		if _, ok := before[n]; !ok {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names
}

// asUblkimg is qemu-img's stderr as ublkimg prints it: the same lines, with
// "ublkimg: " where qemu-img says "qemu-img: ".
func asUblkimg(stderr string) string {
	lines := strings.Split(stderr, "\n")
	for i, l := range lines {
		if rest, ok := strings.CutPrefix(l, "qemu-img: "); ok {
			lines[i] = "ublkimg: " + rest
		}
	}
	return strings.Join(lines, "\n")
}

// refusedAsQemuImg runs qemu-img, then ublkimg, with args in dir. qemu-img
// must refuse; ublkimg must print the same and exit the same way. Neither
// may change any file in dir.
func refusedAsQemuImg(t *testing.T, dir string, args []string) {
	t.Helper()
	before := dirFiles(t, dir)
	want := runIn(t, dir, "qemu-img", args...)
	if want.code == 0 {
		t.Fatalf("qemu-img %v did not refuse:\n%s%s", args, want.stdout, want.stderr)
	}
	if ch := changedFiles(before, dirFiles(t, dir)); len(ch) > 0 {
		t.Fatalf("qemu-img %v changed %v:\n%s", args, ch, want.stderr)
	}
	got := runIn(t, dir, binary, args...)
	if ch := changedFiles(before, dirFiles(t, dir)); len(ch) > 0 {
		t.Errorf("ublkimg %v changed %v:\n%s", args, ch, got.stderr)
	}
	if got.code != want.code || got.stdout != want.stdout || got.stderr != asUblkimg(want.stderr) {
		t.Errorf("ublkimg %v: exit %d\n%s%s\nqemu-img: exit %d\n%s%s", args,
			got.code, got.stdout, got.stderr, want.code, want.stdout, want.stderr)
	}
}

// TestLockedImageUntouched runs every verb that writes against an image
// qemu-io holds read-write and read-only.
func TestLockedImageUntouched(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	src := makeImages(t, lockImages)
	holders := []struct {
		name string
		args []string
		want []int
	}{
		{"writer", nil, qemutest.QemuIOWriteLocks},
		{"reader", []string{"-r"}, qemutest.QemuIOReadLocks},
	}
	cases := []struct {
		held string // the image qemu-io holds
		args []string
	}{
		{"busy.qcow2", []string{"create", "-f", "qcow2", "busy.qcow2", "1M"}},
		{"busy.qcow2", []string{"create", "-f", "raw", "busy.qcow2", "1M"}},
		{"busy.qcow2", []string{"create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "busy.qcow2"}},
		{"busy.qcow2", []string{"convert", "-O", "qcow2", "a.qcow2", "busy.qcow2"}},
		{"busy.qcow2", []string{"convert", "-O", "raw", "a.qcow2", "busy.qcow2"}},
		{"busy.qcow2", []string{"convert", "-c", "-O", "qcow2", "a.qcow2", "busy.qcow2"}},
		{"busy.qcow2", []string{"convert", "-n", "-O", "qcow2", "a.qcow2", "busy.qcow2"}},
		{"busy.qcow2", []string{"convert", "-n", "-O", "raw", "a.qcow2", "busy.qcow2"}},
		{"busy.qcow2", []string{"dd", "-O", "raw", "if=a.qcow2", "of=busy.qcow2"}},
		{"busy.qcow2", []string{"dd", "-O", "qcow2", "if=a.qcow2", "of=busy.qcow2"}},
		{"busy.qcow2", []string{"bench", "-w", "-c", "1", "busy.qcow2"}},
		{"busy.qcow2", []string{"bench", "-w", "-c", "1", "-f", "raw", "busy.qcow2"}},
		{"busy.qcow2", []string{"amend", "-o", "lazy_refcounts=on", "busy.qcow2"}},
		// commit writes the base and (unless -d) empties the top.
		{"busy.qcow2", []string{"commit", "top.qcow2"}},
		{"busy.qcow2", []string{"commit", "-b", "busy.qcow2", "top2.qcow2"}},
		{"top.qcow2", []string{"commit", "top.qcow2"}},
		{"top.qcow2", []string{"commit", "-d", "top.qcow2"}},
		{"top.qcow2", []string{"rebase", "-b", "a.qcow2", "-F", "qcow2", "top.qcow2"}},
		{"top.qcow2", []string{"rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "top.qcow2"}},
		{"busy.qcow2", []string{"resize", "busy.qcow2", "2M"}},
		{"busy.qcow2", []string{"resize", "--shrink", "busy.qcow2", "512K"}},
		{"busy.qcow2", []string{"resize", "-f", "raw", "busy.qcow2", "2M"}},
		{"busy.qcow2", []string{"snapshot", "-c", "s2", "busy.qcow2"}},
		{"busy.qcow2", []string{"snapshot", "-a", "s1", "busy.qcow2"}},
		{"busy.qcow2", []string{"snapshot", "-d", "s1", "busy.qcow2"}},
		{"busy.qcow2", []string{"bitmap", "--add", "busy.qcow2", "b1"}},
		{"busy.qcow2", []string{"bitmap", "--remove", "busy.qcow2", "b0"}},
		{"busy.qcow2", []string{"bitmap", "--clear", "busy.qcow2", "b0"}},
		{"busy.qcow2", []string{"bitmap", "--disable", "busy.qcow2", "b0"}},
		{"busy.qcow2", []string{"check", "-r", "leaks", "busy.qcow2"}},
		{"busy.qcow2", []string{"check", "-r", "all", "busy.qcow2"}},
		{"busy.qcow2", []string{"check", "-r", "all", "-f", "raw", "busy.qcow2"}},
	}
	for _, h := range holders {
		for _, tc := range cases {
			t.Run(h.name+" "+tc.held+" "+strings.Join(tc.args, " "), func(t *testing.T) {
				dir := copyImages(t, src)
				qemutest.HoldWithQemuIO(t, filepath.Join(dir, tc.held), h.want, h.args...)
				refusedAsQemuImg(t, dir, tc.args)
			})
		}
	}
}

// TestWriteOntoOwnInput: a target that is (in) the source's chain is open
// read-only, and so locked, when the target would be created or opened:
// refused as by qemu-img, and the source stays as it was.
func TestWriteOntoOwnInput(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	src := makeImages(t, lockImages)
	for _, args := range [][]string{
		{"convert", "-O", "raw", "a.qcow2", "a.qcow2"},
		{"convert", "-O", "qcow2", "a.qcow2", "a.qcow2"},
		{"convert", "-n", "-O", "qcow2", "a.qcow2", "a.qcow2"},
		{"convert", "-f", "raw", "-O", "raw", "r.raw", "r.raw"},
		{"convert", "-n", "-f", "raw", "-O", "raw", "r.raw", "r.raw"},
		{"convert", "-O", "qcow2", "top.qcow2", "busy.qcow2"},
		{"convert", "-O", "raw", "top2.qcow2", "top.qcow2"},
		{"convert", "-O", "raw", "a.qcow2", "r.raw", "a.qcow2"},
		{"dd", "-O", "qcow2", "if=a.qcow2", "of=a.qcow2"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			refusedAsQemuImg(t, copyImages(t, src), args)
		})
	}
	// qemu-img dd opens a raw input sharing every permission, creates
	// the output over it and copies the zeros it now reads: the input is
	// lost. ublkimg's readers do not share writing, so it refuses.
	t.Run("dd onto its raw input", func(t *testing.T) {
		dir := copyImages(t, src)
		before := dirFiles(t, dir)
		r := runIn(t, dir, binary, "dd", "-O", "raw", "if=r.raw", "of=r.raw")
		want := "ublkimg: r.raw: error while creating output image: Failed to get \"write\" lock\n" +
			"Is another process using the image [r.raw]?\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("exit %d\n%s", r.code, r.stderr)
		}
		if ch := changedFiles(before, dirFiles(t, dir)); len(ch) > 0 {
			t.Errorf("changed %v", ch)
		}
	})
}

// TestConvertFailureRemovesOnlyNewTarget: a convert that fails after it
// created the target removes the target only if it did not exist before;
// an existing one is left, whatever it now holds, as qemu-img leaves it.
// (qemu-img leaves a new partial target too.)
func TestConvertFailureRemovesOnlyNewTarget(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	// A compressed cluster whose data does not inflate: reading it fails
	// in the middle of the copy, after the target was created.
	src := makeImages(t, `
qemu-img create -q -f qcow2 bad.qcow2 1M
qemu-io -c "write -c -P 1 0 64k" bad.qcow2 >/dev/null
printf '\377\377\377\377\377\377\377\377' | dd of=bad.qcow2 bs=1 seek=$((0x50000)) conv=notrunc 2>/dev/null
echo old > old.raw
`)
	for _, tc := range []struct {
		target string
		kept   bool
	}{{"old.raw", true}, {"new.raw", false}} {
		t.Run(tc.target, func(t *testing.T) {
			args := []string{"convert", "-O", "raw", "bad.qcow2", tc.target}
			want := runIn(t, copyImages(t, src), "qemu-img", args...)
			dir := copyImages(t, src)
			got := runIn(t, dir, binary, args...)
			if want.code == 0 || got.code != want.code || got.stderr != asUblkimg(want.stderr) {
				t.Errorf("exit %d\n%s\nqemu-img: exit %d\n%s", got.code, got.stderr, want.code, want.stderr)
			}
			_, err := os.Stat(filepath.Join(dir, tc.target))
			if kept := err == nil; kept != tc.kept {
				t.Errorf("target left behind: %v, want %v", kept, tc.kept)
			}
		})
	}
	// A refusal that comes before the target is touched leaves an
	// existing one as it was.
	t.Run("refused before creation", func(t *testing.T) {
		refusedAsQemuImg(t, copyImages(t, src), []string{"convert", "-c", "-O", "raw", "bad.qcow2", "old.raw"})
	})
}

// TestUblkimgHoldsImage: qemu-img cannot write an image that ublkimg has
// open read-write, in this process (as attach opens it) or in a running
// ublkimg bench -w.
func TestUblkimgHoldsImage(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	src := makeImages(t, lockImages)
	// ublkimg's read-write locks: it uses consistent reads, writes and
	// resizes, and shares neither writing nor resizing.
	ours := []int{100, 101, 103, 201, 203}
	writes := [][]string{
		{"create", "-f", "qcow2", "%s", "1M"},
		{"convert", "-O", "raw", "a.qcow2", "%s"},
		{"convert", "-n", "-O", "raw", "a.qcow2", "%s"},
		{"dd", "-O", "raw", "if=a.qcow2", "of=%s"},
		{"bench", "-w", "-c", "1", "-f", "raw", "%s"},
		{"resize", "-f", "raw", "%s", "2M"},
		{"check", "-r", "all", "%s"},
	}
	qcow2Writes := [][]string{
		{"amend", "-o", "lazy_refcounts=on", "%s"},
		{"commit", "top.qcow2"},
		{"snapshot", "-c", "s2", "%s"},
		{"bitmap", "--add", "%s", "b1"},
	}
	run := func(t *testing.T, dir, image string, cmds [][]string) {
		t.Helper()
		before := dirFiles(t, dir)
		for _, c := range cmds {
			args := slices.Clone(c)
			for i, a := range args {
				args[i] = strings.ReplaceAll(a, "%s", image)
			}
			r := runIn(t, dir, "qemu-img", args...)
			if r.code != 1 || !strings.Contains(r.stderr, "lock\nIs another process using the image ["+image+"]?\n") {
				t.Errorf("qemu-img %v on an image ublkimg holds: exit %d\n%s", args, r.code, r.stderr)
			}
		}
		r := runIn(t, dir, "qemu-io", "-f", "raw", "-c", "write 0 512", image)
		if !strings.Contains(r.stderr, "lock") {
			t.Errorf("qemu-io wrote an image ublkimg holds: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		if ch := changedFiles(before, dirFiles(t, dir)); len(ch) > 0 {
			t.Errorf("qemu-img changed %v", ch)
		}
	}

	for _, tc := range []struct{ image, format string }{{"r.raw", "raw"}, {"busy.qcow2", "qcow2"}} {
		t.Run("open "+tc.image, func(t *testing.T) {
			dir := copyImages(t, src)
			loop, err := coroutine.Start(coroutine.Config{})
			if err != nil {
				t.Fatal(err)
			}
			defer loop.Close()
			var n *bdrv.Node
			err = loop.Call(func(co *coroutine.Co) (err error) {
				n, err = bdrv.Open(co, bdrv.Spec{Filename: filepath.Join(dir, tc.image), Format: tc.format})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer loop.Call(func(co *coroutine.Co) error { return n.Close(co) })
			held, err := qemutest.LockedBytes(filepath.Join(dir, tc.image))
			if err != nil || !slices.Equal(held, ours) {
				t.Fatalf("an image ublkimg has open read-write has lock bytes %v (%v), want %v", held, err, ours)
			}
			cmds := writes
			if tc.format == "qcow2" {
				cmds = append(slices.Clone(writes), qcow2Writes...)
			}
			run(t, dir, tc.image, cmds)
		})
	}
	t.Run("bench -w", func(t *testing.T) {
		dir := copyImages(t, src)
		// Writes of one 4 KiB block, again and again, until killed.
		qemutest.Hold(t, filepath.Join(dir, "r.raw"), ours, binary, "bench", "-w", "-f", "raw", "-c", "2000000000", "-d", "1", "-S", "0", filepath.Join(dir, "r.raw"))
		for _, c := range writes {
			args := slices.Clone(c)
			for i, a := range args {
				args[i] = strings.ReplaceAll(a, "%s", "r.raw")
			}
			r := runIn(t, dir, "qemu-img", args...)
			if r.code != 1 || !strings.Contains(r.stderr, "lock\nIs another process using the image [r.raw]?\n") {
				t.Errorf("qemu-img %v on an image ublkimg bench -w writes: exit %d\n%s", args, r.code, r.stderr)
			}
		}
	})
}

// TestLocksReleasedAfterVerb: the moment a verb exits, qemu-io can take
// the write lock of every image the verb opened, with no retry: no lock
// byte outlives ublkimg's close, which would otherwise happen whenever
// something else (an io_uring request, a forked child) still references
// the open file.
func TestLocksReleasedAfterVerb(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	src := makeImages(t, lockImages)
	for _, tc := range []struct {
		args   []string
		images []string // written or read: all must be free afterwards
	}{
		{[]string{"create", "-f", "qcow2", "new.qcow2", "1M"}, []string{"new.qcow2"}},
		{[]string{"create", "-f", "raw", "new.raw", "1M"}, []string{"new.raw"}},
		{[]string{"create", "-f", "qcow2", "-b", "busy.qcow2", "-F", "qcow2", "new.qcow2"}, []string{"new.qcow2", "busy.qcow2"}},
		{[]string{"convert", "-O", "qcow2", "top.qcow2", "new.qcow2"}, []string{"new.qcow2", "top.qcow2", "busy.qcow2"}},
		{[]string{"convert", "-O", "raw", "a.qcow2", "new.raw"}, []string{"new.raw", "a.qcow2"}},
		{[]string{"convert", "-n", "-O", "qcow2", "a.qcow2", "busy.qcow2"}, []string{"a.qcow2", "busy.qcow2"}},
		{[]string{"dd", "-O", "qcow2", "if=a.qcow2", "of=new.qcow2"}, []string{"a.qcow2", "new.qcow2"}},
		{[]string{"bench", "-w", "-c", "64", "busy.qcow2"}, []string{"busy.qcow2"}},
		{[]string{"bench", "-c", "64", "-f", "raw", "r.raw"}, []string{"r.raw"}},
		{[]string{"amend", "-o", "lazy_refcounts=on", "busy.qcow2"}, []string{"busy.qcow2"}},
		{[]string{"commit", "top.qcow2"}, []string{"top.qcow2", "busy.qcow2"}},
		{[]string{"commit", "-b", "busy.qcow2", "top2.qcow2"}, []string{"top2.qcow2", "top.qcow2", "busy.qcow2"}},
		{[]string{"rebase", "-b", "a.qcow2", "-F", "qcow2", "top.qcow2"}, []string{"top.qcow2", "a.qcow2", "busy.qcow2"}},
		{[]string{"resize", "busy.qcow2", "2M"}, []string{"busy.qcow2"}},
		{[]string{"resize", "-f", "raw", "r.raw", "2M"}, []string{"r.raw"}},
		{[]string{"snapshot", "-c", "s2", "busy.qcow2"}, []string{"busy.qcow2"}},
		{[]string{"snapshot", "-a", "s1", "busy.qcow2"}, []string{"busy.qcow2"}},
		{[]string{"snapshot", "-d", "s1", "busy.qcow2"}, []string{"busy.qcow2"}},
		{[]string{"bitmap", "--add", "busy.qcow2", "b1"}, []string{"busy.qcow2"}},
		{[]string{"bitmap", "--merge", "b0", "-b", "busy.qcow2", "a.qcow2", "b0"}, []string{"a.qcow2", "busy.qcow2"}},
		{[]string{"check", "-r", "all", "busy.qcow2"}, []string{"busy.qcow2"}},
		{[]string{"check", "top2.qcow2"}, []string{"top2.qcow2", "top.qcow2", "busy.qcow2"}},
		{[]string{"info", "--backing-chain", "top2.qcow2"}, []string{"top2.qcow2", "top.qcow2", "busy.qcow2"}},
		{[]string{"compare", "a.qcow2", "busy.qcow2"}, []string{"a.qcow2", "busy.qcow2"}},
		{[]string{"map", "top.qcow2"}, []string{"top.qcow2", "busy.qcow2"}},
		{[]string{"measure", "-O", "qcow2", "busy.qcow2"}, []string{"busy.qcow2"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			dir := copyImages(t, src)
			if tc.args[0] == "bitmap" {
				// --merge needs the bitmap in the target too.
				if r := runIn(t, dir, "qemu-img", "bitmap", "--add", "a.qcow2", "b0"); r.code != 0 {
					t.Fatal(r.stderr)
				}
			}
			r := runIn(t, dir, binary, tc.args...)
			if r.code != 0 && !(tc.args[0] == "compare" && r.code == 1) {
				t.Fatalf("exit %d\n%s", r.code, r.stderr)
			}
			for _, img := range tc.images {
				p := filepath.Join(dir, img)
				if held, err := qemutest.LockedBytes(p); err != nil || len(held) > 0 {
					t.Errorf("%s: lock bytes %v held after ublkimg exited (%v)", img, held, err)
				}
				fmtName := "qcow2"
				if strings.HasSuffix(img, ".raw") {
					fmtName = "raw"
				}
				if q := runIn(t, dir, "qemu-io", "-f", fmtName, "-c", "write -P 9 0 512", img); q.code != 0 || q.stderr != "" {
					t.Errorf("qemu-io could not write %s right after ublkimg %v: exit %d\n%s", img, tc.args, q.code, q.stderr)
				}
			}
		})
	}
}
