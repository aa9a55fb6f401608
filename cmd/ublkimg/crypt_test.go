package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// Encrypted images and secret objects from the command line, against
// qemu-img 7.2 run the same way (as TestToolVerbs): same stdout and exit
// status, qemu-img's error as ublkimg's one line.

const cryptImages = `
printf 'correct horse' > pw
head -c 1M /dev/urandom > plain.raw
pbkdf2_retry qemu-img create -q -f qcow2 --object secret,id=s0,file=pw -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=4k enc.qcow2 1M
qemu-img convert -n --object secret,id=s0,file=pw -f raw plain.raw --target-image-opts driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0
qemu-io --object secret,id=s0,file=pw --image-opts driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0 -c "write -z 64k 64k" -c "discard 256k 64k" >/dev/null
qemu-img create -q -f qcow2 --object secret,id=s0,file=pw -o encrypt.format=aes,encrypt.key-secret=s0 aes.qcow2 1M
qemu-io --object secret,id=s0,file=pw --image-opts driver=qcow2,file.filename=aes.qcow2,encrypt.key-secret=s0 -c "write -P 7 4k 100k" >/dev/null
qemu-img create -q -f qcow2 pl.qcow2 2M
qemu-io -c "write -P 1 0 64k" pl.qcow2 >/dev/null
`

func TestEncryptedVerbs(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, cryptImages)
	const (
		obj   = "secret,id=s0,file=pw"
		enc   = "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0"
		aes   = "driver=qcow2,file.filename=aes.qcow2,encrypt.key-secret=s0"
		plain = "driver=raw,file.filename=plain.raw"
	)
	work := fixtureCopies(t, src)
	for i, args := range [][]string{
		{"info", "enc.qcow2"},
		{"info", "--output=json", "aes.qcow2"},
		{"info", "--object", obj, "--output=json", "enc.qcow2"},
		{"check", "--object", obj, "--image-opts", enc},
		{"check", "--object", obj, "--output=json", "--image-opts", aes},
		{"check", "enc.qcow2"},
		{"check", "--object", "secret,id=s0,data=wrong", "--image-opts", enc},
		{"check", "--object", "secret,id=s1,data=x", "--image-opts", enc},
		{"map", "--object", obj, "--output=json", "--image-opts", enc},
		{"map", "--object", obj, "--image-opts", enc},
		{"map", "enc.qcow2"},
		{"map", "--image-opts", "driver=qcow2,file.filename=pl.qcow2"},
		{"compare", "--image-opts", "driver=qcow2,file.filename=pl.qcow2", plain},
		{"compare", "-s", "--image-opts", "driver=qcow2,file.filename=pl.qcow2", plain},
		{"check", "--image-opts", "file.filename=pl.qcow2"},
		{"bench", "-c", "1", "--image-opts", "driver=qcow2,file.filename=enc.qcow2"},
		{"compare", "--object", obj, "--image-opts", enc, plain},
		{"compare", "--object", obj, "--image-opts", aes, plain},
		{"convert", "--object", obj, "--image-opts", enc, "-O", "raw", "out.raw"},
		{"convert", "--object", obj, "--image-opts", aes, "-O", "qcow2", "out.qcow2"},
		{"convert", "enc.qcow2", "out.raw"},
		{"convert", "--target-image-opts", "plain.raw", "driver=raw,file.filename=out.raw"},
		{"convert", "-n", "--object", obj, "--target-image-opts", "plain.raw", enc},
		{"convert", "--object", obj, "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "plain.raw", "new.qcow2"},
		{"convert", "--object", obj, "-c", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "plain.raw", "new.qcow2"},
		{"create", "-f", "qcow2", "--object", obj, "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "new.qcow2", "1M"},
		{"create", "-f", "qcow2", "--object", obj, "-o", "encryption=on,encrypt.key-secret=s0", "new.qcow2", "1M"},
		{"create", "-f", "qcow2", "-o", "encrypt.format=luks", "new.qcow2", "1M"},
		{"dd", "--object", obj, "--image-opts", "if=" + enc, "of=out.raw", "bs=64k"},
		{"info", "--object", "secret,id=s0", "enc.qcow2"},
		{"info", "--object", "secret,id=s0,data=x,file=pw", "enc.qcow2"},
		{"info", "--object", "secret,id=s0,data=!,format=base64", "enc.qcow2"},
		{"info", "--object", "secret,id=s0,data=x", "--object", "secret,id=s0,data=y", "enc.qcow2"},
		{"info", "--object", "foo,id=s0", "enc.qcow2"},
		{"info", "--output=json", "--image-opts", "driver=qcow2,file.filename=enc.qcow2"},
		{"resize", "--object", obj, "--image-opts", enc, "2M"},
		{"resize", "enc.qcow2", "2M"},
		{"snapshot", "--object", obj, "-c", "s1", "--image-opts", enc},
		{"amend", "--object", obj, "-o", "lazy_refcounts=on", "--image-opts", enc},
		{"measure", "--object", obj, "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128", "--size", "1G"},
		{"measure", "--object", obj, "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,cluster_size=4k", "plain.raw"},
		{"measure", "-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"},
		{"measure", "--object", obj, "-O", "qcow2", "--image-opts", enc},
		{"measure", "-O", "qcow2", "enc.qcow2"},
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(args, " "))
			ours, theirs := work(t, i)
			sameAsQemu(t, ours, theirs, args)
			// What was written reads alike through qemu-img (new keys
			// differ, so encrypted images are compared decrypted) and
			// passes qemu-img check.
			for _, name := range []string{"enc.qcow2", "out.raw", "out.qcow2", "new.qcow2"} {
				a, b := filepath.Join(ours, name), filepath.Join(theirs, name)
				o := "driver=qcow2,file.filename=%s,encrypt.key-secret=s0"
				if name == "out.raw" || name == "out.qcow2" {
					o = "file.filename=%s,driver=" + strings.TrimPrefix(filepath.Ext(name), ".")
				}
				r := runIn(t, "/", "qemu-img", "compare", "-U", "--object", "secret,id=s0,file="+filepath.Join(src, "pw"), "--image-opts",
					strings.Replace(o, "%s", a, 1), strings.Replace(o, "%s", b, 1))
				if r.code != 0 && !strings.Contains(r.stderr, "No such file") {
					t.Errorf("%s differs from qemu-img's: %s%s", name, r.stdout, r.stderr)
				}
				if strings.HasSuffix(name, ".qcow2") {
					r := runIn(t, "/", "qemu-img", "check", "-U", "--object", "secret,id=s0,file="+filepath.Join(src, "pw"), "--image-opts", strings.Replace(o, "%s", a, 1))
					if r.code != 0 && !strings.Contains(r.stderr, "No such file") {
						t.Errorf("qemu-img check %s: %s%s", name, r.stdout, r.stderr)
					}
				}
			}
		})
	}
}

