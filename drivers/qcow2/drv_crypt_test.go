package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

const cryptPass = "s3cret passphrase"

var secretSeq atomic.Int64

// addSecret registers data as a secret object for the test's lifetime and
// returns its id.
func addSecret(t testing.TB, data string) string {
	t.Helper()
	id := fmt.Sprintf("sec%d", secretSeq.Add(1))
	if _, err := bdrv.AddSecretObject("secret,id=" + id + ",data=" + data); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdrv.RemoveSecret(id) })
	return id
}

// qemuSecret is the --object argument and --image-opts string qemu-img and
// qemu-io need to open an encrypted image.
func qemuSecret(path string) (obj, opts string) {
	return "secret,id=k,data=" + cryptPass, "driver=qcow2,file.filename=" + path + ",encrypt.key-secret=k"
}

// qemuCrypt runs qemu-img create, retrying QEMU's occasional failure to time
// its PBKDF2 benchmark on a loaded machine.
func qemuCrypt(t testing.TB, args ...string) {
	t.Helper()
	args = append([]string{"create", "-q", "-f", "qcow2", "--object", "secret,id=k,data=" + cryptPass}, args...)
	var err error
	out := qemutest.RetryPBKDF2Timing(func() string {
		var b []byte
		b, err = exec.Command("qemu-img", args...).CombinedOutput()
		return string(b)
	})
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// qioCrypt runs qemu-io commands on an encrypted image.
func qioCrypt(t testing.TB, path string, cmds ...string) {
	t.Helper()
	obj, opts := qemuSecret(path)
	a := []string{"--object", obj, "--image-opts"}
	for _, c := range cmds {
		a = append(a, "-c", c)
	}
	out := sh(t, "qemu-io", append(a, opts)...)
	if strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
}

// rawOfCrypt is rawOf for an encrypted image: qemu-img convert given the
// secret.
func rawOfCrypt(t testing.TB, path string) []byte {
	t.Helper()
	obj, opts := qemuSecret(path)
	out := filepath.Join(t.TempDir(), "oracle.raw")
	sh(t, "qemu-img", "convert", "-U", "--object", obj, "--image-opts", opts, "-O", "raw", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestEncryptedImages reads and writes LUKS and legacy AES images that
// qemu-img created and qemu-io filled: reads must match qemu-img convert,
// writes (unaligned, partial clusters, so copy-on-write re-encrypts old
// data) must read back identically through qemu-img, and qemu-img check
// must stay clean.
func TestEncryptedImages(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	cases := []struct {
		name, opts string
	}{
		{"luks", "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10,cluster_size=4096"},
		{"aes", "encrypt.format=aes,encrypt.key-secret=k,cluster_size=4096"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "e.qcow2")
			qemuCrypt(t, "-o", tc.opts, path, "1M")
			qioCrypt(t, path, "write -P 0x11 0 12k", "write -P 0x22 20k 3k", "write -P 0x33 900k 100k", "write -z 4k 4k")
			id := addSecret(t, cryptPass)
			opts := bdrv.Options{"encrypt.key-secret": id}

			want := rawOfCrypt(t, path)
			bdrvtest.WithNode(t, bdrv.Spec{Filename: path, ReadOnly: true, Options: opts}, func(co *coroutine.Co, n *bdrv.Node) error {
				for _, chunks := range [][]int{{1 << 20}, {4096}, {7777, 513, 65536 + 3}} {
					got, err := readChunked(co, n, chunks)
					if err != nil {
						return err
					}
					if i := firstDiff(got, want); i >= 0 {
						return fmt.Errorf("chunks %v: differs from qemu-img at %#x", chunks, i)
					}
				}
				// Data is DATA without a host offset: the file holds ciphertext.
				st, err := n.BlockStatus(co, false, 0, 4096)
				if err != nil {
					return err
				}
				if st.Flags&bdrv.StatusData == 0 || st.Flags&bdrv.StatusOffsetValid != 0 {
					return fmt.Errorf("block status flags %#x, want DATA without OFFSET_VALID", st.Flags)
				}
				return nil
			})

			// Writes: unaligned (the generic layer pads to 512-byte sectors),
			// into allocated clusters, across cluster boundaries and into
			// new clusters whose copy-on-write areas are zeros.
			writes := []struct {
				off int64
				n   int
			}{{100, 300}, {10000, 5000}, {20*1024 + 512, 512}, {500 * 1024, 70000}, {1<<20 - 1000, 1000}}
			bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Options: opts}, func(co *coroutine.Co, n *bdrv.Node) error {
				for i, w := range writes {
					p := pattern(uint64(i), w.n)
					if err := n.Pwritev(co, w.off, bdrv.IOVec{p}, 0); err != nil {
						return err
					}
					copy(want[w.off:], p)
				}
				return nil
			})
			qcheckCrypt(t, path)
			if got := rawOfCrypt(t, path); !bytes.Equal(got, want) {
				t.Fatalf("after our writes qemu-img reads differently at %#x", firstDiff(got, want))
			}
		})
	}
}

