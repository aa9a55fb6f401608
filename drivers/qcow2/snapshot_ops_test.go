package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// snapRaw converts snapshot name of path to raw with qemu-img.
func snapRaw(t *testing.T, path, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "snap.raw")
	sh(t, "qemu-img", "convert", "-U", "-l", "snapshot.name="+name, "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readAll(co *coroutine.Co, n *bdrv.Node) ([]byte, error) {
	b := bdrv.AlignedBuffer(int(n.Length()), 4096)
	return b, n.Preadv(co, 0, bdrv.IOVec{b}, 0)
}

// TestSnapshotOps takes, applies and deletes snapshots with the driver while
// it writes (plain, compressed, zeroes, discard), and checks every step
// against qemu-img: check is clean, qemu-img reads each snapshot as the data
// was when it was taken, and qemu-img applying/deleting the same snapshots
// ends with the same image contents.
func TestSnapshotOps(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, tc := range []struct{ name, opts string }{
		{"default", "cluster_size=65536"},
		{"small-l2slices", "cluster_size=4096,refcount_bits=64"},
		{"extl2", "cluster_size=65536,extended_l2=on"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := qimg(t, filepath.Join(dir, "a.qcow2"), "8M", "-o", tc.opts)
			qio(t, path, "write -P 1 0 1M", "write -c -P 7 2M 128k")
			want := map[string][]byte{}
			spec := bdrv.Spec{Filename: path}
			bdrvtest.WithNode(t, spec, func(co *coroutine.Co, n *bdrv.Node) error {
				q := imageOf(t, n)
				w := func(off int64, p byte, size int, flags bdrv.ReqFlags) {
					if err := n.Pwritev(co, off, bdrv.IOVec{bytes.Repeat([]byte{p}, size)}, flags); err != nil {
						panic(err)
					}
				}
				snap := func(name string) {
					if err := q.CreateSnapshot(co, name); err != nil {
						panic(err)
					}
					b, err := readAll(co, n)
					if err != nil {
						panic(err)
					}
					l, _ := q.ListSnapshots(co)
					want[l[len(l)-1].ID] = b
				}
				snap("s1")
				w(512<<10, 2, 1<<20, 0)
				w(2<<20+4096, 3, 4096, 0)
				w(4<<20, 4, 64<<10, bdrv.ReqWriteCompressed)
				snap("s2")
				if err := n.PwriteZeroes(co, 0, 256<<10, bdrv.ReqMayUnmap); err != nil {
					panic(err)
				}
				if err := n.Pdiscard(co, 4<<20, 64<<10); err != nil {
					panic(err)
				}
				w(6<<20, 5, 3<<10, 0)
				snap("s1") // duplicate names are allowed, as in QEMU
				w(7<<20, 6, 1<<20, 0)
				b, _ := readAll(co, n)
				want["active"] = b
				if got, _ := q.ListSnapshots(co); len(got) != 3 || got[2].ID != "3" || got[2].Name != "s1" {
					panic(fmt.Sprintf("snapshot list %+v", got))
				}
				return nil
			})
			qcheck(t, path, false)
			if got := rawOf(t, path); !bytes.Equal(got, want["active"]) {
				t.Fatalf("active data differs at %d", firstDiff(got, want["active"]))
			}
			for _, id := range []string{"1", "2", "3"} {
				out := filepath.Join(t.TempDir(), "s.raw")
				sh(t, "qemu-img", "convert", "-U", "-l", "snapshot.id="+id, "-O", "raw", path, out)
				got, _ := os.ReadFile(out)
				w := want[id]
				if !bytes.Equal(got, w) {
					t.Fatalf("snapshot %s differs at %d", id, firstDiff(got, w))
				}
			}
			list := sh(t, "qemu-img", "snapshot", "-l", path)
			if strings.Count(list, "\n") != 5 {
				t.Fatalf("qemu-img snapshot -l:\n%s", list)
			}

			// Apply and delete with ours and with qemu-img on a copy.
			theirs := filepath.Join(dir, "q.qcow2")
			sh(t, "cp", path, theirs)
			sh(t, "qemu-img", "snapshot", "-a", "2", theirs)
			sh(t, "qemu-img", "snapshot", "-d", "s1", theirs)
			bdrvtest.WithNode(t, spec, func(co *coroutine.Co, n *bdrv.Node) error {
				q := imageOf(t, n)
				if err := q.ApplySnapshot(co, "2"); err != nil {
					return err
				}
				if b, _ := readAll(co, n); !bytes.Equal(b, want["2"]) {
					panic(fmt.Sprintf("after apply: differs at %d", firstDiff(b, want["2"])))
				}
				if err := q.DeleteSnapshot(co, "s1"); err != nil {
					return err
				}
				if err := q.ApplySnapshot(co, "nope"); !errors.Is(err, unix.ENOENT) {
					panic(fmt.Sprintf("apply nope: %v", err))
				}
				return nil
			})
			qcheck(t, path, false)
			sh(t, "qemu-img", "compare", path, theirs)
			if got, w := snapRaw(t, path, "s2"), want["2"]; !bytes.Equal(got, w) {
				t.Fatalf("s2 after ops differs at %d", firstDiff(got, w))
			}
			// Delete everything with ours; the image must stay clean and
			// writable in place.
			bdrvtest.WithNode(t, spec, func(co *coroutine.Co, n *bdrv.Node) error {
				q := imageOf(t, n)
				snaps, err := q.ListSnapshots(co)
				if err != nil {
					return err
				}
				for _, s := range snaps {
					if err := q.DeleteSnapshot(co, s.Name); err != nil {
						return err
					}
				}
				return n.Pwritev(co, 0, bdrv.IOVec{bytes.Repeat([]byte{9}, 64<<10)}, 0)
			})
			qcheck(t, path, false)
			if out := sh(t, "qemu-img", "snapshot", "-l", path); out != "" {
				t.Fatalf("snapshots left:\n%s", out)
			}
		})
	}
}

