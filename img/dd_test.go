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

func TestDDMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := t.TempDir()
	shell(t, src, `
head -c 1000000 /dev/urandom > in.raw
qemu-img create -q -f qcow2 q.qcow2 3M
qemu-io -c "write -P 1 0 1M" -c "write -c -P 2 2M 64k" q.qcow2 >/dev/null
`)
	for _, tc := range []struct {
		flags    []string // -f, -O
		operands []string // without of=
	}{
		{nil, []string{"if=in.raw"}},
		{nil, []string{"if=in.raw", "bs=4k", "count=10", "skip=2"}},
		{nil, []string{"if=in.raw", "bs=512", "count=4", "skip=2"}},
		{nil, []string{"if=in.raw", "bs=1000", "count=0"}},
		{nil, []string{"if=in.raw", "count=1", "count=2"}},
		{nil, []string{"if=in.raw", "bs=7", "count=3k"}},
		{nil, []string{"if=in.raw", "skip=100000"}},
		{nil, []string{"if=in.raw", "bs=1M", "count=1k"}},
		{[]string{"-O", "qcow2"}, []string{"if=in.raw", "bs=64k"}},
		{nil, []string{"if=q.qcow2"}},
		{[]string{"-f", "qcow2", "-O", "qcow2"}, []string{"if=q.qcow2", "bs=1M", "skip=1"}},
		{[]string{"-O", "foo"}, []string{"if=in.raw"}},
		{[]string{"-f", "qcow2"}, []string{"if=in.raw"}},
		{nil, []string{"if=nope"}},
		{nil, []string{"if=in.raw", "bs=0"}},
		{nil, []string{"if=in.raw", "bs=3G"}},
		{nil, []string{"if=in.raw", "count=-1"}},
		{nil, []string{"if=in.raw", "skip=x"}},
		{nil, []string{"if=in.raw", "foo=bar"}},
		{nil, []string{"if"}},
	} {
		t.Run(strings.Join(append(tc.flags, tc.operands...), " "), func(t *testing.T) {
			ours, theirs := twin(t, src)
			var opts DDOptions
			var stderr bytes.Buffer
			err := ParseDDOperands(append(tc.operands, "of="+filepath.Join(ours, "out")), &opts)
			if err == nil {
				opts.Input = filepath.Join(ours, opts.Input)
				opts.Warn = &stderr
				for i := 0; i < len(tc.flags); i += 2 {
					switch tc.flags[i] {
					case "-f":
						opts.Format = tc.flags[i+1]
					case "-O":
						opts.OutputFormat = tc.flags[i+1]
					}
				}
				err = runCo(t, func(co *coroutine.Co) error { return DD(co, opts) })
			}
			if err != nil {
				stderr.WriteString(err.Error() + "\n")
			}
			args := append(append([]string{"dd"}, tc.flags...), tc.operands...)
			for i, a := range args {
				if strings.HasPrefix(a, "if=") && len(a) > 3 {
					args[i] = "if=" + filepath.Join(theirs, a[3:])
				}
			}
			_, werr, wcode := qemuIn(t, theirs, append(args, "of="+filepath.Join(theirs, "out"))...)
			werr = strings.ReplaceAll(oneLine(werr), "Could not open '"+filepath.Join(theirs, "nope")+"': Could not open", "Could not open")
			got := oneLine(strings.ReplaceAll(strings.TrimPrefix(stderr.String(), "ublkimg: "), ours, theirs))
			if got != werr || (err != nil) != (wcode != 0) {
				t.Errorf("stderr %q\nqemu-img (exit %d): %q", got, wcode, werr)
			}
			a, b := filepath.Join(ours, "out"), filepath.Join(theirs, "out")
			sa, errA := os.Stat(a)
			sb, errB := os.Stat(b)
			if (errA == nil) != (errB == nil) {
				t.Fatalf("output: %v; qemu-img's: %v", errA, errB)
			}
			if errB != nil {
				return
			}
			sameContent(t, a, b)
			if opts.OutputFormat != "qcow2" && sa.Size() != sb.Size() {
				t.Errorf("output size %d, qemu-img's %d", sa.Size(), sb.Size())
			}
			if m, w := qemuMap(t, ours, "out"), qemuMap(t, theirs, "out"); m != w {
				t.Errorf("map:\n%s\nqemu-img's:\n%s", m, w)
			}
		})
	}
}
