package qcow2_test

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// infoNoName is qemu-img info without the lines naming the file.
func infoNoName(t *testing.T, path string) string {
	var out []string
	for _, l := range strings.Split(sh(t, "qemu-img", "info", "-U", path), "\n") {
		if !strings.HasPrefix(l, "image:") && !strings.HasPrefix(l, "disk size:") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestAmend compares Amend with qemu-img amend: a compat 0.10 image with
// a snapshot upgraded to 1.1, and lazy refcounts turned on and (on a dirty
// image) off again.
func TestAmend(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	amend := func(path string, o qcow2.AmendOptions, write bool) {
		t.Helper()
		bdrvtest.WithNode(t, bdrv.Spec{Filename: path}, func(co *coroutine.Co, n *bdrv.Node) error {
			if write {
				if err := n.Pwritev(co, 1<<20, bdrv.IOVec{bytes.Repeat([]byte{5}, 200<<10)}, 0); err != nil {
					return err
				}
				if h := imageOf(t, n).Header(); !h.Dirty() {
					return errors.New("lazy refcounts: image not dirty after a write")
				}
			}
			return imageOf(t, n).AmendWith(co, o)
		})
	}
	ours := qimg(t, filepath.Join(dir, "v2.qcow2"), "4M", "-o", "compat=0.10")
	qio(t, ours, "write -P 1 0 1M")
	sh(t, "qemu-img", "snapshot", "-c", "s", ours)
	qio(t, ours, "write -P 2 0 512k")
	theirs := filepath.Join(dir, "q.qcow2")
	sh(t, "cp", ours, theirs)

	amend(ours, qcow2.AmendOptions{Version: 3}, false)
	sh(t, "qemu-img", "amend", "-o", "compat=1.1", theirs)
	qcheck(t, ours, false)
	sh(t, "qemu-img", "compare", ours, theirs)
	if a, b := infoNoName(t, ours), infoNoName(t, theirs); a != b {
		t.Fatalf("after upgrade:\n%s\nqemu-img:\n%s", a, b)
	}
	on, off := true, false
	amend(ours, qcow2.AmendOptions{LazyRefcounts: &on}, false)
	sh(t, "qemu-img", "amend", "-o", "lazy_refcounts=on", theirs)
	if a, b := infoNoName(t, ours), infoNoName(t, theirs); a != b || !strings.Contains(a, "lazy refcounts: true") {
		t.Fatalf("lazy on:\n%s\nqemu-img:\n%s", a, b)
	}
	// A write makes the image dirty; turning lazy refcounts off must leave
	// it clean.
	amend(ours, qcow2.AmendOptions{LazyRefcounts: &off}, true)
	qio(t, theirs, "write -P 5 1M 200k")
	sh(t, "qemu-img", "amend", "-o", "lazy_refcounts=off", theirs)
	qcheck(t, ours, false)
	sh(t, "qemu-img", "compare", ours, theirs)
	if a, b := infoNoName(t, ours), infoNoName(t, theirs); a != b || !strings.Contains(a, "lazy refcounts: false") {
		t.Fatalf("lazy off:\n%s\nqemu-img:\n%s", a, b)
	}

	// Downgrade: preallocated and plain zero clusters, in the active
	// table and in a snapshot's.
	ours = qimg(t, filepath.Join(dir, "v3.qcow2"), "4M")
	qio(t, ours, "write -P 1 0 1M", "write -z 0 64k", "write -z -u 128k 64k", "write -z 2M 64k")
	sh(t, "qemu-img", "snapshot", "-c", "s", ours)
	qio(t, ours, "write -P 3 0 128k", "write -z 512k 64k")
	sh(t, "cp", ours, theirs)
	amend(ours, qcow2.AmendOptions{Version: 2}, false)
	sh(t, "qemu-img", "amend", "-o", "compat=0.10", theirs)
	qcheck(t, ours, false)
	sh(t, "qemu-img", "compare", ours, theirs)
	if a, b := infoNoName(t, ours), infoNoName(t, theirs); a != b || !strings.Contains(a, "compat: 0.10") {
		t.Fatalf("downgrade:\n%s\nqemu-img:\n%s", a, b)
	}
	if a, b := sh(t, "qemu-img", "map", "--output=json", ours), sh(t, "qemu-img", "map", "--output=json", theirs); a != b {
		t.Fatalf("downgrade map:\n%s\nqemu-img:\n%s", a, b)
	}
	if a, b := snapRaw(t, ours, "s"), snapRaw(t, theirs, "s"); !bytes.Equal(a, b) {
		t.Fatalf("downgrade: snapshot differs at %d", firstDiff(a, b))
	}

	// Refusals, as QEMU's.
	v2 := qimg(t, filepath.Join(dir, "r.qcow2"), "1M", "-o", "compat=0.10")
	r8 := qimg(t, filepath.Join(dir, "r8.qcow2"), "1M", "-o", "refcount_bits=8")
	for _, tc := range []struct {
		path string
		o    qcow2.AmendOptions
		want error
	}{
		{v2, qcow2.AmendOptions{LazyRefcounts: &on}, qcow2.ErrAmendLazyV2},
		{v2, qcow2.AmendOptions{RefcountBits: 8}, qcow2.ErrAmendRefcountV2},
		{v2, qcow2.AmendOptions{RefcountBits: 3}, qcow2.ErrAmendRefcountW},
		{r8, qcow2.AmendOptions{Version: 2}, qcow2.ErrAmendDowngrade},
	} {
		bdrvtest.WithNode(t, bdrv.Spec{Filename: tc.path}, func(co *coroutine.Co, n *bdrv.Node) error {
			if err := imageOf(t, n).AmendWith(co, tc.o); err != tc.want {
				t.Errorf("Amend(%+v) = %v, want %v", tc.o, err, tc.want)
			}
			return nil
		})
	}
}
