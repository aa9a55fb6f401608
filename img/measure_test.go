package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

func TestMeasureMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	shell(t, dir, `
qemu-img create -q -f qcow2 q.qcow2 64M
qemu-io -c "write -P 1 0 1M" -c "write -P 1 10M 4k" -c "write -z 20M 1M" -c "write -c -P 2 30M 128k" q.qcow2 >/dev/null
qemu-img create -q -f raw r.raw 10M
qemu-io -f raw -c "write -P 1 0 1M" -c "write -P 1 5M 100k" r.raw >/dev/null
head -c 1000 /dev/urandom > odd.raw
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 10M
qemu-img create -q -f qcow2 -b q.qcow2 -F qcow2 t.qcow2 100M
qemu-io -c "write -P 3 50M 64k" t.qcow2 >/dev/null
qemu-img create -q -f qcow2 bm.qcow2 1G
qemu-img bitmap --add bm.qcow2 b0
qemu-img bitmap --add -g 4k bm.qcow2 bitmap-with-a-long-name
`)
	type tcase struct {
		args []string
		opts MeasureOptions
	}
	var cases []tcase
	add := func(outFmt, o string, size string, file string) {
		opts := MeasureOptions{OutputFormat: outFmt, Size: -1}
		args := []string{"measure", "-O", outFmt}
		if o != "" {
			args = append(args, "-o", o)
			opts.Options, _ = bdrv.ParseOptionString(o)
		}
		if file != "" {
			args = append(args, filepath.Join(dir, file))
			opts.Filename = filepath.Join(dir, file)
		} else {
			args = append(args, "--size", size)
			opts.Size, _ = bdrv.ParseSize(size)
		}
		cases = append(cases, tcase{args, opts})
	}
	files := []string{"q.qcow2", "r.raw", "odd.raw", "t.qcow2", "bm.qcow2", "v2.qcow2"}
	for _, o := range []string{"", "cluster_size=512", "cluster_size=2M", "refcount_bits=64", "refcount_bits=1,cluster_size=1k",
		"extended_l2=on", "extended_l2=on,cluster_size=2M", "preallocation=metadata", "preallocation=falloc", "preallocation=full",
		"compat=0.10", "backing_file=q.qcow2", "lazy_refcounts=on,compression_type=zstd"} {
		for _, s := range []string{"0", "1", "1000", "64M", "1G", "3T"} {
			add("qcow2", o, s, "")
		}
		for _, f := range files {
			add("qcow2", o, "", f)
		}
	}
	for _, s := range []string{"0", "1000", "1G"} {
		add("raw", "", s, "")
	}
	for _, f := range files {
		add("raw", "", "", f)
	}
	// Errors, worded as qemu-img's.
	for _, o := range []string{"cluster_size=3k", "cluster_size=3x", "refcount_bits=3", "refcount_bits=x", "foo=bar", "compat=2",
		"preallocation=bogus", "extended_l2=on,cluster_size=2k", "compat=0.10,refcount_bits=8", "extended_l2=maybe"} {
		add("qcow2", o, "1G", "")
	}
	add("qcow2", "", "64P", "")
	add("qcow2", "cluster_size=512", "64T", "")
	add("foo", "", "1G", "")
	add("qcow2", "", "", "missing")

	for _, tc := range cases {
		t.Run(strings.ReplaceAll(strings.Join(tc.args[1:], " "), dir+"/", ""), func(t *testing.T) {
			var info *bdrv.MeasureInfo
			err := runCo(t, func(co *coroutine.Co) error {
				var err error
				info, err = Measure(co, tc.opts)
				return err
			})
			var human, js bytes.Buffer
			var gotErr string
			if err != nil {
				gotErr = err.Error() + "\n"
			} else {
				WriteMeasure(&human, info, false)
				WriteMeasure(&js, info, true)
			}
			wout, werr, wcode := qemuIn(t, dir, tc.args...)
			// qemu-img's messages span lines; ublkimg's are one line.
			werr = strings.ReplaceAll(oneLine(werr), "Could not open '"+tc.opts.Filename+"': Could not open", "Could not open")
			if human.String() != wout || oneLine(gotErr) != werr || (err != nil) != (wcode != 0) {
				t.Errorf("got %q, error %q\nqemu-img (exit %d): %q, %q", human.String(), gotErr, wcode, wout, werr)
			}
			if err == nil {
				wjs, _, _ := qemuIn(t, dir, append(tc.args, "--output=json")...)
				if js.String() != wjs {
					t.Errorf("json:\n%s\nqemu-img:\n%s", js.String(), wjs)
				}
			}
		})
	}
}

// oneLine joins the words of a message into one line.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