// TestEncryptedOpenErrors checks the refusals with qemu-img's wording, and
// that a metadata-only open (qemu-img info) needs no key but reads nothing.
func TestEncryptedOpenErrors(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	path := filepath.Join(t.TempDir(), "e.qcow2")
	qemuCrypt(t, "-o", "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10", path, "1M")
	wrong := addSecret(t, "wrong")
	right := addSecret(t, cryptPass)
	cases := []struct {
		opts bdrv.Options
		want string
	}{
		{bdrv.Options{}, "Parameter 'encrypt.key-secret' is required for cipher"},
		{bdrv.Options{"encrypt.key-secret": "nosuch"}, "No secret with id 'nosuch'"},
		{bdrv.Options{"encrypt.key-secret": wrong}, "Invalid password, cannot unlock any keyslot"},
	}
	for _, tc := range cases {
		err := openErr(bdrv.Spec{Filename: path, ReadOnly: true, Options: tc.opts})
		if err == nil || !strings.HasSuffix(err.Error(), ": "+tc.want) {
			t.Errorf("options %v: %v, want ...%q", tc.opts, err, tc.want)
		}
	}
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Options: bdrv.Options{"encrypt.key-secret": right}}, func(co *coroutine.Co, n *bdrv.Node) error {
		err := n.Pwritev(co, 0, bdrv.IOVec{make([]byte, 65536)}, bdrv.ReqWriteCompressed)
		if err == nil || !strings.Contains(err.Error(), "Compression and encryption not supported at the same time") {
			return fmt.Errorf("compressed write: %v", err)
		}
		if err := n.Pwritev(co, 0, bdrv.IOVec{bytes.Repeat([]byte{7}, 4096)}, 0); err != nil {
			return err
		}
		return nil
	})
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, ReadOnly: true, NoIO: true}, func(co *coroutine.Co, n *bdrv.Node) error {
		err := n.Preadv(co, 0, bdrv.IOVec{make([]byte, 512)}, 0)
		if err == nil || !errors.Is(err, unix.EIO) {
			return fmt.Errorf("reading encrypted data without the key: %v", err)
		}
		return nil
	})
	qcheckCrypt(t, path)
}

// qcheckCrypt runs qemu-img check on an encrypted image and fails on any
// finding, leaks included.
func qcheckCrypt(t testing.TB, path string) {
	t.Helper()
	obj, opts := qemuSecret(path)
	sh(t, "qemu-img", "check", "-U", "--object", obj, "--image-opts", opts)
}

