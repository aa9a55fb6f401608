package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

// Raw LUKS volumes (-f luks) from the command line, against qemu-img 7.2
// run the same way (as TestEncryptedVerbs). info names an image opened
// with a key secret "json:{...}", as qemu-img does.

const luksImages = `
printf 'correct horse' > pw
head -c 1M /dev/urandom > plain.raw
pbkdf2_retry qemu-img create -q -f luks --object secret,id=s0,file=pw -o key-secret=s0,iter-time=10 v.luks 1M
pbkdf2_retry qemu-img create -q -f luks --object secret,id=s0,file=pw -o key-secret=s0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1 cbc.luks 1M
qemu-img convert -n --object secret,id=s0,file=pw -f raw plain.raw --target-image-opts driver=luks,file.filename=v.luks,key-secret=s0
qemu-io --object secret,id=s0,file=pw --image-opts driver=luks,file.filename=cbc.luks,key-secret=s0 -c "write -P 9 4k 100k" >/dev/null
pbkdf2_retry qemu-img create -q -f qcow2 --object secret,id=s0,file=pw -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 enc.qcow2 1M
`

func TestLUKSVerbs(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, luksImages)
	const (
		obj   = "secret,id=s0,file=pw"
		v     = "driver=luks,file.filename=v.luks,key-secret=s0"
		cbc   = "driver=luks,file.filename=cbc.luks,key-secret=s0"
		plain = "driver=raw,file.filename=plain.raw"
		newO  = "key-secret=s0,iter-time=10"
	)
	work := fixtureCopies(t, src)
	for i, args := range [][]string{
		{"info", "v.luks"},
		{"info", "--output=json", "cbc.luks"},
		{"info", "-f", "luks", "--object", obj, "--output=json", "v.luks"},
		{"info", "--object", obj, "--image-opts", v},
		{"info", "--object", obj, "--image-opts", v + ",foo=1"},
		{"info", "--object", obj, "--output=json", "--image-opts", "driver=luks,file.filename=cbc.luks"},
		{"info", "--object", obj, "--output=json", "--image-opts", "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0"},
		{"check", "--object", obj, "--image-opts", v},
		{"check", "--object", obj, "--output=json", "--image-opts", cbc},
		{"check", "v.luks"},
		{"check", "-f", "luks", "v.luks"},
		{"check", "--object", "secret,id=s0,data=wrong", "--image-opts", v},
		{"check", "--object", "secret,id=s1,data=x", "--image-opts", v},
		{"map", "--object", obj, "--output=json", "--image-opts", v},
		{"map", "--object", obj, "--image-opts", cbc},
		{"compare", "--object", obj, "--image-opts", v, plain},
		{"compare", "--object", obj, "--image-opts", cbc, plain},
		{"bench", "-c", "1", "--image-opts", "driver=luks,file.filename=v.luks"},
		{"convert", "--object", obj, "--image-opts", v, "-O", "raw", "out.raw"},
		{"convert", "--object", obj, "--image-opts", cbc, "-O", "raw", "out.raw"},
		{"convert", "v.luks", "out.raw"},
		{"convert", "-n", "--object", obj, "--target-image-opts", "plain.raw", cbc},
		{"convert", "--object", obj, "-O", "luks", "-o", newO, "plain.raw", "new.luks"},
		{"convert", "--object", obj, "-O", "luks", "-o", newO + ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha512", "plain.raw", "new.luks"},
		{"convert", "-O", "luks", "plain.raw", "new.luks"},
		{"create", "-f", "luks", "--object", obj, "-o", newO, "new.luks", "1M"},
		{"create", "-f", "luks", "--object", obj, "-o", newO + ",preallocation=full", "new.luks", "64k"},
		{"create", "-f", "luks", "--object", obj, "-o", newO + ",preallocation=metadata", "new.luks", "64k"},
		{"create", "-f", "luks", "--object", obj, "-o", newO + ",cipher-alg=des", "new.luks", "1M"},
		{"create", "-f", "luks", "--object", obj, "-o", newO + ",cipher-alg=sm4", "new.luks", "1M"},
		{"create", "-f", "luks", "--object", obj, "-o", newO + ",cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256", "new.luks", "1M"},
		{"create", "-f", "luks", "-o", "iter-time=10", "new.luks", "1M"},
		{"create", "-f", "luks", "--object", obj, "-o", newO + ",ivgen-alg=benbi", "new.luks", "1M"},
		{"create", "-f", "luks", "--object", obj, "-o", newO + ",preallocation=bogus", "new.luks", "1M"},
		{"measure", "--object", obj, "-O", "luks", "-o", "key-secret=s0", "--size", "1000"},
		{"dd", "--object", obj, "--image-opts", "if=" + v, "of=out.raw", "bs=64k"},
		{"resize", "--object", obj, "--image-opts", v, "2M"},
		{"resize", "--object", obj, "--image-opts", cbc, "--shrink", "512k"},
		{"resize", "v.luks", "2M"},
		{"measure", "--object", obj, "-O", "luks", "-o", "key-secret=s0", "--size", "1G"},
		{"measure", "--object", obj, "-O", "luks", "-o", "key-secret=s0,cipher-alg=aes-128,cipher-mode=cbc", "plain.raw"},
		{"measure", "--object", obj, "-O", "raw", "--image-opts", v},
		{"measure", "-O", "luks", "--size", "1G"},
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(args, " "))
			ours, theirs := work(t, i)
			sameAsQemu(t, ours, theirs, args)
			// What was written reads alike through qemu-img (new keys
			// differ, so volumes are compared decrypted). A new volume's
			// payload was never written and decrypts to noise, so it is
			// only opened.
			pw := "secret,id=s0,file=" + filepath.Join(src, "pw")
			for _, name := range []string{"v.luks", "cbc.luks", "out.raw", "new.luks"} {
				a, b := filepath.Join(ours, name), filepath.Join(theirs, name)
				o := "driver=luks,file.filename=%s,key-secret=s0"
				if name == "out.raw" {
					o = "driver=raw,file.filename=%s"
				}
				if name == "new.luks" && args[0] == "create" {
					r := runIn(t, "/", "qemu-img", "check", "-U", "--object", pw, "--image-opts", strings.Replace(o, "%s", a, 1))
					if r.code != 63 && !strings.Contains(r.stderr, "No such file") {
						t.Errorf("qemu-img cannot open our %s: %s%s", name, r.stdout, r.stderr)
					}
					continue
				}
				r := runIn(t, "/", "qemu-img", "compare", "-U", "--object", pw, "--image-opts",
					strings.Replace(o, "%s", a, 1), strings.Replace(o, "%s", b, 1))
				if r.code != 0 && !strings.Contains(r.stderr, "No such file") {
					t.Errorf("%s differs from qemu-img's: %s%s", name, r.stdout, r.stderr)
				}
			}
		})
	}
}
