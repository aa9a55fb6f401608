package img

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestShortBackingFile reads overlays of raw backing files whose length is
// not a whole number of sectors. QEMU's lengths are whole sectors: the
// backing file answers block status up to the end of its last sector (a
// zero, present extent at its own offset), the overlay's zeros start
// there, and the bytes from the exact end read as zeros. map, compare and
// convert (raw bytes, and the allocation of a qcow2 target) must agree
// with qemu-img's.
func TestShortBackingFile(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	shell(t, dir, `
head -c 1000 /dev/zero | tr '\0' 'A' > b.raw
head -c 5000 /dev/urandom > r.raw
qemu-img create -q -f qcow2 -b b.raw -F raw o.qcow2 1M
qemu-img create -q -f qcow2 -o cluster_size=512 -b b.raw -F raw w.qcow2 1M
qemu-io -c "write -P 0x42 1024 512" -c "write -z 4096 512" w.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b o.qcow2 -F qcow2 t.qcow2 2M
qemu-io -c "write -P 0x43 1M 4k" t.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4k -b r.raw -F raw r.qcow2 64k
`)
	run := func(t *testing.T, fn func(co *coroutine.Co) error) {
		t.Helper()
		err := runCo(t, func(co *coroutine.Co) error {
			wd, _ := os.Getwd()
			defer os.Chdir(wd)
			os.Chdir(dir)
			return fn(co)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"o.qcow2", "w.qcow2", "t.qcow2", "r.qcow2"} {
		t.Run(name, func(t *testing.T) {
			for _, js := range []bool{false, true} {
				var out bytes.Buffer
				run(t, func(co *coroutine.Co) error {
					return Map(co, MapOptions{Filename: name, MaxLength: -1, JSON: js}, &out)
				})
				args := []string{"map", name}
				if js {
					args = []string{"map", "--output=json", name}
				}
				if want, _, _ := qemuIn(t, dir, args...); out.String() != want {
					t.Errorf("%v:\n%s\nqemu-img:\n%s", args, out.String(), want)
				}
			}

			for _, format := range []string{"raw", "qcow2"} {
				ours, theirs := "ours."+name+"."+format, "theirs."+name+"."+format
				run(t, func(co *coroutine.Co) error {
					opts := defaultConvertOptions([]string{name}, ours)
					opts.TargetFormat = format
					return Convert(co, opts)
				})
				if _, errs, code := qemuIn(t, dir, "convert", "-O", format, name, theirs); code != 0 {
					t.Fatalf("qemu-img convert: %s", errs)
				}
				if format == "raw" {
					a, _ := os.ReadFile(filepath.Join(dir, ours))
					b, _ := os.ReadFile(filepath.Join(dir, theirs))
					if !bytes.Equal(a, b) {
						t.Errorf("convert -O raw: bytes differ from qemu-img's")
					}
				} else if m, w := qemuMap(t, dir, ours), qemuMap(t, dir, theirs); m != w {
					t.Errorf("map of convert -O qcow2:\n%s\nqemu-img's:\n%s", m, w)
				}
			}

			raw := "theirs." + name + ".raw"
			for _, other := range []string{"b.raw", "r.raw", raw} {
				for _, strict := range []bool{false, true} {
					var out bytes.Buffer
					var code int
					run(t, func(co *coroutine.Co) error {
						var err error
						code, err = Compare(co, CompareOptions{Filename1: name, Filename2: other, Strict: strict}, &out)
						return err
					})
					args := []string{"compare", name, other}
					if strict {
						args = []string{"compare", "-s", name, other}
					}
					want, _, wcode := qemuIn(t, dir, args...)
					if code != wcode || out.String() != want {
						t.Errorf("%s: exit %d, %q; qemu-img: exit %d, %q", strings.Join(args, " "), code, out.String(), wcode, want)
					}
				}
			}
		})
	}
}
