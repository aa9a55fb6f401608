package img

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
)

// checkImages makes the images the check tests use in dir: clean qcow2
// images of several kinds, one with a leaked cluster, one with a cluster
// whose refcount is too low (a corruption that -r leaks cannot repair and
// -r all repairs by rebuilding the refcount structure), a raw image, and an
// overlay whose backing file is missing.
func checkImages(t *testing.T, dir string) {
	shell(t, dir, `
qemu-img create -q -f qcow2 clean.qcow2 16M
qemu-io -c "write -P 1 0 192k" -c "write -c -P 2 1M 128k" -c "write -z 2M 64k" -c "write -P 4 5M 64k" clean.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 8M
qemu-io -c "write -P 1 0 100k" v2.qcow2 >/dev/null
qemu-img snapshot -c snap v2.qcow2
qemu-io -c "write -P 2 0 8k" v2.qcow2 >/dev/null
qemu-img create -q -f qcow2 leak.qcow2 16M
qemu-io -c "write -P 1 0 128k" -c "discard 0 64k" leak.qcow2 >/dev/null
qemu-img create -q -f qcow2 corrupt.qcow2 16M
qemu-io -c "write -P 1 0 128k" corrupt.qcow2 >/dev/null
qemu-img create -q -f raw raw.raw 1M
qemu-img create -q -f raw gone.raw 1M
qemu-img create -q -f qcow2 -b gone.raw -F raw orphan.qcow2
rm gone.raw
qemu-img create -q -f raw base.raw 4M
qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2
qemu-io -c "write -P 3 64k 64k" top.qcow2 >/dev/null
`)
	pokeRefcount(t, filepath.Join(dir, "leak.qcow2"), 5, 1)
	pokeRefcount(t, filepath.Join(dir, "corrupt.qcow2"), 5, 0)
}

func TestCheckMatchesQemuImg(t *testing.T) {
	requireQemuImg(t)
	src := t.TempDir()
	checkImages(t, src)
	for _, name := range []string{"clean.qcow2", "v2.qcow2", "leak.qcow2", "corrupt.qcow2", "raw.raw", "orphan.qcow2", "top.qcow2", "missing.qcow2"} {
		for _, repair := range []Repair{RepairNone, RepairLeaks, RepairAll} {
			for _, json := range []bool{false, true} {
				args := []string{"check"}
				switch repair {
				case RepairLeaks:
					args = append(args, "-r", "leaks")
				case RepairAll:
					args = append(args, "-r", "all")
				}
				if json {
					args = append(args, "--output=json")
				}
				args = append(args, name)
				t.Run(strings.Join(args[1:], " "), func(t *testing.T) {
					ours, theirs := twin(t, src)
					var stdout, stderr bytes.Buffer
					var code int
					err := runCo(t, func(co *coroutine.Co) error {
						var err error
						code, err = Check(co, CheckOptions{Filename: filepath.Join(ours, name), Repair: repair, JSON: json}, &stdout, &stderr)
						return err
					})
					if err != nil {
						stderr.WriteString(err.Error() + "\n")
					}
					// qemu-img runs on the same absolute name.
					theirName := filepath.Join(theirs, name)
					qargs := append(append([]string(nil), args[:len(args)-1]...), theirName)
					wout, werr, wcode := qemuIn(t, theirs, qargs...)
					got := strings.ReplaceAll(stdout.String(), ours, theirs)
					gotErr := strings.ReplaceAll(stderr.String(), ours, theirs)
					// ublkimg names the image once in open errors.
					werr = strings.ReplaceAll(werr, "Could not open '"+theirName+"': Could not open '"+theirName+"'", "Could not open '"+theirName+"'")
					if got != wout || gotErr != werr || code != wcode {
						t.Errorf("exit %d, stdout:\n%sstderr:\n%s\nqemu-img: exit %d, stdout:\n%sstderr:\n%s", code, got, gotErr, wcode, wout, werr)
					}
					if repair != RepairNone && wcode == 0 && strings.HasSuffix(name, ".qcow2") {
						checkClean(t, filepath.Join(ours, name))
						sameContent(t, filepath.Join(ours, name), theirName)
					}
					var ce *CheckError
					if err != nil && (!errors.As(err, &ce) || ce.Code != code) {
						t.Errorf("error %v does not carry exit status %d", err, code)
					}
				})
			}
		}
	}
}

func TestCheckQuiet(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	checkImages(t, dir)
	var stdout, stderr bytes.Buffer
	var code int
	err := runCo(t, func(co *coroutine.Co) error {
		var err error
		code, err = Check(co, CheckOptions{Filename: filepath.Join(dir, "leak.qcow2"), Quiet: true}, &stdout, &stderr)
		return err
	})
	// -q silences stdout, not the checker's lines (as qemu-img).
	if err != nil || code != CheckLeaks || stdout.Len() != 0 || stderr.String() != "Leaked cluster 5 refcount=1 reference=0\n" {
		t.Errorf("check -q: %v, exit %d, stdout %q, stderr %q", err, code, stdout.String(), stderr.String())
	}
}

func TestParseRepair(t *testing.T) {
	for in, want := range map[string]Repair{"leaks": RepairLeaks, "all": RepairAll} {
		if r, err := ParseRepair(in); err != nil || r != want {
			t.Errorf("ParseRepair(%q) = %v, %v", in, r, err)
		}
	}
	if _, err := ParseRepair("some"); err == nil || err.Error() != "Unknown option value for -r (expecting 'leaks' or 'all'): some" {
		t.Errorf("ParseRepair(some): %v", err)
	}
}
