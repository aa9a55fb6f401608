package img

import (
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
)

// TestAmendVerb compares amend's results and messages with qemu-img amend.
func TestAmendVerb(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	for _, tc := range []struct{ create, opts string }{
		{"compat=0.10", "compat=1.1"},
		{"compat=1.1", "lazy_refcounts=on"},
		{"compat=1.1", "compat=v3,size=8M"},
		{"compat=1.1", "cluster_size=4096"},
		{"compat=1.1", "extended_l2=on"},
		{"compat=1.1", "bogus=1"},
		{"compat=1.1", "compat=2"},
		{"compat=1.1", ""},
		{"compat=0.10", "lazy_refcounts=on"},
		{"compat=0.10", "refcount_bits=8"},
		{"refcount_bits=8", "compat=0.10"},
		{"compat=1.1", "compat=0.10"},
		{"lazy_refcounts=on", "compat=0.10"},
		{"extended_l2=on", "compat=0.10"},
	} {
		ours, theirs := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
		for _, p := range []string{ours, theirs} {
			if _, e, code := qemuImg(t, "create", "-q", "-f", "qcow2", "-o", tc.create, p, "4M"); code != 0 {
				t.Fatal(e)
			}
		}
		err := runCo(t, func(co *coroutine.Co) error {
			return Amend(co, AmendOptions{Filename: ours, Options: tc.opts})
		})
		args := []string{"amend"}
		if tc.opts != "" {
			args = append(args, "-o", tc.opts)
		}
		_, e, code := qemuImg(t, append(args, theirs)...)
		if (err != nil) != (code != 0) || (err != nil && !strings.HasPrefix(e, "qemu-img: "+err.Error()+"\n")) {
			t.Errorf("amend -o %q on %s: %v; qemu-img: %d %s", tc.opts, tc.create, err, code, e)
			continue
		}
		if err == nil {
			a, _, _ := qemuImg(t, "info", ours)
			b, _, _ := qemuImg(t, "info", theirs)
			if strings.ReplaceAll(a, ours, theirs) != b {
				t.Errorf("amend -o %q: info\n%s\nqemu-img:\n%s", tc.opts, a, b)
			}
		}
	}
}
