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

func TestCreateMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string // qemu-img create arguments after the file name
		opts CreateOptions
	}{
		{[]string{"1G"}, CreateOptions{Size: 1 << 30}},
		{[]string{"0"}, CreateOptions{Size: 0}},
		{[]string{"1536"}, CreateOptions{Size: 1536}},
		{[]string{"-o", "size=64M"}, CreateOptions{Size: -1, Options: bdrv.Options{"size": "64M"}}},
		{[]string{"-o", "preallocation=full", "1M"}, CreateOptions{Size: 1 << 20, Options: bdrv.Options{"preallocation": "full"}}},
		{[]string{"-o", "preallocation=falloc", "4M"}, CreateOptions{Size: 4 << 20, Options: bdrv.Options{"preallocation": "falloc"}}},
		{[]string{"-o", "preallocation=off", "4M"}, CreateOptions{Size: 4 << 20, Options: bdrv.Options{"preallocation": "off"}}},
		{[]string{"-o", "nocow=on", "1M"}, CreateOptions{Size: 1 << 20, Options: bdrv.Options{"nocow": "on"}}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			ours, theirs := filepath.Join(dir, "ours.raw"), filepath.Join(dir, "theirs.raw")
			opts := tc.opts
			opts.Filename, opts.Format = ours, "raw"
			var out bytes.Buffer
			if err := runCo(t, func(co *coroutine.Co) error { return Create(co, opts, &out) }); err != nil {
				t.Fatal(err)
			}
			qargs := append([]string{"create", "-f", "raw"}, tc.args[:len(tc.args)-1]...)
			qargs = append(qargs, theirs, tc.args[len(tc.args)-1])
			if strings.HasPrefix(tc.args[len(tc.args)-1], "size=") {
				qargs = append([]string{"create", "-f", "raw"}, append(tc.args, theirs)...)
			}
			want, errs, code := qemuImg(t, qargs...)
			if code != 0 {
				t.Fatalf("qemu-img %v: %s", qargs, errs)
			}
			if got, want := out.String(), strings.ReplaceAll(want, theirs, ours); got != want {
				t.Errorf("output %q\nqemu-img %q", got, want)
			}
			a, _ := os.Stat(ours)
			b, _ := os.Stat(theirs)
			if a.Size() != b.Size() {
				t.Errorf("file size %d, qemu-img %d", a.Size(), b.Size())
			}
			// qemu-img also allocates the first 4 KiB block of a sparse
			// file; the rest must match (preallocation).
			if x, y := allocatedBytes(t, ours), allocatedBytes(t, theirs); x != y && y-x != 4096 {
				t.Errorf("allocated %d, qemu-img %d", x, y)
			}
		})
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "x.raw")
	for _, tc := range []struct {
		opts CreateOptions
		want string
	}{
		{CreateOptions{Format: "bogus", Size: 1}, "Unknown file format 'bogus'"},
		{CreateOptions{Size: -1}, "Image creation needs a size parameter"},
		{CreateOptions{Size: 1, Options: bdrv.Options{"size": "2"}}, "The image size must be specified only once"},
		{CreateOptions{Size: 1, Options: bdrv.Options{"bogus": "1"}}, "Invalid parameter 'bogus'"},
		{CreateOptions{Size: 1, BackingFile: "a.raw"}, "Backing file not supported for file format 'raw'"},
		{CreateOptions{Size: 1, BackingFormat: "raw"}, "Backing file format not supported for file format 'raw'"},
	} {
		opts := tc.opts
		opts.Filename = name
		err := runCo(t, func(co *coroutine.Co) error { return Create(co, opts, nil) })
		if want := name + ": " + tc.want; err == nil || err.Error() != want {
			t.Errorf("Create(%+v) = %v, want %s", tc.opts, err, want)
		}
		if _, err := os.Stat(name); err == nil {
			t.Errorf("%+v: image created despite the error", tc.opts)
			os.Remove(name)
		}
	}
}

func TestParseSizeArg(t *testing.T) {
	const suffixes = "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
	const rangeErr = "Invalid image size specified. Must be between 0 and 9223372036854775807."
	for _, tc := range []struct {
		in   string
		want int64
		err  string
	}{
		{"1G", 1 << 30, ""}, {"1k", 1024, ""}, {"1K", 1024, ""}, {"512", 512, ""}, {"1.5k", 1536, ""},
		{"5.k", 5120, ""}, {"1T", 1 << 40, ""}, {"0", 0, ""},
		{"1Q", 0, suffixes}, {"abc", 0, suffixes}, {"", 0, suffixes}, {"-1", 0, suffixes},
		{"1.5", 0, suffixes}, {"1kb", 0, suffixes}, {"1 k", 0, suffixes},
		{"8E", 0, rangeErr}, {"16E", 0, rangeErr}, {"99999999999999999999", 0, rangeErr},
	} {
		got, err := ParseSizeArg("image size", tc.in, 0, MaxImageSize)
		switch {
		case tc.err != "" && (err == nil || err.Error() != tc.err):
			t.Errorf("ParseSizeArg(%q) = %d, %v; want error %q", tc.in, got, err, tc.err)
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("ParseSizeArg(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}
