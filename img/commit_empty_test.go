package img

import (
	"bytes"
	"path/filepath"
	"regexp"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestCommitEmptiesTop commits (without -d) overlays that take each of
// qcow2's two ways of emptying an image (QEMU's make_completely_empty for
// a plain version 3 image, a discard of every cluster otherwise) and
// checks that the overlay then looks to qemu-img map, check and info as
// it does after qemu-img commit of an identical copy.
func TestCommitEmptiesTop(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	writes := `qemu-io -c "write -P 3 0 4k" -c "write -z 2M 64k" -c "write -c -P 4 3M 64k" -c "write -P 5 5M 8k" top.qcow2 >/dev/null`
	for _, tc := range []struct {
		name, setup string
	}{
		// The fast path: rewritten as a new image (one refcount
		// block, L1 table in cluster 3, file cut after it).
		{"v3", `qemu-img create -q -f qcow2 -b base -F qcow2 top.qcow2 6M
` + writes},
		// A large L1 table: still the fast path, over several clusters.
		{"v3 large L1", `qemu-img create -q -f qcow2 -o cluster_size=4k -b base -F qcow2 top.qcow2 2G
` + writes + `
qemu-io -c "write -P 7 1G 4k" top.qcow2 >/dev/null`},
		// The slow paths: every cluster discarded.
		{"v2", `qemu-img create -q -f qcow2 -o compat=0.10 -b base -F qcow2 top.qcow2 6M
` + writes},
		// L1 entries without a table: QEMU gives each one.
		{"v2 sparse L1", `qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k -b base -F qcow2 top.qcow2 64M
qemu-io -c "write -P 3 0 4k" -c "write -P 5 50M 8k" top.qcow2 >/dev/null`},
		{"snapshot", `qemu-img create -q -f qcow2 -b base -F qcow2 top.qcow2 6M
qemu-io -c "write -P 3 0 4k" -c "write -c -P 4 3M 64k" top.qcow2 >/dev/null
qemu-img snapshot -c s1 top.qcow2
qemu-io -c "write -P 5 5M 8k" -c "write -P 6 0 64k" top.qcow2 >/dev/null`},
		{"data file", `qemu-img create -q -f qcow2 -o data_file=top.data -b base -F qcow2 top.qcow2 6M
qemu-io -c "write -P 3 0 4k" -c "write -z 2M 64k" -c "write -P 5 5M 8k" top.qcow2 >/dev/null`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := t.TempDir()
			shell(t, src, `qemu-img create -q -f qcow2 base 4M
qemu-io -c "write -P 1 0 3M" base >/dev/null
`+tc.setup)
			ours, theirs := twin(t, src)
			var out bytes.Buffer
			opts := CommitOptions{Filename: filepath.Join(ours, "top.qcow2")}
			if err := runCo(t, func(co *coroutine.Co) error { return Commit(co, opts, &out) }); err != nil {
				t.Fatal(err)
			}
			if _, errs, code := qemuIn(t, theirs, "commit", "top.qcow2"); code != 0 {
				t.Fatalf("qemu-img commit: %s", errs)
			}
			// Contents, read in each directory (a relative data file
			// name is opened relative to the current one).
			for _, dir := range []string{ours, theirs} {
				shell(t, dir, "qemu-img convert -O raw top.qcow2 top.raw && qemu-img convert -O raw base base.raw")
			}
			for _, name := range []string{"top.raw", "base.raw"} {
				sameContent(t, filepath.Join(ours, name), filepath.Join(theirs, name))
			}
			if m, w := qemuMap(t, ours, "top.qcow2"), qemuMap(t, theirs, "top.qcow2"); m != w {
				t.Errorf("map of top.qcow2:\n%s\nqemu-img's:\n%s", m, w)
			}
			// check reports the clusters in use and the image end;
			// info everything but the file's allocated size.
			actual := regexp.MustCompile(`(?m)^ *"actual-size": \d+,\n`)
			for _, args := range [][]string{
				{"check", "--output=json", "top.qcow2"},
				{"info", "--output=json", "top.qcow2"},
			} {
				got, gerr, gcode := qemuIn(t, ours, args...)
				want, werr, wcode := qemuIn(t, theirs, args...)
				got, want = actual.ReplaceAllString(got, ""), actual.ReplaceAllString(want, "")
				if got != want || gerr != werr || gcode != wcode {
					t.Errorf("qemu-img %v after our commit (exit %d):\n%s%s\nafter qemu-img's (exit %d):\n%s%s",
						args, gcode, got, gerr, wcode, want, werr)
				}
			}
		})
	}
}
