package qcow2

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// Images whose active L1 entries all name one L2 table: every entry counts
// a reference to that table and to the clusters it maps, so a small file
// holds millions of references. qemu-img check 7.2 on the 34 MB image with
// 4M entries peaks at 73 MB and reports 8257540 corruptions (2 lines per
// reference past the refcount maximum, streamed to stderr); Check must
// give the same and stay within twice qemu-img's memory, the repair a
// read-write open runs on a dirty image too.

// ckAliasedImage writes an image with 512-byte clusters, 2^order-bit
// refcounts and an L1 table of n entries, all naming the one L2 table,
// which maps one data cluster (at guest offset 0). COPIED is set on the L1
// entries when copied; dirty sets the dirty bit of lazy refcounts. The
// refcounts are those of an image with one L1 entry: 1 for every cluster.
func ckAliasedImage(t testing.TB, dir string, n uint64, order uint32, copied, dirty bool) string {
	t.Helper()
	const cs = 512
	l1c := (n*8 + cs - 1) / cs
	l2 := (1 + l1c) * cs
	used := 1 + l1c + 2 // header, L1, L2, data
	blocks, table := refcountMetadataSize(used, cs, order, false)
	rb, rt := used*cs, (used+blocks)*cs
	h := &Header{Version: 3, ClusterBits: 9, Size: n * cs / 8 * cs, L1Size: uint32(n), L1TableOffset: cs,
		RefcountTableOffset: rt, RefcountTableClusters: uint32(table), RefcountOrder: order}
	if dirty {
		h.IncompatibleFeatures, h.CompatibleFeatures = IncompatDirty, CompatLazyRefcounts
	}
	hdr, err := h.Marshal(cs)
	if err != nil {
		t.Fatal(err)
	}
	g := h.Geometry()
	meta := make([]byte, (blocks+table)*cs) // refcount blocks, then the table
	for c := range used + blocks + table {
		blk := meta[c/g.RefblockEntries()*cs:][:cs]
		if err := g.SetRefcount(blk, c%g.RefblockEntries(), 1); err != nil {
			t.Fatal(err)
		}
	}
	for i := range blocks {
		be.PutUint64(meta[blocks*cs+i*8:], rb+i*cs)
	}
	l1e := l2
	if copied {
		l1e |= OflagCopied
	}
	l1 := bytes.Repeat(be.AppendUint64(nil, l1e), int(min(n, 1<<17)))
	l2t := make([]byte, cs)
	be.PutUint64(l2t, (l2+cs)|OflagCopied)
	data := bytes.Repeat([]byte("aliased!"), cs/8)

	p := filepath.Join(dir, "aliased.qcow2")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	write := func(b []byte, off uint64) {
		if _, err := f.WriteAt(b, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	write(hdr, 0)
	for i := uint64(0); i < n; i += 1 << 17 {
		write(l1[:min(n-i, 1<<17)*8], cs+i*8)
	}
	write(l2t, l2)
	write(data, l2+cs)
	write(meta, rb)
	return p
}

// TestCheckL1Aliasing compares check and repair of a small aliased image
// with qemu-img's (refcount_bits=8 overflows after 255 references).
func TestCheckL1Aliasing(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, copied := range []bool{true, false} {
		t.Run(fmt.Sprintf("COPIED=%v", copied), func(t *testing.T) {
			im := ckImage{path: ckAliasedImage(t, t.TempDir(), 2048, 3, copied, false)}
			for _, fix := range []FixMode{0, FixLeaks, FixAll} {
				ckCompare(t, im, im.path, fix)
			}
		})
	}
}

// ckMemLimit is twice qemu-img check's peak on the 4M-entry image.
const ckMemLimit = 2 * 73 << 20

// TestCheckL1AliasingMemory checks the 34 MB image with 4M aliased L1
// entries, and opens a dirty copy read-write (which repairs it), each in a
// child process that dies as soon as its resident memory passes
// ckMemLimit. The check must report what qemu-img reports.
func TestCheckL1AliasingMemory(t *testing.T) {
	if p := os.Getenv("UBLKIMG_CKMEM_IMAGE"); p != "" {
		ckMemChild(t, p, os.Getenv("UBLKIMG_CKMEM_MODE"))
		return
	}
	qemutest.Require(t, "qemu-img")
	if testing.Short() || ckRace {
		t.Skip("checks 4M L1 entries; memory bound without the race detector")
	}
	const n, refMax = 1 << 22, 1<<16 - 1
	p := ckAliasedImage(t, t.TempDir(), n, 4, true, false)
	dirty := ckAliasedImage(t, t.TempDir(), n, 4, false, true)
	for _, c := range []struct {
		mode, path string
		want       string
	}{
		// qemu-img check: exit 2, 8257540 corruptions (two clusters, each
		// referenced n times: n-refMax overflows and one refcount
		// mismatch), every L1 entry allocated, two lines per overflow
		// and one per mismatch.
		{"check", p, fmt.Sprintf("exit=2 corruptions=%d leaks=0 allocated=%d lines=%d",
			2*(n-refMax)+2, n, 4*(n-refMax)+2)},
		{"open", dirty, "open=ok"},
		// The repair fixed both refcounts (to the maximum) and the COPIED
		// flag of the data cluster; the overflows remain.
		{"check", dirty, fmt.Sprintf("exit=2 corruptions=%d leaks=0 allocated=%d lines=%d",
			2*(n-refMax), n, 4*(n-refMax))},
	} {
		t.Run(c.mode, func(t *testing.T) {
			start := time.Now()
			cmd := exec.Command(os.Args[0], "-test.run=^TestCheckL1AliasingMemory$", "-test.v")
			cmd.Env = append(os.Environ(), "UBLKIMG_CKMEM_IMAGE="+c.path, "UBLKIMG_CKMEM_MODE="+c.mode)
			out, err := cmd.CombinedOutput()
			var got string
			var hwm int64
			for l := range strings.Lines(string(out)) {
				if s, ok := strings.CutPrefix(l, "ckmem: "); ok {
					f := strings.Fields(s)
					hwm, _ = strconv.ParseInt(strings.TrimPrefix(f[0], "hwm="), 10, 64)
					got = strings.Join(f[1:], " ")
				}
			}
			if err != nil || got != c.want {
				t.Fatalf("child: %v, got %q, want %q\n%s", err, got, c.want, out)
			}
			if hwm<<10 > ckMemLimit {
				t.Errorf("peak RSS %d KiB, limit %d KiB", hwm, ckMemLimit>>10)
			}
			t.Logf("%s: peak RSS %d KiB (limit %d KiB), %v", c.mode, hwm, ckMemLimit>>10, time.Since(start).Round(time.Millisecond))
		})
	}
	if ckFeatures(t, dirty)[0]&IncompatDirty != 0 {
		t.Error("dirty bit still set after the read-write open")
	}
}

// ckMemChild is the child of TestCheckL1AliasingMemory: it watches its own
// resident memory, runs the check or the open, and prints its peak and
// outcome on a line "ckmem: hwm=<KiB> ...".
func ckMemChild(t *testing.T, path, mode string) {
	go func() {
		for {
			if rss, err := ckProcStatus("VmRSS"); err != nil || rss<<10 > ckMemLimit {
				fmt.Println(err)
				fmt.Printf("resident memory %d KiB passed the limit\n", rss)
				os.Exit(3)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	var res string
	err := coroutine.Run(func(co *coroutine.Co) error {
		if mode == "open" {
			n, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "qcow2"})
			if err != nil {
				return err
			}
			res = "open=ok"
			return n.Close(co)
		}
		f, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "file", ReadOnly: true})
		if err != nil {
			return err
		}
		defer f.Close(co)
		lines := 0
		r, err := Check(co, f, 0, CheckEvents{Message: func(string) { lines++ }})
		if err != nil {
			return err
		}
		res = fmt.Sprintf("exit=%d corruptions=%d leaks=%d allocated=%d lines=%d",
			r.ExitCode(), r.Corruptions, r.Leaks, r.AllocatedClusters, lines)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	hwm, err := ckProcStatus("VmHWM")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("ckmem: hwm=%d %s\n", hwm, res)
}

// ckProcStatus returns a field of /proc/self/status in KiB.
func ckProcStatus(field string) (int64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for l := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s in /proc/self/status", field)
}