// TestSnapshotQemuMade applies and deletes snapshots qemu-img took.
func TestSnapshotQemuMade(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	path := qimg(t, filepath.Join(dir, "a.qcow2"), "4M")
	qio(t, path, "write -P 1 0 2M")
	sh(t, "qemu-img", "snapshot", "-c", "a", path)
	qio(t, path, "write -P 2 1M 2M")
	sh(t, "qemu-img", "snapshot", "-c", "b", path)
	qio(t, path, "write -P 3 0 4M")
	theirs := filepath.Join(dir, "q.qcow2")
	sh(t, "cp", path, theirs)
	sh(t, "qemu-img", "snapshot", "-a", "a", theirs)
	sh(t, "qemu-img", "snapshot", "-d", "b", theirs)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path}, func(co *coroutine.Co, n *bdrv.Node) error {
		q := imageOf(t, n)
		if err := q.ApplySnapshot(co, "a"); err != nil {
			return err
		}
		return q.DeleteSnapshot(co, "b")
	})
	qcheck(t, path, false)
	sh(t, "qemu-img", "compare", path, theirs)
	if _, err := exec.Command("qemu-img", "snapshot", "-a", "a", path).CombinedOutput(); err != nil {
		t.Fatal(err)
	}
	qcheck(t, path, false)
}

// TestSnapshotRefused: external data files, and refcount overflow with
// refcount_bits=1 (the image stays clean).
func TestSnapshotRefused(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	path := qimg(t, filepath.Join(dir, "d.qcow2"), "1M", "-o", "data_file="+filepath.Join(dir, "d.raw"))
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path}, func(co *coroutine.Co, n *bdrv.Node) error {
		if err := imageOf(t, n).CreateSnapshot(co, "x"); !errors.Is(err, unix.ENOTSUP) {
			panic(fmt.Sprintf("data file: %v", err))
		}
		return nil
	})
	path = qimg(t, filepath.Join(dir, "r.qcow2"), "1M", "-o", "refcount_bits=1")
	qio(t, path, "write -P 1 0 128k")
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path}, func(co *coroutine.Co, n *bdrv.Node) error {
		if err := imageOf(t, n).CreateSnapshot(co, "x"); !errors.Is(err, unix.ERANGE) {
			panic(fmt.Sprintf("refcount_bits=1: %v", err))
		}
		return nil
	})
	qcheck(t, path, true)
	var _ = qcow2.ErrSnapshotNotFound
}