// TestCreateEncrypted creates encrypted images and checks them against
// qemu-img: the layout (header, L1, refcounts, LUKS header area, file size)
// equals qemu-img create's, qemu-img check is clean, and data written
// through our driver reads back identically through qemu-img given the
// secret.
func TestCreateEncrypted(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	id := addSecret(t, cryptPass)
	cases := []struct {
		name, opts string
		qemu       bool // compare the layout with qemu-img create's
		method     uint32
	}{
		{"luks", "encrypt.format=luks,encrypt.iter-time=10", true, qcow2.CryptLUKS},
		{"luks-cbc-essiv", "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1,cluster_size=4096", false, qcow2.CryptLUKS},
		{"luks-prealloc", "encrypt.format=luks,encrypt.iter-time=0,preallocation=metadata,cluster_size=16384", false, qcow2.CryptLUKS},
		{"aes-legacy", "encryption=on", true, qcow2.CryptAES},
	}
	for _, tc := range cases {
		ours := filepath.Join(dir, tc.name+".qcow2")
		if err := createOurs(t, ours, 1<<20, tc.opts+",encrypt.key-secret="+id); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		hdr := func(path string) *qcow2.Header {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			h, err := qcow2.ParseHeader(b, int64(len(b)))
			if err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			return h
		}
		h := hdr(ours)
		if h.CryptMethod != tc.method {
			t.Errorf("%s: crypt_method %d, want %d", tc.name, h.CryptMethod, tc.method)
		}
		if tc.qemu {
			theirs := filepath.Join(dir, tc.name+".qemu.qcow2")
			qemuCrypt(t, "-o", tc.opts+",encrypt.key-secret=k", theirs, "1M")
			q := hdr(theirs)
			if h.L1TableOffset != q.L1TableOffset || h.RefcountTableOffset != q.RefcountTableOffset ||
				(q.Crypto != nil) != (h.Crypto != nil) || q.Crypto != nil && *q.Crypto != *h.Crypto {
				t.Errorf("%s: layout L1 %#x reftable %#x crypto %+v; qemu-img: %#x %#x %+v", tc.name,
					h.L1TableOffset, h.RefcountTableOffset, h.Crypto, q.L1TableOffset, q.RefcountTableOffset, q.Crypto)
			}
			so, _ := os.Stat(ours)
			sq, _ := os.Stat(theirs)
			if so.Size() != sq.Size() {
				t.Errorf("%s: file size %d, qemu-img's %d", tc.name, so.Size(), sq.Size())
			}
		}
		qcheckCrypt(t, ours)
		want := make([]byte, 1<<20)
		if strings.Contains(tc.opts, "prealloc") {
			// Preallocated clusters hold zeros in the file, which decrypt
			// to noise, as in QEMU: what reads back is qemu-img's view.
			want = rawOfCrypt(t, ours)
		}
		bdrvtest.WithNode(t, bdrv.Spec{Filename: ours, Options: bdrv.Options{"encrypt.key-secret": id}}, func(co *coroutine.Co, n *bdrv.Node) error {
			for i, w := range []struct{ off, n int }{{0, 4096}, {70000, 100000}, {1<<20 - 512, 512}} {
				p := pattern(uint64(i), w.n)
				copy(want[w.off:], p)
				if err := n.Pwritev(co, int64(w.off), bdrv.IOVec{p}, 0); err != nil {
					return err
				}
			}
			return nil
		})
		qcheckCrypt(t, ours)
		if got := rawOfCrypt(t, ours); !bytes.Equal(got, want) {
			t.Errorf("%s: qemu-img reads our writes differently at %#x", tc.name, firstDiff(got, want))
		}
	}
}

