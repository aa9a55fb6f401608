package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestAmendVerb compares amend's results, messages and -p progress with
// qemu-img amend's: each case creates two images alike (BASE and DATA in
// the options stand for a raw backing file and an external data file),
// amends one with Amend and the other with qemu-img amend -p, and compares
// the errors, the progress output and qemu-img info of both afterwards (a
// failing combination must leave the changes qemu-img leaves). Refcount
// width changes use 4 KiB clusters: QEMU visits every entry of the refcount
// table, 2^28 of them with 64 KiB clusters.
func TestAmendVerb(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if _, e, code := qemuImg(t, "create", "-q", "-f", "raw", base, "4M"); code != 0 {
		t.Fatal(e)
	}
	data := filepath.Join(dir, "data.raw")
	for _, tc := range []struct{ create, opts string }{
		{"compat=0.10", "compat=1.1"},
		{"compat=1.1", "lazy_refcounts=on"},
		{"compat=1.1", "compat=v3,size=8M"},
		{"compat=1.1", "size=0"},
		{"compat=1.1", "size=abc"},
		{"compat=1.1", "cluster_size=4096"},
		{"compat=1.1", "extended_l2=on"},
		{"compat=1.1", "bogus=1"},
		// The creation hint only when the whole string parses with
		// the create options (qemu-img parses it again with them).
		{"compat=1.1", "cluster_size=4k,bogus=1"},
		{"compat=1.1", "cluster_size=bad"},
		{"compat=1.1", "lazy_refcounts=on,cluster_size=4k"},
		{"compat=1.1", "cluster_size=4k,lazy_refcounts=bad"},
		{"compat=1.1", "encrypt.cipher-alg=aes-128"},
		{"compat=1.1", "nocow=on"},
		{"compat=1.1", "=5"},
		{"compat=1.1", "compat=2"},
		{"compat=1.1", "compat=2,lazy_refcounts=x"},
		{"compat=1.1", "lazy_refcounts"},
		{"lazy_refcounts=on", "nolazy_refcounts"},
		{"compat=1.1", ""},
		{"compat=0.10", "lazy_refcounts=on"},
		{"compat=0.10", "refcount_bits=8"},
		{"refcount_bits=8", "compat=0.10"},
		{"compat=1.1", "compat=0.10"},
		{"lazy_refcounts=on", "compat=0.10"},
		{"extended_l2=on", "compat=0.10"},
		// Refcount widths.
		{"cluster_size=4k", "refcount_bits=8"},
		{"cluster_size=4k", "refcount_bits=64,lazy_refcounts=on"},
		{"cluster_size=4k", "refcount_bits=0x1"},
		{"cluster_size=4k,refcount_bits=8", "compat=0.10,refcount_bits=16"},
		{"cluster_size=4k,refcount_bits=8", "compat=0.10,size=8M"},
		{"cluster_size=4k,compat=0.10", "compat=1.1,refcount_bits=2"},
		{"cluster_size=4k", "refcount_bits=8,refcount_bits=16"},
		{"compat=1.1", "refcount_bits=0"},
		{"compat=1.1", "refcount_bits=3"},
		{"compat=1.1", "refcount_bits=128"},
		{"compat=1.1", "refcount_bits=-1"},
		{"compat=1.1", "refcount_bits=x"},
		{"compat=1.1", "refcount_bits="},
		{"compat=1.1", "refcount_bits=99999999999999999999"},
		{"compat=0.10", "refcount_bits=3,lazy_refcounts=on"},
		// Backing file: only its current name and format.
		{"backing_file=BASE,backing_fmt=raw", "backing_file=BASE,backing_fmt=raw"},
		{"backing_file=BASE,backing_fmt=raw", "backing_file=BASE"},
		{"backing_file=BASE,backing_fmt=raw", "backing_fmt=raw"},
		{"backing_file=BASE,backing_fmt=raw", "backing_file="},
		{"backing_file=BASE,backing_fmt=raw", "backing_file=other.raw,backing_fmt=raw"},
		{"backing_file=BASE,backing_fmt=raw,cluster_size=4k", "refcount_bits=8,backing_file=zz"},
		{"compat=1.1", "backing_file=BASE"},
		{"compat=1.1", "backing_fmt=raw"},
		{"compat=1.1", "backing_file"},
		// External data file.
		{"data_file=DATA", "data_file=other.raw"},
		{"data_file=DATA", "data_file="},
		{"data_file=DATA", "data_file_raw=on"},
		{"data_file=DATA", "data_file_raw=off"},
		{"data_file=DATA,data_file_raw=on", "data_file_raw=off"},
		{"data_file=DATA,data_file_raw=on", "data_file_raw=on"},
		{"data_file=DATA,data_file_raw=on", "data_file_raw=maybe"},
		{"data_file=DATA", "compat=0.10"},
		{"data_file=DATA", "compat=0.10,lazy_refcounts=on"},
		{"data_file=DATA", "refcount_bits=3,data_file_raw=on"},
		{"compat=1.1", "data_file=x.raw"},
		{"compat=1.1", "data_file_raw=on"},
		{"compat=1.1", "data_file_raw=off"},
		{"compat=1.1", "data_file_raw"},
	} {
		ours, theirs := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
		create := strings.NewReplacer("BASE", base, "DATA", data).Replace(tc.create)
		for _, p := range []string{ours, theirs} {
			if _, e, code := qemuImg(t, "create", "-q", "-f", "qcow2", "-o", create, p, "4M"); code != 0 {
				t.Fatal(e)
			}
		}
		opts := strings.NewReplacer("BASE", base).Replace(tc.opts)
		var progress bytes.Buffer
		err := runCo(t, func(co *coroutine.Co) error {
			return Amend(co, AmendOptions{Filename: ours, Options: opts, Progress: &progress})
		})
		args := []string{"amend", "-p"}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		out, e, code := qemuImg(t, append(args, theirs)...)
		e = strings.TrimSuffix(e, "Try 'qemu-img --help' for more information\n")
		if (err != nil) != (code != 0) || (err != nil && "qemu-img: "+err.Error()+"\n" != e) {
			t.Errorf("amend -o %q on %s: %v; qemu-img: %d %s", tc.opts, tc.create, err, code, e)
			continue
		}
		if progress.String() != out {
			t.Errorf("amend -p -o %q on %s: progress\n%q\nqemu-img:\n%q", tc.opts, tc.create, progress.String(), out)
		}
		a, _, _ := qemuImg(t, "info", "-U", ours)
		b, _, _ := qemuImg(t, "info", "-U", theirs)
		if strings.ReplaceAll(a, ours, theirs) != b {
			t.Errorf("amend -o %q on %s: info\n%s\nqemu-img:\n%s", tc.opts, tc.create, a, b)
		}
		if code == 0 && strings.Contains(tc.opts, "refcount_bits") {
			if _, e, code := qemuImg(t, "check", ours); code != 0 {
				t.Errorf("amend -o %q on %s: check: %s", tc.opts, tc.create, e)
			}
		}
	}
}
