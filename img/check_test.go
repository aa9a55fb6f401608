package img

import (
	"bytes"
	"errors"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// checkImages makes the images the check tests use in dir: clean qcow2
// images of several kinds (with compressed clusters, with fragmented ones),
// one with a leaked cluster, one with a cluster whose refcount is too low (a
// corruption that -r leaks cannot repair and -r all repairs by rebuilding
// the refcount structure), one with both, a raw image, and an overlay whose
// backing file is missing.
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
qemu-img create -q -f qcow2 frag.qcow2 16M
qemu-io -c "write -P 1 1M 64k" -c "write -P 2 0 64k" -c "write -P 3 3M 128k" -c "write -P 4 2M 64k" frag.qcow2 >/dev/null
qemu-img create -q -f qcow2 both.qcow2 16M
qemu-io -c "write -P 1 0 192k" -c "discard 0 64k" both.qcow2 >/dev/null
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
	pokeRefcount(t, filepath.Join(dir, "both.qcow2"), 5, 1)
	pokeRefcount(t, filepath.Join(dir, "both.qcow2"), 6, 0)
}

func TestCheckMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := t.TempDir()
	checkImages(t, src)
	for _, name := range []string{"clean.qcow2", "v2.qcow2", "frag.qcow2", "leak.qcow2", "corrupt.qcow2", "both.qcow2", "raw.raw", "orphan.qcow2", "top.qcow2", "missing.qcow2"} {
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

// TestCheckFilenames compares the human and JSON output with qemu-img's on
// file names with quotes, control characters, non-ASCII and invalid UTF-8.
func TestCheckFilenames(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	shell(t, dir, `qemu-img create -q -f qcow2 src.qcow2 1M
qemu-io -c "write -P 1 0 64k" src.qcow2 >/dev/null`)
	src, err := os.ReadFile(filepath.Join(dir, "src.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"wé\"ird\t\\x.qcow2", "b\xffc\x01😀\x7f.qcow2"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, src, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, json := range []bool{false, true} {
			var stdout bytes.Buffer
			err := runCo(t, func(co *coroutine.Co) error {
				_, err := Check(co, CheckOptions{Filename: p, JSON: json}, &stdout, nil)
				return err
			})
			args := []string{"check", p}
			if json {
				args = []string{"check", "--output=json", p}
			}
			wout, werr, wcode := qemuIn(t, dir, args...)
			if err != nil || wcode != 0 || stdout.String() != wout {
				t.Errorf("%q json=%v: %v\n%s\nqemu-img: exit %d\n%s%s", name, json, err, stdout.String(), wcode, wout, werr)
			}
		}
	}
}

// TestCheckJSONOrder checks that checkDict prints ImageCheck's members in
// qemu-img's order for every combination of optional members: the order
// QEMU's hash table gives them, as observed from qemu-img 7.2.
func TestCheckJSONOrder(t *testing.T) {
	qemuOrder := []string{"image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
		"corruptions-fixed", "check-errors", "leaks", "leaks-fixed", "allocated-clusters",
		"filename", "format", "fragmented-clusters"}
	for mask := range 1 << 9 {
		r := &bdrv.CheckResult{}
		fields := []*int64{&r.ImageEndOffset, &r.TotalClusters, &r.AllocatedClusters,
			&r.FragmentedClusters, &r.CompressedClusters}
		ints := []*int{&r.Corruptions, &r.Leaks, &r.CorruptionsFixed, &r.LeaksFixed}
		for i, f := range fields {
			if mask&(1<<i) != 0 {
				*f = 7
			}
		}
		for i, f := range ints {
			if mask&(1<<(len(fields)+i)) != 0 {
				*f = 7
			}
		}
		d := checkDict(r, "x", "qcow2")
		var want []string
		for _, k := range qemuOrder {
			if _, ok := d.Get(k); ok {
				want = append(want, k)
			}
		}
		if d.Len() != 3+bits.OnesCount(uint(mask)) {
			t.Fatalf("mask %#x: %d members", mask, d.Len())
		}
		if got := d.Keys(); !slices.Equal(got, want) {
			t.Errorf("mask %#x: order %v, want %v", mask, got, want)
		}
	}
}

// TestCheckHumanErrors pins the human summary's layout when every kind of
// problem is left, including internal errors, which no image makes qemu-img
// report (its dump_human_image_check), after a repair report.
func TestCheckHumanErrors(t *testing.T) {
	r := &bdrv.CheckResult{
		Corruptions: 2, Leaks: 3, CheckErrors: 1, CorruptionsFixed: 4, LeaksFixed: 5,
		ImageEndOffset: 1441792, TotalClusters: 1024, AllocatedClusters: 20,
		FragmentedClusters: 4, CompressedClusters: 4, Repaired: true,
	}
	want := `The following inconsistencies were found and repaired:

    5 leaked clusters
    4 corruptions

Double checking the fixed image now...

2 errors were found on the image.
Data may be corrupted, or further writes to the image may corrupt it.

3 leaked clusters were found on the image.
This means waste of disk space, but no harm to data.

1 internal errors have occurred during the check.
20/1024 = 1.95% allocated, 20.00% fragmented, 20.00% compressed clusters
Image end offset: 1441792
`
	var b strings.Builder
	writeCheckRepaired(&b, r)
	writeCheckHuman(&b, r)
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestCheckQuiet(t *testing.T) {
	qemutest.Require(t, "qemu-img")
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
