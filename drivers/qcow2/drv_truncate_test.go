package qcow2_test

import (
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestTruncateMatchesQemu resizes copies of one image with Node.Truncate and
// with qemu-img resize and compares the results byte for byte.
func TestTruncateMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	cases := []struct {
		name, opts, size string
		cmds             []string
		newSize          int64
		prealloc         string
	}{
		{"grow", "", "64M", mixedWrites, 100 << 20, "off"},
		{"grow_l1", "cluster_size=4k", "4M", mixedWrites, 64 << 20, "off"},
		{"grow_unaligned", "", "1000k", []string{"write -P 1 0 1000k"}, 3 << 20, "off"},
		{"shrink", "", "64M", append(mixedWrites, "write -P 9 10m 20m", "write -P 8 60m 1m"), 12 << 20, "off"},
		{"shrink_unaligned", "", "64M", append(mixedWrites, "write -P 9 10m 20m"), 12<<20 + 5120, "off"},
		{"shrink_4k", "cluster_size=4k", "16M", []string{"write -P 9 0 16m"}, 3 << 20, "off"},
		{"grow_metadata", "", "8M", mixedWrites, 100 << 20, "metadata"},
		{"grow_falloc", "", "8M", mixedWrites, 20 << 20, "falloc"},
		{"grow_full_unaligned", "", "1000k", []string{"write -P 1 0 1000k"}, 5 << 20, "full"},
		{"grow_extl2_metadata", "extended_l2=on", "8M", mixedWrites, 20 << 20, "metadata"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			args := []string{}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			q := qimg(t, filepath.Join(dir, "q.qcow2"), c.size, args...)
			qio(t, q, c.cmds...)
			o := filepath.Join(dir, "o.qcow2")
			b, _ := os.ReadFile(q)
			os.WriteFile(o, b, 0o644)
			want := rawOf(t, q)
			ra := []string{"resize", "-q", "--preallocation=" + c.prealloc}
			if c.newSize < int64(len(want)) {
				ra = append(ra, "--shrink")
			}
			sh(t, "qemu-img", append(ra, q, strconv.FormatInt(c.newSize, 10))...)
			pa, _ := bdrv.ParsePrealloc(c.prealloc)
			bdrvtest.WithNode(t, bdrv.Spec{Filename: o}, func(co *coroutine.Co, n *bdrv.Node) error {
				return n.Truncate(co, c.newSize, false, pa)
			})
			qcheck(t, o, false)
			got := rawOf(t, o)
			if int64(len(got)) != c.newSize {
				t.Fatalf("size %d, want %d", len(got), c.newSize)
			}
			want = append(want[:min(int64(len(want)), c.newSize)], make([]byte, max(0, c.newSize-int64(len(want))))...)
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("content differs at %#x", i)
			}
			qb, _ := os.ReadFile(q)
			ob, _ := os.ReadFile(o)
			if len(qb) != len(ob) {
				t.Errorf("file size %d, qemu-img resize makes %d", len(ob), len(qb))
			}
			if i := firstDiff(ob, qb); i >= 0 && !strings.Contains(c.name, "xx") {
				t.Errorf("bytes differ from qemu-img's from %#x (ours % x, qemu % x)", i,
					ob[i:min(i+16, len(ob))], qb[i:min(i+16, len(qb))])
			}
		})
	}
}

