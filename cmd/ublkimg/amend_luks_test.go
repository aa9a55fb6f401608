package main

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// amend's LUKS key slot management (-o encrypt.state=active|inactive,...)
// against qemu-img 7.2 run the same way: same output and exit status, and
// afterwards the same key slots active, the same secrets opening each
// image, the same data behind them and a clean qemu-img check.

const luksAmendImages = `
O="--object secret,id=s0,data=pw0 --object secret,id=s1,data=pw1"
pbkdf2_retry qemu-img create -q -f qcow2 $O -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=4k e.qcow2 1M
cp e.qcow2 single.qcow2
pbkdf2_retry qemu-img amend $O -o encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=3,encrypt.iter-time=10 --image-opts driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0
qemu-io $O --image-opts driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0 -c "write -P 9 8k 100k" >/dev/null
qemu-img create -q -f qcow2 p.qcow2 1M
qemu-img create -q -f qcow2 $O -o encrypt.format=aes,encrypt.key-secret=s0 a.qcow2 1M
`

func TestAmendLUKS(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, luksAmendImages)
	secrets := []string{"--object", "secret,id=s0,data=pw0", "--object", "secret,id=s1,data=pw1", "--object", "secret,id=s2,data=pw2"}
	const (
		e      = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0"
		single = "driver=qcow2,file.filename=single.qcow2,encrypt.key-secret=s0"
		add    = "encrypt.state=active,encrypt.iter-time=10,encrypt.new-secret=s2"
	)
	work := fixtureCopies(t, src)
	for i, args := range [][]string{
		{"-o", add, "--image-opts", e},
		{"-o", add + ",encrypt.keyslot=5", "--image-opts", e},
		{"-o", add + ",encrypt.keyslot=3", "--image-opts", e},
		{"--force", "-o", add + ",encrypt.keyslot=3", "--image-opts", e},
		{"-o", add + ",encrypt.keyslot=9", "--image-opts", e},
		{"-o", add, "--image-opts", "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s1"},
		{"-o", "encrypt.state=active,encrypt.iter-time=10", "--image-opts", e},
		{"-o", add + ",encrypt.old-secret=s0", "--image-opts", e},
		{"-o", "encrypt.state=active,encrypt.new-secret=nosuch", "--image-opts", e},
		{"-p", "-o", add + ",lazy_refcounts=on", "--image-opts", e},
		{"-o", add, "e.qcow2"},
		{"-o", "encrypt.state=inactive,encrypt.keyslot=3", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.keyslot=5", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.old-secret=s1", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.old-secret=s2", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.old-secret=s1,encrypt.keyslot=0", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.old-secret=s0,encrypt.keyslot=0", "--image-opts", e},
		{"-o", "encrypt.state=inactive", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.new-secret=s1", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.iter-time=10,encrypt.keyslot=3", "--image-opts", e},
		{"-o", "encrypt.state=inactive,encrypt.keyslot=0", "--image-opts", single},
		{"-o", "encrypt.state=inactive,encrypt.old-secret=s0", "--image-opts", single},
		{"--force", "-o", "encrypt.state=inactive,encrypt.keyslot=0", "--image-opts", single},
		{"-o", "encrypt.state=bogus", "--image-opts", e},
		{"-o", "encrypt.keyslot=1", "--image-opts", e},
		{"-o", "encrypt.keyslot=x", "--image-opts", e},
		{"-o", "encrypt.foo=1", "--image-opts", e},
		{"-o", "encrypt.state=active", "p.qcow2"},
		{"-o", "encrypt.state=active,encrypt.new-secret=s1", "--image-opts", "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=s0"},
	} {
		args := append(append([]string{"amend"}, secrets...), args...)
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(args, " "))
			ours, theirs := work(t, i)
			sameAsQemu(t, ours, theirs, args)
			for _, name := range []string{"e.qcow2", "single.qcow2"} {
				a, b := filepath.Join(ours, name), filepath.Join(theirs, name)
				if got, want := activeSlots(t, a), activeSlots(t, b); got != want {
					t.Errorf("%s: active key slots %s, qemu-img's %s", name, got, want)
				}
				for _, s := range []string{"s0", "s1", "s2"} {
					o := "driver=qcow2,file.filename=%s,encrypt.key-secret=" + s
					ra := runIn(t, "/", "qemu-img", append(append([]string{"check"}, secrets...), "--image-opts", fmt.Sprintf(o, a))...)
					rb := runIn(t, "/", "qemu-img", append(append([]string{"check"}, secrets...), "--image-opts", fmt.Sprintf(o, b))...)
					if ra.code != rb.code {
						t.Errorf("%s with %s: qemu-img check exit %d (%s), on qemu-img's %d (%s)", name, s, ra.code, ra.stderr, rb.code, rb.stderr)
					}
					if ra.code != 0 {
						continue
					}
					r := runIn(t, "/", "qemu-img", append(append([]string{"compare"}, secrets...), "--image-opts", fmt.Sprintf(o, a), fmt.Sprintf(o, b))...)
					if r.code != 0 {
						t.Errorf("%s with %s differs from qemu-img's: %s%s", name, s, r.stdout, r.stderr)
					}
				}
			}
		})
	}
}

var activeRE = regexp.MustCompile(`active: (true|false)`)

// activeSlots lists the active flags of an image's LUKS key slots, as
// qemu-img info shows them.
func activeSlots(t *testing.T, file string) string {
	t.Helper()
	r := runIn(t, "/", "qemu-img", "info", "-U", file)
	var s []string
	for _, m := range activeRE.FindAllStringSubmatch(r.stdout, -1) {
		s = append(s, m[1])
	}
	return strings.Join(s, ",")
}
