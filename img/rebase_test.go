package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

func TestRebaseMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := t.TempDir()
	shell(t, src, `
qemu-img create -q -f qcow2 base.qcow2 4M
qemu-io -c "write -P 1 0 4M" -c "write -z 3M 64k" base.qcow2 >/dev/null
qemu-img create -q -f raw new.raw 2M
qemu-io -f raw -c "write -P 1 0 1M" -c "write -P 9 1536k 4k" new.raw >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-io -c "write -P 2 1M 64k" mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 6M
qemu-io -c "write -P 3 0 4k" -c "write -z 2M 64k" top.qcow2 >/dev/null
cp top.qcow2 copy.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 v2.qcow2
qemu-io -c "write -P 4 512k 4k" v2.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 small.qcow2
`)
	for _, tc := range []struct {
		args []string // before the image name
		name string
		opts RebaseOptions
	}{
		{[]string{"-b", "new.raw", "-F", "raw"}, "top.qcow2", RebaseOptions{Backing: "new.raw", BackingFormat: "raw"}},
		{[]string{"-b", "new.raw"}, "top.qcow2", RebaseOptions{Backing: "new.raw"}},
		{[]string{"-u", "-b", "new.raw", "-F", "raw"}, "top.qcow2", RebaseOptions{Backing: "new.raw", BackingFormat: "raw", Unsafe: true}},
		{[]string{"-u", "-b", "new.raw"}, "top.qcow2", RebaseOptions{Backing: "new.raw", Unsafe: true}},
		{[]string{"-b", ""}, "top.qcow2", RebaseOptions{}},
		{[]string{"-u", "-F", "raw"}, "top.qcow2", RebaseOptions{BackingFormat: "raw", Unsafe: true}},
		{[]string{"-b", "base.qcow2", "-F", "qcow2"}, "top.qcow2", RebaseOptions{Backing: "base.qcow2", BackingFormat: "qcow2"}},
		{[]string{"-b", "./base.qcow2", "-F", "qcow2"}, "top.qcow2", RebaseOptions{Backing: "./base.qcow2", BackingFormat: "qcow2"}},
		{[]string{"-b", "copy.qcow2", "-F", "qcow2"}, "top.qcow2", RebaseOptions{Backing: "copy.qcow2", BackingFormat: "qcow2"}},
		{[]string{"-b", "new.raw", "-F", "raw"}, "v2.qcow2", RebaseOptions{Backing: "new.raw", BackingFormat: "raw"}},
		{[]string{"-u", "-b", strings.Repeat("x", 600), "-F", "raw"}, "small.qcow2", RebaseOptions{Backing: strings.Repeat("x", 600), BackingFormat: "raw", Unsafe: true}},
		{[]string{"-F", "foo", "-b", "new.raw"}, "top.qcow2", RebaseOptions{Backing: "new.raw", BackingFormat: "foo"}},
		{[]string{"-b", "nope"}, "top.qcow2", RebaseOptions{Backing: "nope"}},
		{[]string{"-b", "base.qcow2"}, "new.raw", RebaseOptions{Backing: "base.qcow2"}},
		{[]string{"-f", "raw", "-u", "-b", "base.qcow2", "-F", "qcow2"}, "new.raw", RebaseOptions{Format: "raw", Backing: "base.qcow2", BackingFormat: "qcow2", Unsafe: true}},
	} {
		args := append(append([]string{"rebase"}, tc.args...), tc.name)
		t.Run(strings.Join(args[1:], " "), func(t *testing.T) {
			ours, theirs := twin(t, src)
			opts := tc.opts
			opts.Filename = filepath.Join(ours, tc.name)
			err := runCo(t, func(co *coroutine.Co) error { return Rebase(co, opts) })
			var gotErr string
			if err != nil {
				gotErr = strings.ReplaceAll(err.Error(), ours, theirs) + "\n"
			}
			args[len(args)-1] = filepath.Join(theirs, tc.name)
			wout, werr, wcode := qemuIn(t, theirs, args...)
			werr = strings.ReplaceAll(werr, "Could not open 'nope': Could not open", "Could not open")
			if wout != "" || gotErr != werr || (err != nil) != (wcode != 0) {
				t.Errorf("error %q\nqemu-img (exit %d): %q, %q", gotErr, wcode, wout, werr)
			}
			a, b := filepath.Join(ours, tc.name), filepath.Join(theirs, tc.name)
			if ia, ib := backingInfo(t, ours, tc.name), backingInfo(t, theirs, tc.name); ia != ib {
				t.Errorf("backing file %s, qemu-img's %s", ia, ib)
			}
			if !strings.HasSuffix(tc.name, ".qcow2") {
				return
			}
			if ha, hb := readHeader(t, a, 512), readHeader(t, b, 512); !bytes.Equal(ha, hb) {
				t.Errorf("header differs from qemu-img's:\n%x\n%x", ha, hb)
			}
			checkClean(t, a)
			if !opts.Unsafe {
				sameContent(t, a, b)
				if m, w := qemuMap(t, ours, tc.name), qemuMap(t, theirs, tc.name); m != w {
					t.Errorf("map:\n%s\nqemu-img's:\n%s", m, w)
				}
			}
		})
	}
}

// backingInfo is what qemu-img info says about an image's backing file.
func backingInfo(t *testing.T, dir, name string) string {
	out, _, _ := qemuIn(t, dir, "info", "-U", "--output=json", name)
	var b strings.Builder
	for _, l := range lines(out) {
		if strings.Contains(l, `"backing-filename`) {
			b.WriteString(strings.TrimSpace(l))
		}
	}
	return b.String()
}

func TestRebaseKeepsUnknownExtensions(t *testing.T) {
	// iotest 031: header extensions qcow2 does not know survive a header
	// rewrite, in place and byte for byte as qemu-img writes them.
	qemutest.Require(t, "qemu-img")
	src := t.TempDir()
	shell(t, src, `
qemu-img create -q -f qcow2 img.qcow2 1M
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
`)
	addUnknownExtension(t, filepath.Join(src, "img.qcow2"), 0x12345678, []byte("unknown extension data"))
	addUnknownExtension(t, filepath.Join(src, "v2.qcow2"), 0x0abcdef0, []byte{1, 2, 3})
	for _, name := range []string{"img.qcow2", "v2.qcow2"} {
		ours, theirs := twin(t, src)
		for _, backing := range []string{"some/backing.img", ""} {
			opts := RebaseOptions{Filename: filepath.Join(ours, name), Backing: backing, Unsafe: true}
			args := []string{"rebase", "-u", "-b", backing}
			if backing != "" {
				opts.BackingFormat = "raw"
				args = append(args, "-F", "raw")
			}
			if err := runCo(t, func(co *coroutine.Co) error { return Rebase(co, opts) }); err != nil {
				t.Fatal(err)
			}
			if _, werr, code := qemuIn(t, theirs, append(args, name)...); code != 0 {
				t.Fatal(werr)
			}
			a, b := readHeader(t, filepath.Join(ours, name), 65536), readHeader(t, filepath.Join(theirs, name), 65536)
			if !bytes.Equal(a, b) {
				t.Errorf("%s -b %q: header cluster differs from qemu-img's:\n%x\n%x", name, backing, a[:1024], b[:1024])
			}
		}
	}
}
