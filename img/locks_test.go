package img

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestVerbsReleaseLocks runs each verb in this process, in rounds, while
// children are forked all the time (qemutest.ForkStorm), and checks that once the verb returns
// no lock byte is left on any image it opened: qemu-io takes the write
// lock at once, with no retry.
func TestVerbsReleaseLocks(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	shell(t, dir, `
qemu-img create -q -f qcow2 a.qcow2 1M
qemu-io -c "write -P 1 0 64k" a.qcow2 >/dev/null
qemu-img create -q -f qcow2 busy.qcow2 1M
qemu-io -c "write -P 2 0 64k" busy.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b busy.qcow2 -F qcow2 top.qcow2
`)
	p := func(name string) string { return filepath.Join(dir, name) }
	convert := func(src, dst, format string) func(co *coroutine.Co) error {
		return func(co *coroutine.Co) error {
			o := defaultConvertOptions([]string{p(src)}, p(dst))
			o.TargetFormat = format
			return Convert(co, o)
		}
	}
	loop, err := coroutine.Start(coroutine.Config{OnThread: qemutest.BlockStormSignals})
	if err != nil {
		t.Fatal(err)
	}
	defer loop.Close()
	qemutest.ForkStorm(t)
	for round := range 4 {
		snap := fmt.Sprint("s", round)
		for _, v := range []struct {
			name   string
			run    func(co *coroutine.Co) error
			images []string
		}{
			{"create", func(co *coroutine.Co) error {
				return Create(co, CreateOptions{Filename: p("new.qcow2"), Format: "qcow2", Size: 1 << 20, Quiet: true}, nil)
			}, []string{"new.qcow2"}},
			{"create raw", func(co *coroutine.Co) error {
				return Create(co, CreateOptions{Filename: p("new.raw"), Format: "raw", Size: 1 << 20, Quiet: true}, nil)
			}, []string{"new.raw"}},
			{"convert", convert("top.qcow2", "new.qcow2", "qcow2"), []string{"top.qcow2", "busy.qcow2", "new.qcow2"}},
			{"convert raw", convert("a.qcow2", "new.raw", "raw"), []string{"a.qcow2", "new.raw"}},
			{"dd", func(co *coroutine.Co) error {
				return DD(co, DDOptions{Input: p("a.qcow2"), Output: p("dd.raw"), BlockSize: 65536})
			}, []string{"a.qcow2", "dd.raw"}},
			{"bench -w", func(co *coroutine.Co) error {
				_, err := Bench(co, BenchOptions{Filename: p("busy.qcow2"), Count: 16, Depth: 4, BufSize: 4096, Write: true}, nil)
				return err
			}, []string{"busy.qcow2"}},
			{"amend", func(co *coroutine.Co) error {
				return Amend(co, AmendOptions{Filename: p("busy.qcow2"), Options: "lazy_refcounts=off"})
			}, []string{"busy.qcow2"}},
			{"commit", func(co *coroutine.Co) error {
				return Commit(co, CommitOptions{Filename: p("top.qcow2"), Cache: bdrv.CacheUnsafe}, nil)
			}, []string{"top.qcow2", "busy.qcow2"}},
			{"rebase", func(co *coroutine.Co) error {
				return Rebase(co, RebaseOptions{Filename: p("top.qcow2"), Backing: "busy.qcow2", BackingFormat: "qcow2",
					Cache: bdrv.CacheWriteback, SourceCache: bdrv.CacheWriteback})
			}, []string{"top.qcow2", "busy.qcow2"}},
			{"resize", func(co *coroutine.Co) error {
				return Resize(co, ResizeOptions{Filename: p("busy.qcow2"), Size: "+64k"}, nil)
			}, []string{"busy.qcow2"}},
			{"snapshot -c", func(co *coroutine.Co) error {
				return Snapshot(co, SnapshotOptions{Filename: p("busy.qcow2"), Op: SnapshotCreateOp, Name: snap}, nil)
			}, []string{"busy.qcow2"}},
			{"snapshot -a", func(co *coroutine.Co) error {
				return Snapshot(co, SnapshotOptions{Filename: p("busy.qcow2"), Op: SnapshotApplyOp, Name: snap}, nil)
			}, []string{"busy.qcow2"}},
			{"snapshot -d", func(co *coroutine.Co) error {
				return Snapshot(co, SnapshotOptions{Filename: p("busy.qcow2"), Op: SnapshotDeleteOp, Name: snap}, nil)
			}, []string{"busy.qcow2"}},
			{"bitmap", func(co *coroutine.Co) error {
				return Bitmap(co, BitmapOptions{Args: []string{p("busy.qcow2"), snap}, Ops: []BitmapOp{{Action: bdrv.BitmapAdd}, {Action: bdrv.BitmapRemove}}})
			}, []string{"busy.qcow2"}},
			{"check -r", func(co *coroutine.Co) error {
				_, err := Check(co, CheckOptions{Filename: p("top.qcow2"), Repair: RepairAll}, nil, nil)
				return err
			}, []string{"top.qcow2", "busy.qcow2"}},
		} {
			if err := loop.Call(v.run); err != nil {
				t.Fatalf("round %d, %s: %v", round, v.name, err)
			}
			for _, img := range v.images {
				if held, err := qemutest.LockedBytes(p(img)); err != nil || len(held) > 0 {
					t.Fatalf("round %d: %s left lock bytes %v on %s (%v)", round, v.name, held, img, err)
				}
				format := "qcow2"
				if strings.HasSuffix(img, ".raw") {
					format = "raw"
				}
				out, err := exec.Command("qemu-io", "-f", format, "-c", "write -P 9 512 512", p(img)).CombinedOutput()
				if err != nil || strings.Contains(string(out), "lock") {
					t.Fatalf("round %d: qemu-io cannot write %s right after %s: %v\n%s", round, img, v.name, err, out)
				}
			}
		}
	}
}
