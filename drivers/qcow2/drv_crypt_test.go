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
	"ublkimg/coroutine"
)

const cryptPass = "s3cret passphrase"

var secretSeq atomic.Int64

// addSecret registers data as a secret object for the test's lifetime and
// returns its id.
func addSecret(t testing.TB, data string) string {
	t.Helper()
	id := fmt.Sprintf("sec%d", secretSeq.Add(1))
	if err := bdrv.AddSecretObject("secret,id=" + id + ",data=" + data); err != nil {
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
	for try := 0; ; try++ {
		out, err := exec.Command("qemu-img", args...).CombinedOutput()
		if err == nil {
			return
		}
		if try == 3 || !strings.Contains(string(out), "Unable to get accurate CPU usage") {
			t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
		}
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
	needQemu(t)
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
			withNode(t, bdrv.Spec{Filename: path, ReadOnly: true, Options: opts}, func(co *coroutine.Co, n *bdrv.Node) error {
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
			withNode(t, bdrv.Spec{Filename: path, Options: opts}, func(co *coroutine.Co, n *bdrv.Node) error {
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
	needQemu(t)
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
	withNode(t, bdrv.Spec{Filename: path, Options: bdrv.Options{"encrypt.key-secret": right}}, func(co *coroutine.Co, n *bdrv.Node) error {
		err := n.Pwritev(co, 0, bdrv.IOVec{make([]byte, 65536)}, bdrv.ReqWriteCompressed)
		if err == nil || !strings.Contains(err.Error(), "Compression and encryption not supported at the same time") {
			return fmt.Errorf("compressed write: %v", err)
		}
		if err := n.Pwritev(co, 0, bdrv.IOVec{bytes.Repeat([]byte{7}, 4096)}, 0); err != nil {
			return err
		}
		return nil
	})
	withNode(t, bdrv.Spec{Filename: path, ReadOnly: true, NoIO: true}, func(co *coroutine.Co, n *bdrv.Node) error {
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
