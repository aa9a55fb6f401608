package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// An encrypted overlay over an encrypted backing file, each with its own
// key: commit and rebase take both keys from --image-opts
// (encrypt.key-secret for the image, backing.encrypt.key-secret for its
// backing file), against qemu-img 7.2 run the same way.

const cryptChainImages = `
O="--object secret,id=s0,data=pw0 --object secret,id=s1,data=pw1"
pbkdf2_retry qemu-img create -q -f qcow2 $O -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=4k base.qcow2 1M
pbkdf2_retry qemu-img create -q -f qcow2 $O -o encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10,cluster_size=4k -b base.qcow2 -F qcow2 top.qcow2
qemu-img create -q -f qcow2 plain.qcow2 1M
qemu-io $O --image-opts driver=qcow2,file.filename=base.qcow2,encrypt.key-secret=s0 -c "write -P 3 0 512k" >/dev/null
qemu-io $O --image-opts driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s1,backing.encrypt.key-secret=s0 -c "write -P 5 60k 100k" -c "write -z 300k 8k" >/dev/null
`

func TestEncryptedChainVerbs(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, cryptChainImages)
	const (
		s0, s1 = "secret,id=s0,data=pw0", "secret,id=s1,data=pw1"
		top    = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s1"
		chain  = top + ",backing.encrypt.key-secret=s0"
	)
	work := fixtureCopies(t, src)
	// After rebase -b "" the image has no backing file to give a key to;
	// after -u -b x.qcow2 one that does not exist.
	const topAlone = "driver=qcow2,file.filename=%s/top.qcow2,encrypt.key-secret=s1"
	const topChain = topAlone + ",backing.encrypt.key-secret=s0"
	for i, tc := range []struct {
		args []string
		top  string // how the post-check opens top.qcow2; "" skips it
	}{
		{[]string{"commit", "--object", s0, "--object", s1, "--image-opts", chain}, topChain},
		{[]string{"commit", "-d", "--object", s0, "--object", s1, "--image-opts", chain}, topChain},
		{[]string{"commit", "-q", "-p", "--object", s0, "--object", s1, "--image-opts", chain}, topChain},
		{[]string{"commit", "--object", s0, "--object", s1, "--image-opts", top}, topChain},
		{[]string{"commit", "--object", s1, "--image-opts", chain}, topChain},
		{[]string{"commit", "--object", s0, "--object", s1, "top.qcow2"}, topChain},
		{[]string{"commit", "--object", s0, "--object", s1, "-b", "base.qcow2", "--image-opts", chain}, topChain},
		{[]string{"commit", "--object", s0, "--object", s1, "-b", "nope.qcow2", "--image-opts", chain}, topChain},
		{[]string{"commit", "--image-opts", "driver=qcow2,file.filename=plain.qcow2"}, topChain},
		{[]string{"check", "--object", s0, "--object", s1, "--image-opts", chain}, topChain},
		{[]string{"check", "--object", s1, "--image-opts", chain}, topChain},
		{[]string{"info", "--object", s0, "--object", s1, "--image-opts", chain}, topChain},
		{[]string{"rebase", "--object", s0, "--object", s1, "-b", "", "--image-opts", chain}, topAlone},
		{[]string{"rebase", "--object", s0, "--object", s1, "-b", "", "--image-opts", top}, topChain},
		{[]string{"rebase", "--object", s0, "--object", s1, "-b", "", "top.qcow2"}, topChain},
		{[]string{"rebase", "--object", s1, "-u", "-b", "x.qcow2", "-F", "qcow2", "--image-opts", top}, ""},
		{[]string{"rebase", "-U", "--object", s0, "--object", s1, "-b", filepath.Join(src, "plain.qcow2"), "-F", "qcow2", "--image-opts", chain}, topAlone},
		{[]string{"rebase", "--object", s0, "--object", s1, "-b", filepath.Join(src, "base.qcow2"), "-F", "qcow2", "--image-opts", chain}, topChain},
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(tc.args, " "))
			ours, theirs := work(t, i)
			sameAsQemu(t, ours, theirs, tc.args)
			if tc.top == "" {
				for _, d := range []string{ours, theirs} {
					if r := runIn(t, d, "qemu-img", "info", "-U", "top.qcow2"); !strings.Contains(r.stdout, "\nbacking file: x.qcow2\n") {
						t.Errorf("qemu-img info %s: %s%s", d, r.stdout, r.stderr)
					}
				}
				return
			}
			// Both images read alike decrypted through qemu-img, and
			// ours pass qemu-img check.
			for _, o := range []string{"driver=qcow2,file.filename=%s/base.qcow2,encrypt.key-secret=s0", tc.top} {
				a, b := strings.Replace(o, "%s", ours, 1), strings.Replace(o, "%s", theirs, 1)
				r := runIn(t, "/", "qemu-img", "compare", "-U", "--object", s0, "--object", s1, "--image-opts", a, b)
				if r.code != 0 {
					t.Errorf("%s differs from qemu-img's: %s%s", a, r.stdout, r.stderr)
				}
				if r := runIn(t, "/", "qemu-img", "check", "-U", "--object", s0, "--object", s1, "--image-opts", a); r.code != 0 {
					t.Errorf("qemu-img check %s: %s%s", a, r.stdout, r.stderr)
				}
			}
		})
	}
}

// makeImages runs script with bash -e in a new temporary directory and
// returns the directory; the script may call pbkdf2_retry.
func makeImages(t *testing.T, script string) string {
	t.Helper()
	src := t.TempDir()
	sh := exec.Command("bash", "-e", "-c", qemutest.ShellRetryPBKDF2+script)
	sh.Dir = src
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("making images: %v\n%s", err, out)
	}
	return src
}

// fixtureCopies returns a function that gives test case i two copies of
// the files in src, one for ublkimg and one for qemu-img, in directories
// whose names hold no commas (--image-opts strings hold paths).
func fixtureCopies(t *testing.T, src string) func(t *testing.T, i int) (ours, theirs string) {
	base, err := os.MkdirTemp("", "ublkimg-crypt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	return func(t *testing.T, i int) (string, string) {
		t.Helper()
		ours, theirs := filepath.Join(base, fmt.Sprint(i, "a")), filepath.Join(base, fmt.Sprint(i, "b"))
		cp := exec.Command("bash", "-c", "mkdir "+ours+" "+theirs+" && cp -a --sparse=always . "+ours+" && cp -a --sparse=always . "+theirs)
		cp.Dir = src
		if out, err := cp.CombinedOutput(); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return ours, theirs
	}
}
