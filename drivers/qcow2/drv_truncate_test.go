package qcow2_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// TestTruncateMatchesQemu resizes copies of one image with Node.Truncate and
// with qemu-img resize and compares the results byte for byte.
func TestTruncateMatchesQemu(t *testing.T) {
	needQemu(t)
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
			withNode(t, bdrv.Spec{Filename: o}, func(co *coroutine.Co, n *bdrv.Node) error {
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
