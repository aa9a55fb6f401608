package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// TestCrashSafeMetadata runs a write stream (allocating writes, copy on
// write from a backing file, write-zeroes, discards, compressed writes)
// and copies the image file while the driver is still open, never flushed:
// what a restarted server would find after this process died with the host
// kernel alive. With x-crash-safe-metadata=on the copy must pass qemu-img
// check (leaks allowed) and read back every write; with it off the same
// stream must lose something, or the test proves nothing.
func TestCrashSafeMetadata(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, cfg := range []struct{ name, opts string }{
		{"v3_backed", ""},
		{"extl2_backed", "extended_l2=on"},
		{"lazy_backed", "lazy_refcounts=on"},
		{"v2_4k", "compat=0.10,cluster_size=4k"},
		{"bitmap", ""},
	} {
		for _, on := range []bool{true, false} {
			name := cfg.name + "/off"
			if on {
				name = cfg.name + "/on"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				const size = 4 << 20
				args := []string{}
				if cfg.opts != "" {
					args = append(args, "-o", cfg.opts)
				}
				backed := strings.HasSuffix(cfg.name, "_backed")
				if backed {
					writeRaw(t, filepath.Join(dir, "base.raw"), pattern(31, size))
					args = append(args, "-b", "base.raw", "-F", "raw")
				}
				p := qimg(t, filepath.Join(dir, "img.qcow2"), "4M", args...)
				if cfg.name == "bitmap" {
					// In use on disk while open: a crash leaves it
					// inconsistent, as QEMU's does.
					sh(t, "qemu-img", "bitmap", "--add", p, "b0")
				}
				model := rawOf(t, p)
				cs := int64(headerOf(t, p).ClusterSize())
				ops := genOps(uint64(len(cfg.name)), size, 300, "zudc", cs)
				opt := "off"
				if on {
					opt = "on"
				}
				// The process "dies" after op k for each k in cuts:
				// the file as it is then is all a new server sees.
				cuts := []int{40, 150, len(ops) - 1}
				crash := func(k int) string { return filepath.Join(dir, fmt.Sprintf("crash%d.qcow2", k)) }
				spec := bdrv.Spec{Filename: p, Options: bdrv.Options{qcow2.OptCrashSafeMetadata: opt}}
				bdrvtest.WithNode(t, spec, func(co *coroutine.Co, n *bdrv.Node) error {
					for i, o := range ops {
						if err := o.apply(co, n); err != nil {
							return err
						}
						if slices.Contains(cuts, i) {
							if err := snapshotFile(crash(i), p); err != nil {
								return err
							}
						}
					}
					return nil
				})
				lost := false
				for _, k := range cuts {
					want := slices.Clone(model)
					applyModel(want, ops[:k+1], cs, false)
					code, out := checkCode(t, crash(k))
					got, convErr := rawOrErr(t, crash(k))
					if !on {
						lost = lost || code != 0 || convErr != nil || !bytes.Equal(got, want)
						continue
					}
					if code != 0 && code != 3 {
						t.Fatalf("after op %d: qemu-img check: exit %d\n%s", k, code, out)
					}
					if convErr != nil {
						t.Fatalf("after op %d: %v", k, convErr)
					}
					if i := firstDiff(got, want); i >= 0 {
						t.Fatalf("after op %d: byte %#x is %#x, want %#x", k, i, got[i], want[i])
					}
				}
				if !on {
					if !lost {
						t.Fatal("without x-crash-safe-metadata every write survived: the test cannot tell the modes apart")
					}
					return
				}
				if cfg.name == "bitmap" {
					if info := sh(t, "qemu-img", "info", "-U", "--output=json", crash(len(ops)-1)); !strings.Contains(info, `"in-use"`) {
						t.Fatalf("bitmap not in use in the copy of the open image:\n%s", info)
					}
				}
				// A restarted server opens the last copy read-write
				// (repairing a lazy-refcount image) and reads it all.
				last := len(ops) - 1
				applyModel(model, ops, cs, false)
				bdrvtest.WithNode(t, bdrv.Spec{Filename: crash(last)}, func(co *coroutine.Co, n *bdrv.Node) error {
					got := make([]byte, size)
					if err := n.Preadv(co, 0, bdrv.IOVec{got}, 0); err != nil {
						return err
					}
					if i := firstDiff(got, model); i >= 0 {
						return fmt.Errorf("reopened after op %d: byte %#x is %#x, want %#x", last, i, got[i], model[i])
					}
					return nil
				})
				qcheck(t, crash(last), true)
			})
		}
	}
}

// snapshotFile copies src to dst, as the file is now.
func snapshotFile(dst, src string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

// rawOrErr is rawOf that returns qemu-img's failure instead of failing.
func rawOrErr(t *testing.T, path string) ([]byte, error) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "copy.raw")
	if out, err := exec.Command("qemu-img", "convert", "-U", "-O", "raw", path, dst).CombinedOutput(); err != nil {
		return nil, errors.New(strings.TrimSpace(string(out)))
	}
	return os.ReadFile(dst)
}
