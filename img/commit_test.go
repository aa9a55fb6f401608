package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// commitChain makes base <- mid <- top in dir: base of the given format,
// mid and top qcow2, with data, zero and compressed clusters in each upper
// layer, top larger than base (iotest 274's short backing file).
func commitChain(t *testing.T, dir, baseFmt string) {
	shell(t, dir, `
qemu-img create -q -f `+baseFmt+` base 4M
qemu-io -f `+baseFmt+` -c "write -P 1 0 3M" base >/dev/null
qemu-img create -q -f qcow2 -b base -F `+baseFmt+` mid.qcow2
qemu-io -c "write -P 2 1M 64k" -c "write -z 2M 192k" mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 6M
qemu-io -c "write -P 3 0 4k" -c "write -z 2M 64k" -c "write -c -P 4 3M 64k" -c "write -P 5 5M 8k" -c "write -P 6 100k 1k" top.qcow2 >/dev/null
`)
}

func TestCommitMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, baseFmt := range []string{"qcow2", "raw"} {
		src := t.TempDir()
		commitChain(t, src, baseFmt)
		for _, tc := range []struct {
			args []string
			opts CommitOptions
			// into is the image committed into; above, the images
			// whose content and map must stay as qemu-img leaves them.
			into  string
			above []string
		}{
			{[]string{"top.qcow2"}, CommitOptions{Filename: "top.qcow2"}, "mid.qcow2", nil},
			{[]string{"-d", "top.qcow2"}, CommitOptions{Filename: "top.qcow2", Drop: true}, "mid.qcow2", []string{"top.qcow2"}},
			{[]string{"-b", "base", "top.qcow2"}, CommitOptions{Filename: "top.qcow2", Base: "base", Drop: true}, "base", []string{"top.qcow2", "mid.qcow2"}},
			{[]string{"-b", "./base", "top.qcow2"}, CommitOptions{Filename: "top.qcow2", Base: "./base", Drop: true}, "base", []string{"top.qcow2", "mid.qcow2"}},
			{[]string{"-b", "mid.qcow2", "top.qcow2"}, CommitOptions{Filename: "top.qcow2", Base: "mid.qcow2", Drop: true}, "mid.qcow2", []string{"top.qcow2"}},
			{[]string{"mid.qcow2"}, CommitOptions{Filename: "mid.qcow2"}, "base", nil},
			{[]string{"base"}, CommitOptions{Filename: "base"}, "", nil},
			{[]string{"-b", "nope", "top.qcow2"}, CommitOptions{Filename: "top.qcow2", Base: "nope", Drop: true}, "", nil},
			{[]string{"-b", "top.qcow2", "top.qcow2"}, CommitOptions{Filename: "top.qcow2", Base: "top.qcow2", Drop: true}, "", nil},
			{[]string{"missing.qcow2"}, CommitOptions{Filename: "missing.qcow2"}, "", nil},
		} {
			t.Run(baseFmt+" "+strings.Join(tc.args, " "), func(t *testing.T) {
				ours, theirs := twin(t, src)
				opts := tc.opts
				opts.Filename = filepath.Join(ours, opts.Filename)
				var out bytes.Buffer
				err := runCo(t, func(co *coroutine.Co) error { return Commit(co, opts, &out) })
				var gotErr string
				if err != nil {
					gotErr = strings.ReplaceAll(err.Error(), ours, theirs) + "\n"
				}
				args := append([]string{"commit"}, tc.args...)
				args[len(args)-1] = filepath.Join(theirs, args[len(args)-1])
				wout, werr, wcode := qemuIn(t, theirs, args...)
				werr = strings.ReplaceAll(werr, "Could not open '"+args[len(args)-1]+"': Could not open", "Could not open")
				if out.String() != wout || gotErr != werr || (err != nil) != (wcode != 0) {
					t.Errorf("got %q, error %q\nqemu-img (exit %d): %q, %q", out.String(), gotErr, wcode, wout, werr)
				}
				if wcode != 0 {
					return
				}
				for _, name := range []string{"top.qcow2", "mid.qcow2", "base"} {
					sameContent(t, filepath.Join(ours, name), filepath.Join(theirs, name))
					if strings.HasSuffix(name, "qcow2") || baseFmt == "qcow2" {
						checkClean(t, filepath.Join(ours, name))
					}
				}
				for _, name := range append([]string{tc.into}, tc.above...) {
					if m, w := qemuMap(t, ours, name), qemuMap(t, theirs, name); m != w {
						t.Errorf("map of %s:\n%s\nqemu-img's:\n%s", name, m, w)
					}
				}
			})
		}
	}
}

func TestCommitProgress(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	commitChain(t, dir, "qcow2")
	var out, progress bytes.Buffer
	opts := CommitOptions{Filename: filepath.Join(dir, "top.qcow2"), Base: "mid.qcow2", Drop: true, Progress: &progress}
	if err := runCo(t, func(co *coroutine.Co) error { return Commit(co, opts, &out) }); err != nil {
		t.Fatal(err)
	}
	p := progress.String()
	if !strings.HasPrefix(p, "    (0.00/100%)\r") || !strings.HasSuffix(p, "    (100.00/100%)\r\n") || out.String() != "Image committed.\n" {
		t.Errorf("progress %q, output %q", p, out.String())
	}
}
