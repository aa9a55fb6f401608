package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// The image tools (check, map, resize, commit, rebase, measure, dd, amend)
// from the command line, against qemu-img 7.2 run the same way: each case gets
// two copies of a directory of images, ublkimg runs in one and qemu-img in
// the other, with the same relative names. Standard output and the exit
// status must be the same. On stderr, qemu-img's error (its "qemu-img: "
// lines joined, without the help hint and warnings) must be ublkimg's one
// "ublkimg: " line, which comes last; lines the tools print on stderr
// before it (check's "Leaked cluster ..." reports) must match too, and
// dd's complaint about a skip past the end, which does not fail, is
// "ublkimg: " where qemu-img's is "qemu-img: ".

const toolImages = `
qemu-img create -q -f raw base.raw 4M
qemu-io -f raw -c "write -P 1 0 3M" base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 6M
qemu-io -c "write -P 3 0 4k" -c "write -z 2M 64k" -c "write -c -P 4 3M 64k" top.qcow2 >/dev/null
qemu-img create -q -f qcow2 lone.qcow2 16M
qemu-io -c "write -P 1 0 128k" -c "discard 0 64k" lone.qcow2 >/dev/null
qemu-img create -q -f qcow2 leak.qcow2 16M
qemu-io -c "write -P 1 0 128k" -c "discard 0 64k" leak.qcow2 >/dev/null
printf '\000\001' | dd of=leak.qcow2 bs=1 seek=$((0x20000+10)) conv=notrunc 2>/dev/null
qemu-img create -q -f raw new.raw 2M
qemu-io -f raw -c "write -P 1 0 1M" new.raw >/dev/null
head -c 100000 /dev/urandom > in.raw
qemu-img create -q -f qcow2 -u -b base.raw -F qcow2 wrongfmt.qcow2 4M
`

func TestToolVerbs(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := t.TempDir()
	sh := exec.Command("bash", "-e", "-c", toolImages)
	sh.Dir = src
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("making images: %v\n%s", err, out)
	}
	for _, args := range [][]string{
		{"check", "lone.qcow2"},
		{"check", "--output=json", "lone.qcow2"},
		{"check", "leak.qcow2"},
		{"check", "-q", "leak.qcow2"},
		{"check", "-r", "leaks", "leak.qcow2"},
		{"check", "--repair=all", "--output", "json", "leak.qcow2"},
		{"check", "top.qcow2"},
		{"check", "base.raw"},
		{"check", "-f", "raw", "lone.qcow2"},
		{"check", "-f", "foo", "lone.qcow2"},
		{"check", "-r", "some", "lone.qcow2"},
		{"check", "--output=xml", "lone.qcow2"},
		{"check", "-T", "foo", "lone.qcow2"},
		{"check", "nope.qcow2"},
		{"check", "-f", "qcow2", "base.raw"},
		{"check", "wrongfmt.qcow2"},
		{"check"},
		{"check", "lone.qcow2", "top.qcow2"},

		{"map", "top.qcow2"},
		{"map", "--output=json", "top.qcow2"},
		{"map", "top.qcow2", "--output", "json", "-s", "1M", "-l", "2M"},
		{"map", "--start-offset=1G", "--output=json", "top.qcow2"},
		{"map", "--output=json", "base.raw"},
		{"map", "-f", "raw", "top.qcow2"},
		{"map", "-s", "foo", "top.qcow2"},
		{"map", "-l", "-1", "top.qcow2"},
		{"map", "--output=yaml", "top.qcow2"},
		{"map"},

		{"resize", "-f", "raw", "base.raw", "+1M"},
		{"resize", "-q", "lone.qcow2", "32M"},
		{"resize", "lone.qcow2", "-1M"},
		{"resize", "--shrink", "lone.qcow2", "-1M"},
		{"resize", "-f", "raw", "base.raw", "--", "-5M"},
		{"resize", "-f", "raw", "--preallocation=full", "base.raw", "5M"},
		{"resize", "-f", "raw", "--preallocation=bad", "base.raw", "5M"},
		{"resize", "-f", "raw", "base.raw", "5x"},
		{"resize", "base.raw"},
		{"resize", "base.raw", "1M", "2M"},

		{"commit", "top.qcow2"},
		{"commit", "-d", "-q", "top.qcow2"},
		{"commit", "-b", "base.raw", "top.qcow2"},
		{"commit", "-b", "nope", "top.qcow2"},
		{"commit", "lone.qcow2"},
		{"commit", "-t", "foo", "top.qcow2"},
		{"commit", "-r", "x", "top.qcow2"},
		{"commit"},

		{"rebase", "-b", "new.raw", "-F", "raw", "top.qcow2"},
		{"rebase", "-p", "-b", "new.raw", "-F", "raw", "top.qcow2"},
		{"rebase", "-b", "new.raw", "top.qcow2"},
		{"rebase", "-u", "-b", "moved.raw", "-F", "raw", "top.qcow2"},
		{"rebase", "-b", "", "top.qcow2"},
		{"rebase", "-b", "nope", "top.qcow2"},
		{"rebase", "-F", "foo", "-b", "new.raw", "top.qcow2"},
		{"rebase", "top.qcow2"},
		{"rebase", "-u", "-b", "new.raw", "-F", "raw", "base.raw"},

		{"measure", "--size", "1G"},
		{"measure", "-O", "qcow2", "--size", "1G", "--output=json"},
		{"measure", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", "top.qcow2"},
		{"measure", "-O", "qcow2", "--output", "json", "lone.qcow2"},
		{"measure", "-O", "qcow2", "-o", "cluster_size=3k", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "foo=1", "--size", "1G"},
		{"measure", "--size", "1G", "top.qcow2"},
		{"measure", "wrongfmt.qcow2"},
		{"measure", "-f", "raw"},
		{"measure"},
		{"measure", "a", "b"},

		{"dd", "if=in.raw", "of=out.raw", "bs=4k", "count=10", "skip=2"},
		{"dd", "-O", "qcow2", "if=top.qcow2", "of=out.qcow2", "bs=64k"},
		{"dd", "if=in.raw", "of=out.raw", "skip=1M"},
		{"dd", "if=in.raw", "of=out.raw", "bs=0"},
		{"dd", "if=in.raw"},
		{"dd", "if=in.raw", "of=out.raw", "conv=notrunc"},
		{"dd", "-q", "if=in.raw", "of=out.raw"},

		{"amend", "-p", "-o", "refcount_bits=64", "lone.qcow2"},
		{"amend", "-p", "-o", "compat=0.10", "lone.qcow2"},
		{"amend", "-q", "-p", "-o", "lazy_refcounts=on", "lone.qcow2"},
		{"amend", "-o", "backing_file=new.raw", "top.qcow2"},
		{"amend", "-o", "backing_file=base.raw,backing_fmt=raw", "top.qcow2"},
		{"amend", "-o", "refcount_bits=8", "nope.qcow2"},
		{"amend", "-f", "raw", "-o", "size=1M", "base.raw"},
		{"amend", "lone.qcow2"},
		{"amend", "-o", "compat=1.1"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			t.Parallel()
			ours, theirs := t.TempDir(), t.TempDir()
			cp := exec.Command("bash", "-c", "cp -a --sparse=always . "+ours+" && cp -a --sparse=always . "+theirs)
			cp.Dir = src
			if out, err := cp.CombinedOutput(); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			sameAsQemu(t, ours, theirs, args)
			// The images must read alike afterwards.
			for _, name := range []string{"base.raw", "top.qcow2", "lone.qcow2", "out.raw", "out.qcow2"} {
				a, b := filepath.Join(ours, name), filepath.Join(theirs, name)
				if r := runIn(t, "/", "qemu-img", "compare", "-U", a, b); r.code != 0 && !strings.Contains(r.stderr, "No such file") {
					t.Errorf("%s differs from qemu-img's: %s%s", name, r.stdout, r.stderr)
				}
			}
		})
	}
}

