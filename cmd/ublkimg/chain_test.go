package main

import (
	"bytes"
	bin "encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// The verbs that write an image open its backing chain first, as qemu-img
// 7.2 does (amend, snapshot with every action, convert -n's target): a
// backing file that is missing, or that another process writes, makes
// them refuse and leave the image as it was; one that another process
// only reads does not. The backing file's format is the one the image
// records, or probed. Growing an image over a longer backing file (resize,
// amend -o size) zeroes the new area, so that the backing file's data
// there does not show through.

// chainImages: top.qcow2 (1 MiB) over base.qcow2 (2 MiB), top2.qcow2 over
// top.qcow2, overraw.qcow2 (1 MiB) over base.raw (2 MiB), probed.qcow2 over
// base.qcow2 with no backing format recorded (its backing file's format is
// probed), v2.qcow2 (1 MiB, compat 0.10) over base.qcow2. Each overlay has
// data of its own, and top, top2 and overraw a snapshot s1; src.raw is
// what convert copies.
const chainImages = `
qemu-img create -q -f qcow2 base.qcow2 2M
qemu-io -c "write -P 1 0 2M" base.qcow2 >/dev/null
qemu-img create -q -f raw base.raw 2M
qemu-io -f raw -c "write -P 2 0 2M" base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 1M
qemu-io -c "write -P 3 64k 64k" top.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 top2.qcow2
qemu-io -c "write -P 4 128k 64k" top2.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw overraw.qcow2 1M
qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 v2.qcow2 1M
qemu-io -c "write -P 8 64k 64k" v2.qcow2 >/dev/null
qemu-io -c "write -P 5 64k 64k" overraw.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 probed.qcow2
qemu-io -c "write -P 6 64k 64k" probed.qcow2 >/dev/null
for i in top top2 overraw; do qemu-img snapshot -c s1 $i.qcow2; done
# Drop the backing format extension (the first, at 112): move what follows
# it, up to the end of the backing file name, 16 bytes down, as QEMU would
# have laid the header out without it.
off=$((16#$(od -An -tx1 -j8 -N8 probed.qcow2 | tr -d ' \n')))
len=$((16#$(od -An -tx1 -j16 -N4 probed.qcow2 | tr -d ' \n')))
[ "$(od -An -tx1 -j112 -N4 probed.qcow2 | tr -d ' \n')" = e2792aca ]
dd if=probed.qcow2 of=probed.qcow2 bs=1 skip=128 seek=112 count=$((off+len-128)) conv=notrunc 2>/dev/null
dd if=/dev/zero of=probed.qcow2 bs=1 seek=$((off+len-16)) count=16 conv=notrunc 2>/dev/null
printf "$(printf '%016x' $((off-16)) | sed 's/../\\x&/g')" | dd of=probed.qcow2 bs=1 seek=8 conv=notrunc 2>/dev/null
qemu-img check -q probed.qcow2
qemu-img info probed.qcow2 | grep -qx 'backing file: base.qcow2'
! qemu-img info probed.qcow2 | grep -q 'backing file format'
qemu-img create -q -f raw src.raw 1M
qemu-io -f raw -c "write -P 7 0 512k" src.raw >/dev/null
`

// Lock bytes qemu-io holds on a raw image: it passes its own permissions
// through the raw format node and shares everything.
var (
	qemuIORawWriteLocks = []int{100, 101}
	qemuIORawReadLocks  = []int{100}
)

// TestBackingChainOpened runs each verb that writes an overlay with its
// backing file in place, missing, held read-write and held read-only by
// qemu-io, with ublkimg and with qemu-img on copies of the same images:
// the same exit status, output and messages, and the same bytes in every
// file afterwards (snapshot dates aside).
func TestBackingChainOpened(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	src := makeImages(t, chainImages)
	copies := fixtureCopies(t, src)
	type verbCase struct {
		base string // the bottom of the image's chain: held, or removed
		args []string
	}
	var cases []verbCase
	add := func(image, base string, args ...[]string) {
		for _, a := range args {
			a = slices.Clone(a)
			for i := range a {
				a[i] = strings.ReplaceAll(a[i], "%s", image)
			}
			cases = append(cases, verbCase{base, a})
		}
	}
	add("top.qcow2", "base.qcow2",
		[]string{"amend", "-o", "lazy_refcounts=on", "%s"},
		[]string{"amend", "-U", "-o", "lazy_refcounts=on", "%s"}, // no -U in amend
		[]string{"amend", "-o", "compat=0.10", "%s"},
		[]string{"amend", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "%s"},
		[]string{"amend", "-o", "backing_file=base.raw", "%s"},
		[]string{"amend", "-o", "backing_fmt=raw", "%s"},
		// Growing over a longer backing file zeroes the new area, as
		// resize does: zero clusters, and zeros written to the part of a
		// cluster the old end falls in.
		[]string{"amend", "-o", "size=2M", "%s"},
		[]string{"amend", "-o", "size=1049088", "%s"},
		[]string{"resize", "%s", "2M"},
		[]string{"resize", "%s", "+512"},
		[]string{"snapshot", "-l", "%s"},
		[]string{"snapshot", "-c", "s2", "%s"},
		[]string{"snapshot", "-a", "s1", "%s"},
		[]string{"snapshot", "-d", "s1", "%s"},
		[]string{"snapshot", "-U", "-l", "%s"},
		[]string{"snapshot", "-U", "-c", "s2", "%s"},
		[]string{"snapshot", "-U", "-a", "s1", "%s"},
		[]string{"convert", "-n", "-O", "qcow2", "src.raw", "%s"},
		[]string{"convert", "-U", "-n", "-O", "qcow2", "src.raw", "%s"},
	)
	add("top2.qcow2", "base.qcow2",
		[]string{"amend", "-o", "lazy_refcounts=on", "%s"},
		[]string{"snapshot", "-l", "%s"},
		[]string{"snapshot", "-c", "s2", "%s"},
		[]string{"snapshot", "-d", "s1", "%s"},
		[]string{"convert", "-n", "-O", "qcow2", "src.raw", "%s"},
		// The target's backing file is the source: both only read it.
		[]string{"convert", "-n", "-O", "qcow2", "top.qcow2", "%s"},
	)
	add("probed.qcow2", "base.qcow2",
		[]string{"amend", "-o", "lazy_refcounts=on", "%s"},
		[]string{"snapshot", "-l", "%s"},
		// The first snapshot: its table keeps the active one's COPIED flags.
		[]string{"snapshot", "-c", "s1", "%s"},
		[]string{"convert", "-n", "-O", "qcow2", "src.raw", "%s"},
	)
	// Version 2 has no zero clusters: growing over a longer backing file
	// is refused.
	add("v2.qcow2", "base.qcow2",
		[]string{"amend", "-o", "size=2M", "%s"},
		[]string{"resize", "%s", "2M"},
		[]string{"amend", "-o", "lazy_refcounts=off", "%s"},
		[]string{"snapshot", "-c", "s1", "%s"},
		[]string{"convert", "-n", "-O", "qcow2", "src.raw", "%s"},
	)
	add("overraw.qcow2", "base.raw",
		[]string{"amend", "-o", "lazy_refcounts=on", "%s"},
		[]string{"snapshot", "-l", "%s"},
		[]string{"snapshot", "-c", "s2", "%s"},
		[]string{"snapshot", "-a", "s1", "%s"},
		[]string{"convert", "-n", "-O", "qcow2", "src.raw", "%s"},
		[]string{"amend", "-o", "size=2M", "%s"},
	)
	states := []string{"ok", "missing", "held rw", "held ro"}
	i := 0
	for _, state := range states {
		for _, tc := range cases {
			i++
			t.Run(state+" "+strings.Join(tc.args, " "), func(t *testing.T) {
				ours, theirs := copies(t, i)
				raw := strings.HasSuffix(tc.base, ".raw")
				for _, dir := range []string{ours, theirs} {
					path := filepath.Join(dir, tc.base)
					switch {
					case state == "missing":
						if err := os.Remove(path); err != nil {
							t.Fatal(err)
						}
					case state == "held rw" && raw:
						qemutest.HoldWithQemuIO(t, path, qemuIORawWriteLocks, "-f", "raw")
					case state == "held rw":
						qemutest.HoldWithQemuIO(t, path, qemutest.QemuIOWriteLocks)
					case state == "held ro" && raw:
						qemutest.HoldWithQemuIO(t, path, qemuIORawReadLocks, "-r", "-f", "raw")
					case state == "held ro":
						qemutest.HoldWithQemuIO(t, path, qemutest.QemuIOReadLocks, "-r")
					}
				}
				if state == "held rw" && raw {
					stricterOnRawBacking(t, ours, theirs, tc.base, tc.args)
					return
				}
				sameAsQemuImg(t, ours, theirs, tc.args)
			})
		}
	}
}

// sameAsQemuImg runs ublkimg in ours and qemu-img in theirs with args:
// the same exit status, stdout and messages (qemu-img's in ublkimg's
// one-line form, toolStderr), and afterwards the same bytes
// in every file (snapshot dates aside). Where qemu-img refuses, it must
// have changed nothing.
func sameAsQemuImg(t *testing.T, ours, theirs string, args []string) {
	t.Helper()
	before := dirFiles(t, theirs)
	want := runIn(t, theirs, "qemu-img", args...)
	got := runIn(t, ours, binary, args...)
	if got.code != want.code || got.stdout != want.stdout {
		t.Errorf("ublkimg %v: exit %d, stdout:\n%s\nqemu-img: exit %d, stdout:\n%s", args, got.code, got.stdout, want.code, want.stdout)
	}
	if gotLines, wantLines := toolStderr(t, got, want); gotLines != wantLines {
		t.Errorf("ublkimg %v: stderr:\n%s\nqemu-img's, as ublkimg words it:\n%s", args, gotLines, wantLines)
	}
	if ch := changedFiles(before, dirFiles(t, theirs)); want.code != 0 && len(ch) > 0 {
		t.Errorf("qemu-img %v refused but changed %v", args, ch)
	}
	sameFiles(t, ours, theirs)
}

// stricterOnRawBacking: qemu-img opens a raw backing file sharing writes
// (QEMU's raw node passes through the permissions of an overlay that
// shares everything), so it goes on while qemu-io writes it. ublkimg's
// readers never share writing: it refuses, as it does a qcow2 backing
// file written by another process, and changes nothing.
func stricterOnRawBacking(t *testing.T, ours, theirs, base string, args []string) {
	t.Helper()
	if want := runIn(t, theirs, "qemu-img", args...); want.code != 0 {
		t.Errorf("qemu-img %v with its raw backing file written by qemu-io: exit %d\n%s%s",
			args, want.code, want.stdout, want.stderr)
	}
	before := dirFiles(t, ours)
	got := runIn(t, ours, binary, args...)
	if got.code != 1 || !strings.HasSuffix(got.stderr, "Could not open backing file: Failed to get shared \"write\" lock\n"+
		"Is another process using the image ["+base+"]?\n") {
		t.Errorf("ublkimg %v: exit %d\n%s%s", args, got.code, got.stdout, got.stderr)
	}
	if ch := changedFiles(before, dirFiles(t, ours)); len(ch) > 0 {
		t.Errorf("ublkimg %v changed %v", args, ch)
	}
}

// sameFiles compares every file of ours with the one of the same name in
// theirs, byte for byte, with the dates of qcow2 snapshots masked (two runs
// take a snapshot at different times).
func sameFiles(t *testing.T, ours, theirs string) {
	t.Helper()
	a, b := dirFiles(t, ours), dirFiles(t, theirs)
	for _, name := range changedFiles(a, b) {
		x, errX := os.ReadFile(filepath.Join(ours, name))
		y, errY := os.ReadFile(filepath.Join(theirs, name))
		if errX != nil || errY != nil {
			t.Errorf("%s: in one directory only (%v, %v)", name, errX, errY)
			continue
		}
		if !bytes.Equal(maskSnapshotDates(x), maskSnapshotDates(y)) {
			t.Errorf("%s differs from qemu-img's (%d bytes, qemu-img's %d; first difference at %d)",
				name, len(x), len(y), firstDifference(x, y))
		}
	}
}

func firstDifference(x, y []byte) int {
	for i := range min(len(x), len(y)) {
		if x[i] != y[i] {
			return i
		}
	}
	return min(len(x), len(y))
}

// maskSnapshotDates returns a copy of a qcow2 image with the date of every
// snapshot in its snapshot table zeroed; anything else (or a table it
// cannot walk) stays as it is.
func maskSnapshotDates(b []byte) []byte {
	b = slices.Clone(b)
	if len(b) < 72 || string(b[:4]) != "QFI\xfb" {
		return b
	}
	be := bin.BigEndian
	n, off := be.Uint32(b[60:]), be.Uint64(b[64:])
	for range n {
		if off+40 > uint64(len(b)) {
			break
		}
		e := b[off:]
		clear(e[16:24]) // date_sec, date_nsec
		size := 40 + uint64(be.Uint32(e[36:])) + uint64(be.Uint16(e[12:])) + uint64(be.Uint16(e[14:]))
		off += (size + 7) &^ 7
	}
	return b
}
