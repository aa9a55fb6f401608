package qcow2_test

import (
	"bytes"
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// TestFreedClusterReuseWithDiscard frees metadata clusters whose discard
// is queued (pass-discard-other: the old L1 table after it grew, the old
// refcount table after it grew) and then allocates, so that the freed
// clusters take new guest data. The queued discards must reach the file
// before the clusters are handed out again, or they punch holes in the new
// data: qemu-img must read back every byte written, and check must find
// the image clean.
func TestFreedClusterReuseWithDiscard(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	cases := []struct {
		name, size string
		create     []string
		cmds       []string // qemu-io, before the driver opens the image
		// grow, if not 0, resizes the image first (moving the L1 table).
		grow int64
		// writes are driver writes, in order: [offset, length, count]
		// for count writes of length bytes, one after the other.
		writes [][3]int64
	}{
		// The L1 table moves when the image grows; the first new data
		// cluster is the old table's.
		{"L1 table", "4M", []string{"-o", "cluster_size=4k"}, []string{"write -P 1 0 4k"},
			64 << 20, [][3]int64{{1 << 20, 4096, 1}, {1<<20 + 8192, 8192, 1}}},
		// 512-byte clusters with 64-bit refcounts: one refcount table
		// cluster covers 2 MiB of file, so the table is replaced
		// during the single-cluster writes after the first 1.5 MiB,
		// and the write that replaced it takes the old one's cluster.
		{"refcount table", "8M", []string{"-o", "cluster_size=512,refcount_bits=64"}, nil,
			0, [][3]int64{{0, 3 << 19, 1}, {3 << 19, 512, 2048}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			path := qimg(t, filepath.Join(t.TempDir(), "a.qcow2"), c.size, c.create...)
			if len(c.cmds) > 0 {
				qio(t, path, c.cmds...)
			}
			want := rawOf(t, path)
			spec := bdrv.Spec{Filename: path, Options: bdrv.Options{qcow2.OptPassDiscardOther: "on"}}
			bdrvtest.WithNode(t, spec, func(co *coroutine.Co, n *bdrv.Node) error {
				if c.grow != 0 {
					if err := n.Truncate(co, c.grow, false, bdrv.PreallocOff); err != nil {
						return err
					}
					want = append(want, make([]byte, c.grow-int64(len(want)))...)
				}
				for i, w := range c.writes {
					p := pattern(uint64(i+1), int(w[1]*w[2]))
					for k := int64(0); k < w[2]; k++ {
						b := bytes.Clone(p[k*w[1] : (k+1)*w[1]])
						if err := n.Pwritev(co, w[0]+k*w[1], bdrv.IOVec{b}, 0); err != nil {
							return err
						}
					}
					copy(want[w[0]:], p)
				}
				return n.Flush(co)
			})
			qcheck(t, path, false)
			if i := firstDiff(rawOf(t, path), want); i >= 0 {
				t.Fatalf("qemu-img reads other data than written from %#x", i)
			}
		})
	}
}