// runIn runs a command in dir.
func runIn(t *testing.T, dir, name string, args ...string) result {
	t.Helper()
	return runAsIn(t, nil, dir, name, args...)
}

// toolStderr returns ublkimg's stderr and qemu-img's in ublkimg's form: the
// lines before the error as they are, then the error as one line (see
// qemuMessage), with "Could not open 'x': Could not open 'x'" said once.
func toolStderr(t *testing.T, got, want result) (string, string) {
	t.Helper()
	var gotLines string
	if got.stderr != "" {
		l := joinHint(strings.Split(strings.TrimSuffix(got.stderr, "\n"), "\n"))
		last := l[len(l)-1]
		if strings.HasPrefix(last, "ublkimg: ") {
			oneErrorLine(t, result{stderr: last + "\n"})
		}
		gotLines = strings.Join(l, "\n")
	}
	var pre, msg []string
	for _, l := range strings.Split(strings.TrimSuffix(want.stderr, "\n"), "\n") {
		switch {
		case l == "", strings.HasPrefix(l, "qemu-img: warning: "):
			// resize's warning after its refusal to shrink: ublkimg
			// keeps to the one error line.
		case strings.HasPrefix(l, "qemu-img: ") || len(msg) > 0 && !strings.HasPrefix(l, "Try ") && !strings.HasPrefix(l, "WARNING") && !strings.HasPrefix(l, "    "):
			msg = append(msg, l)
		case strings.HasPrefix(l, "Try ") || strings.HasPrefix(l, "WARNING") || strings.HasPrefix(l, "    "):
		default:
			pre = append(pre, l)
		}
	}
	if len(msg) > 0 {
		m := qemuMessage(strings.Join(msg, "\n"))
		m = strings.Join(strings.Fields(m), " ")
		if i := strings.Index(m, "Could not open '"); i >= 0 {
			if j := strings.Index(m[i+16:], "'"); j >= 0 {
				dup := m[i : i+16+j+1]
				m = strings.Replace(m, dup+": "+dup, dup, 1)
			}
		}
		pre = append(pre, "ublkimg: "+m)
	}
	return gotLines, strings.Join(pre, "\n")
}
