package img

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

func TestResizeMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, tc := range []struct {
		create string // qemu-img create arguments for img, without name and size
		opts   ResizeOptions
		args   []string // qemu-img resize arguments before the name
	}{
		{"-f raw", ResizeOptions{Format: "raw", Size: "+1M"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Size: "3M"}, nil},
		{"-f raw", ResizeOptions{Format: "raw", Size: "-512k"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "-512k", Shrink: true}, []string{"-f", "raw", "--shrink"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "1000", Shrink: true}, []string{"-f", "raw", "--shrink"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "+100"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "1.5M", Shrink: true}, []string{"-f", "raw", "--shrink"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "-2M"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "0"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "9E"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "18E"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "1x"}, []string{"-f", "raw"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "4M", Prealloc: bdrv.PreallocFalloc}, []string{"-f", "raw", "--preallocation=falloc"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "4M", Prealloc: bdrv.PreallocFull}, []string{"-f", "raw", "--preallocation=full"}},
		{"-f raw", ResizeOptions{Format: "raw", Size: "1M", Shrink: true, Prealloc: bdrv.PreallocFull}, []string{"-f", "raw", "--shrink", "--preallocation=full"}},
		{"-f raw", ResizeOptions{Format: "qcow2", Size: "4M"}, []string{"-f", "qcow2"}},
		{"-f qcow2", ResizeOptions{Size: "+1M"}, nil},
		{"-f qcow2", ResizeOptions{Size: "+1000"}, nil},
		{"-f qcow2", ResizeOptions{Size: "512k", Shrink: true}, []string{"--shrink"}},
		{"-f qcow2", ResizeOptions{Size: "512k"}, nil},
		{"-f qcow2", ResizeOptions{Size: "8M", Prealloc: bdrv.PreallocMetadata}, []string{"--preallocation=metadata"}},
		{"-f qcow2", ResizeOptions{Size: "8M", Prealloc: bdrv.PreallocFalloc}, []string{"--preallocation=falloc"}},
		{"-f qcow2", ResizeOptions{Size: "8M", Prealloc: bdrv.PreallocFull}, []string{"--preallocation=full"}},
		{"-f qcow2 -o compat=0.10", ResizeOptions{Size: "4G"}, nil},
		{"-f qcow2 -o cluster_size=512", ResizeOptions{Size: "64M"}, nil},
	} {
		args := append(append([]string{"resize"}, tc.args...), "img", tc.opts.Size)
		t.Run(tc.create+" "+strings.Join(args[1:], " "), func(t *testing.T) {
			src := t.TempDir()
			shell(t, src, "qemu-img create -q "+tc.create+" img 2M && qemu-io -f "+strings.Fields(tc.create)[1]+` -c "write -P 7 1M 1M" img >/dev/null`)
			ours, theirs := twin(t, src)
			opts := tc.opts
			opts.Filename = filepath.Join(ours, "img")
			var out bytes.Buffer
			err := runCo(t, func(co *coroutine.Co) error { return Resize(co, opts, &out) })
			var gotErr string
			if err != nil {
				gotErr = err.Error() + "\n"
			}
			args[len(args)-2] = filepath.Join(theirs, "img")
			wout, werr, wcode := qemuIn(t, theirs, args...)
			werr = strings.ReplaceAll(strings.ReplaceAll(werr, "\nOptional", " Optional"), "\nand exabytes", " and exabytes")
			if out.String() != wout || strings.ReplaceAll(gotErr, ours, theirs) != werr || (err != nil) != (wcode != 0) {
				t.Errorf("got %q, error %q\nqemu-img (exit %d): %q, %q", out.String(), gotErr, wcode, wout, werr)
			}
			a, b := filepath.Join(ours, "img"), filepath.Join(theirs, "img")
			sa, _ := os.Stat(a)
			sb, _ := os.Stat(b)
			if strings.Contains(tc.create, "raw") && sa.Size() != sb.Size() {
				t.Errorf("file size %d, qemu-img's %d", sa.Size(), sb.Size())
			}
			if ia, ib := virtualSize(t, a), virtualSize(t, b); ia != ib {
				t.Errorf("virtual size %s, qemu-img's %s", ia, ib)
			}
			sameContent(t, a, b)
			if strings.Contains(tc.create, "qcow2") {
				checkClean(t, a)
				if m, w := qemuMap(t, ours, "img"), qemuMap(t, theirs, "img"); m != w {
					t.Errorf("map:\n%s\nqemu-img's:\n%s", m, w)
				}
			}
		})
	}
}

// virtualSize is the "virtual-size" line of qemu-img info --output=json.
func virtualSize(t *testing.T, name string) string {
	out, _, _ := qemuIn(t, "/", "info", "-U", "--output=json", name)
	for _, l := range lines(out) {
		if strings.Contains(l, `"virtual-size"`) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

func TestParseResizeSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		sign int
		n    int64
		huge bool
		err  string
	}{
		{"1G", 0, 1 << 30, false, ""},
		{"+1.5k", 1, 1536, false, ""},
		{"-512", -1, 512, false, ""},
		{"8E", 0, 0, true, ""},
		{"15.9E", 0, 0, true, ""},
		{"16E", 0, 0, false, "Value '16E' is out of range for parameter 'size'"},
		{"-x", 0, 0, false, sizeMessage},
		{"", 0, 0, false, sizeMessage},
	} {
		sign, n, huge, err := ParseResizeSize(tc.in)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("ParseResizeSize(%q): error %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || sign != tc.sign || n != tc.n || huge != tc.huge {
			t.Errorf("ParseResizeSize(%q) = %d, %d, %v, %v", tc.in, sign, n, huge, err)
		}
	}
}
