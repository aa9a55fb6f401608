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

func TestMapMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	shell(t, dir, `
truncate -s 4M sparse.raw
qemu-io -f raw -c "write -P 1 1M 64k" -c "write -P 2 3M 4k" sparse.raw >/dev/null
head -c 1000 /dev/urandom > odd.raw
: > empty.raw
qemu-img create -q -f raw short.raw 1M
qemu-io -f raw -c "write -P 1 0 512k" short.raw >/dev/null
qemu-img create -q -f qcow2 -b short.raw -F raw mid.qcow2 4M
qemu-io -c "write -P 2 512k 64k" -c "write -z 2M 64k" mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 8M
qemu-io -c "write -P 3 0 4k" -c "write -c -P 4 1M 64k" -c "write -P 5 6M 128k" -c "write -z 7M 64k" top.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b odd.raw -F raw oddtop.qcow2 1M
qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=16k prealloc.qcow2 4M
qemu-io -c "write -P 1 64k 4k" prealloc.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o preallocation=falloc falloc.qcow2 1M
qemu-img create -q -f qcow2 -o extended_l2=on subcl.qcow2 4M
qemu-io -c "write -P 1 40k 3k" -c "write -z 70k 2k" -c "write -P 2 1M 64k" subcl.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M
qemu-io -c "write -P 1 0 64k" -c "write -z 1M 64k" v2.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o data_file=data.raw external.qcow2 1M
qemu-io -c "write -P 1 0 64k" external.qcow2 >/dev/null
qemu-img create -q -f qcow2 compressed.qcow2 1M
qemu-io -c "write -c -P 1 0 64k" compressed.qcow2 >/dev/null
mkdir sub
qemu-img create -q -f qcow2 -b ../mid.qcow2 -F qcow2 sub/rel.qcow2
`)
	for _, name := range []string{"sparse.raw", "odd.raw", "empty.raw", "mid.qcow2", "top.qcow2", "oddtop.qcow2",
		"prealloc.qcow2", "falloc.qcow2", "subcl.qcow2", "v2.qcow2", "external.qcow2", "compressed.qcow2", "sub/rel.qcow2", "missing"} {
		for _, tc := range []struct {
			extra []string
			opts  MapOptions
		}{
			{nil, MapOptions{MaxLength: -1}},
			{[]string{"--output=json"}, MapOptions{MaxLength: -1, JSON: true}},
			{[]string{"--output=json", "--start-offset=100k", "--max-length=1M"}, MapOptions{MaxLength: 1 << 20, StartOffset: 100 << 10, JSON: true}},
			{[]string{"--start-offset=6M"}, MapOptions{MaxLength: -1, StartOffset: 6 << 20}},
			{[]string{"--output=json", "--start-offset=1G"}, MapOptions{MaxLength: -1, StartOffset: 1 << 30, JSON: true}},
			{[]string{"--output=json", "--max-length=0"}, MapOptions{MaxLength: 0, JSON: true}},
		} {
			args := append(append([]string{"map"}, tc.extra...), name)
			t.Run(strings.Join(args[1:], " "), func(t *testing.T) {
				// Both tools get the relative name: it is what the
				// File column shows.
				opts := tc.opts
				opts.Filename = name
				var out bytes.Buffer
				err := runCo(t, func(co *coroutine.Co) error {
					wd, _ := os.Getwd()
					defer os.Chdir(wd)
					os.Chdir(dir)
					return Map(co, opts, &out)
				})
				var gotErr string
				if err != nil {
					gotErr = err.Error() + "\n"
				}
				wout, werr, wcode := qemuIn(t, dir, args...)
				werr = strings.ReplaceAll(werr, "Could not open '"+name+"': Could not open '"+name+"'", "Could not open '"+name+"'")
				if out.String() != wout || gotErr != werr || (err != nil) != (wcode != 0) {
					t.Errorf("got (error %v):\n%s\nqemu-img (exit %d):\n%s%s", err, out.String(), wcode, wout, werr)
				}
			})
		}
	}
}

func TestMapChainNames(t *testing.T) {
	// File names as qemu-img shows them: relative backing names are
	// taken relative to their overlay's directory, without cleaning.
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	shell(t, dir, `
mkdir a b
qemu-img create -q -f raw b/base.raw 1M
qemu-io -f raw -c "write -P 1 0 64k" b/base.raw >/dev/null
qemu-img create -q -f qcow2 -b ../b/base.raw -F raw a/top.qcow2
`)
	top := filepath.Join(dir, "a", "top.qcow2")
	var out bytes.Buffer
	if err := runCo(t, func(co *coroutine.Co) error { return Map(co, MapOptions{Filename: top, MaxLength: -1}, &out) }); err != nil {
		t.Fatal(err)
	}
	want, _, _ := qemuIn(t, dir, "map", top)
	if out.String() != want || !strings.Contains(want, "a/../b/base.raw") {
		t.Errorf("map:\n%s\nqemu-img:\n%s", out.String(), want)
	}
}