// TestTruncateWithSnapshots resizes copies of images with internal
// snapshots with Node.Truncate and with qemu-img resize, compares the
// results byte for byte, then applies the snapshot (which takes the image
// back to the snapshot's size) with the driver and with qemu-img snapshot
// -a and compares what qemu-img check, info, map and compare see. A
// version 2 image with snapshots cannot be resized.
func TestTruncateWithSnapshots(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	cases := []struct {
		name, size    string
		create        []string // qemu-img create arguments
		before, after []string // qemu-io commands around the snapshot
		newSize       int64
		resized       []string // qemu-io commands after the resize
		wantErr       string
	}{
		{"grow", "4M", nil, []string{"write -P 1 0 3M"}, []string{"write -P 2 1M 1M"}, 100 << 20, []string{"write -P 4 50M 1M"}, ""},
		{"grow_l1", "4M", []string{"-o", "cluster_size=4k"}, mixedWrites, []string{"write -P 2 1M 1M", "write -c -P 3 2M 4k"}, 64 << 20, nil, ""},
		{"shrink", "16M", nil, []string{"write -P 1 0 16M"}, []string{"write -P 2 1M 1M", "write -P 3 10M 1M"}, 2 << 20, nil, ""},
		{"shrink_4k", "16M", []string{"-o", "cluster_size=4k"}, []string{"write -P 9 0 16m"}, []string{"write -P 2 8M 4k"}, 3 << 20, nil, ""},
		{"v2", "4M", []string{"-o", "compat=0.10"}, []string{"write -P 1 0 1M"}, nil, 8 << 20, nil, "Can't resize a v2 image which has snapshots"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			q := qimg(t, filepath.Join(dir, "q.qcow2"), c.size, c.create...)
			qio(t, q, c.before...)
			sh(t, "qemu-img", "snapshot", "-c", "s1", q)
			snap := rawOf(t, q)
			if len(c.after) > 0 {
				qio(t, q, c.after...)
			}
			o := filepath.Join(dir, "o.qcow2")
			b, _ := os.ReadFile(q)
			os.WriteFile(o, b, 0o644)

			var err error
			bdrvtest.WithNode(t, bdrv.Spec{Filename: o}, func(co *coroutine.Co, n *bdrv.Node) error {
				err = n.Truncate(co, c.newSize, false, bdrv.PreallocOff)
				return nil
			})
			if c.wantErr != "" {
				if err == nil || err.Error() != c.wantErr || !errors.Is(err, unix.ENOTSUP) {
					t.Fatalf("resize: error %v, want %q", err, c.wantErr)
				}
				out, qerr := exec_("resize", q, strconv.FormatInt(c.newSize, 10))
				if qerr == nil || !strings.Contains(out, c.wantErr) {
					t.Fatalf("qemu-img resize: %v %s, want %q", qerr, out, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			sh(t, "qemu-img", "resize", "-q", "--shrink", q, strconv.FormatInt(c.newSize, 10))
			qcheck(t, o, false)
			qb, _ := os.ReadFile(q)
			ob, _ := os.ReadFile(o)
			if i := firstDiff(ob, qb); i >= 0 || len(ob) != len(qb) {
				t.Fatalf("resized image differs from qemu-img's from %#x (sizes %d, %d)", i, len(ob), len(qb))
			}
			if got, want := sh(t, "qemu-img", "snapshot", "-l", o), sh(t, "qemu-img", "snapshot", "-l", q); got != want {
				t.Errorf("snapshot -l:\n%s\nqemu-img's:\n%s", got, want)
			}

			if len(c.resized) > 0 {
				qio(t, q, c.resized...)
				qio(t, o, c.resized...)
			}
			sh(t, "qemu-img", "snapshot", "-a", "s1", q)
			bdrvtest.WithNode(t, bdrv.Spec{Filename: o}, func(co *coroutine.Co, n *bdrv.Node) error {
				return imageOf(t, n).ApplySnapshot(co, "s1")
			})
			qcheck(t, o, false)
			sh(t, "qemu-img", "compare", o, q)
			// Going back to a smaller size cuts the file after the last
			// cluster in use before the snapshot's tables come back.
			if oi, qi := fileSize(t, o), fileSize(t, q); oi != qi {
				t.Errorf("file size %d after apply, qemu-img's %d", oi, qi)
			}
			if i := firstDiff(rawOf(t, o), snap); i >= 0 {
				t.Errorf("applied snapshot differs from the snapshot's content at %#x", i)
			}
			// Allocated clusters and image end; info without the file's
			// own name and allocated size; the map without host offsets.
			strip := regexp.MustCompile(`(?m)^ *"(actual-size|filename)": .*\n|, "offset": \d+`)
			for _, a := range [][]string{{"check", "--output=json"}, {"info", "--output=json"}, {"map", "--output=json"}} {
				got := strip.ReplaceAllString(sh(t, "qemu-img", append(a, o)...), "")
				want := strip.ReplaceAllString(sh(t, "qemu-img", append(a, q)...), "")
				if got != want {
					t.Errorf("qemu-img %v after our apply:\n%s\nafter qemu-img's:\n%s", a, got, want)
				}
			}
		})
	}
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}