// TestCreateEncryptedRefusals checks qemu-img 7.2's refusals of bad
// encryption options, word for word.
func TestCreateEncryptedRefusals(t *testing.T) {
	dir := t.TempDir()
	id := addSecret(t, cryptPass)
	cases := []struct{ opts, want string }{
		{"encryption=on,encrypt.format=luks,encrypt.key-secret=" + id, "'encrypt.format' and its alias 'encryption' can't be used at the same time"},
		{"encrypt.key-secret=" + id, "Parameter 'encrypt.format' is missing"},
		{"encrypt.format=foo,encrypt.key-secret=" + id, "Parameter 'format' does not accept value 'foo'"},
		{"encrypt.format=aes,encrypt.iter-time=10,encrypt.key-secret=" + id, "Parameter 'encrypt.iter-time' is unexpected"},
		{"encrypt.format=luks", "Parameter 'encrypt.key-secret' is required for cipher"},
		{"encryption=on", "Parameter 'encrypt.key-secret' is required for cipher"},
		{"encrypt.format=luks,encrypt.key-secret=nosuch", "No secret with id 'nosuch'"},
		{"encrypt.format=luks,encrypt.cipher-alg=twofish-256,encrypt.key-secret=" + id, "Cipher algorithm 'twofish-256' is not supported"},
	}
	for i, tc := range cases {
		err := createOurs(t, filepath.Join(dir, fmt.Sprint(i)), 1<<20, tc.opts)
		if err == nil || err.Error() != tc.want {
			t.Errorf("%s: %v, want %q", tc.opts, err, tc.want)
		}
	}
}

// TestEncryptedBackingChain: an encrypted overlay over an encrypted
// backing file with another passphrase (backing.encrypt.key-secret), both
// created here. Unaligned writes to the overlay copy the rest of their
// clusters from the backing file (decrypted with its key, re-encrypted
// with the overlay's); qemu-img, given both secrets, must read the chain as
// we expect and find both images clean.
func TestEncryptedBackingChain(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	kb, kt := addSecret(t, "base-pass"), addSecret(t, "top-pass")
	if err := createOurs(t, base, 1<<20, "encrypt.format=luks,encrypt.iter-time=0,cluster_size=4096,encrypt.key-secret="+kb); err != nil {
		t.Fatal(err)
	}
	want := pattern(1, 1<<20)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: base, Options: bdrv.Options{"encrypt.key-secret": kb}}, func(co *coroutine.Co, n *bdrv.Node) error {
		return n.Pwritev(co, 0, bdrv.IOVec{bytes.Clone(want)}, 0)
	})
	if err := createOurs(t, top, 1<<20, "encrypt.format=luks,encrypt.iter-time=0,cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2,encrypt.key-secret="+kt); err != nil {
		t.Fatal(err)
	}
	opts := bdrv.Options{"encrypt.key-secret": kt, "backing.encrypt.key-secret": kb}
	bdrvtest.WithNode(t, bdrv.Spec{Filename: top, Options: opts}, func(co *coroutine.Co, n *bdrv.Node) error {
		for i, w := range []struct{ off, n int }{{100, 300}, {5000, 9000}, {1<<20 - 700, 700}} {
			p := pattern(uint64(10+i), w.n)
			copy(want[w.off:], p)
			if err := n.Pwritev(co, int64(w.off), bdrv.IOVec{p}, 0); err != nil {
				return err
			}
		}
		got := make([]byte, 1<<20)
		if err := n.Preadv(co, 0, bdrv.IOVec{got}, 0); err != nil {
			return err
		}
		if i := firstDiff(got, want); i >= 0 {
			return fmt.Errorf("reading the chain back: differs at %#x", i)
		}
		return nil
	})
	objs := []string{"--object", "secret,id=kb,data=base-pass", "--object", "secret,id=kt,data=top-pass"}
	chain := "driver=qcow2,file.filename=" + top + ",encrypt.key-secret=kt,backing.encrypt.key-secret=kb"
	out := filepath.Join(dir, "out.raw")
	sh(t, "qemu-img", append(append([]string{"convert", "-U"}, objs...), "--image-opts", chain, "-O", "raw", out)...)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("qemu-img reads the chain differently at %#x", i)
	}
	sh(t, "qemu-img", append(append([]string{"check", "-U"}, objs...), "--image-opts", chain)...)
	sh(t, "qemu-img", append(append([]string{"check", "-U"}, objs...), "--image-opts", "driver=qcow2,file.filename="+base+",encrypt.key-secret=kb")...)
}