// sameAsQemu runs ublkimg in ours and qemu-img in theirs with args and
// fails unless stdout and the exit status are the same and stderr is
// qemu-img's as ublkimg words it (toolStderr).
func sameAsQemu(t *testing.T, ours, theirs string, args []string) {
	t.Helper()
	got := runIn(t, ours, binary, args...)
	var want result
	qemutest.RetryPBKDF2Timing(func() string {
		want = runIn(t, theirs, "qemu-img", args...)
		return want.stderr
	})
	if got.stdout != want.stdout || got.code != want.code {
		t.Errorf("exit %d, stdout:\n%s\nqemu-img: exit %d, stdout:\n%s", got.code, got.stdout, want.code, want.stdout)
	}
	gotLines, wantLines := toolStderr(t, got, want)
	if gotLines != wantLines {
		t.Errorf("stderr:\n%s\nqemu-img's, as ublkimg words it:\n%s", gotLines, wantLines)
	}
}

// TestAttachImageOpts: attach takes --object and --image-opts like the
// image verbs; bad option strings fail in one line before any device work.
func TestAttachImageOpts(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ublkimg", "attach", "--image-opts", "driver=qcow2"}, "A block device must be specified for \"file\""},
		{[]string{"ublkimg", "attach", "-f", "raw", "--image-opts", "driver=qcow2,file.filename=a.img"}, "--image-opts and --format are mutually exclusive"},
		{[]string{"ublkimg", "attach", "--object", "secret,id=s0", "a.img"}, "Either 'file' or 'data' must be provided"},
	} {
		var out, errOut strings.Builder
		if code := run(tc.args, &out, &errOut); code != 1 {
			t.Errorf("%q: exit %d, want 1", tc.args, code)
		}
		if msg := errOut.String(); msg != "ublkimg: "+tc.want+"\n" {
			t.Errorf("%q: stderr %q, want %q", tc.args, msg, tc.want)
		}
	}
}
