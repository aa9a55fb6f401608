package luks_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/file"
	_ "ublkimg/drivers/luks"
	"ublkimg/drivers/lukscrypto"
	"ublkimg/internal/fuzzlimit"
	"ublkimg/internal/qemutest"
)

const pass = "s3cret passphrase"

var secretSeq atomic.Int64

// secret registers pass under a fresh id for the test's lifetime.
func secret(t testing.TB, data string) string {
	t.Helper()
	id := "lk" + string(rune('a'+secretSeq.Add(1)%26)) + time.Now().Format("150405.000000000")
	if err := bdrv.AddSecret(id, []byte(data)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdrv.RemoveSecret(id) })
	return id
}

// qemu runs a qemu tool with the secret object "k" holding pass; qemu-img
// create is retried, with a growing pause, when QEMU cannot time its PBKDF2
// benchmark on a loaded machine.
func qemu(t testing.TB, tool string, args ...string) string {
	t.Helper()
	obj := []string{"--object", "secret,id=k,data=" + pass}
	if tool == "qemu-img" {
		args = append(append([]string{args[0]}, obj...), args[1:]...)
	} else {
		args = append(obj, args...)
	}
	var err error
	out := qemutest.RetryPBKDF2Timing(func() string {
		var b []byte
		b, err = exec.Command(tool, args...).CombinedOutput()
		return string(b)
	})
	if err != nil || strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return out
}

func imageOpts(path string) string {
	return "driver=luks,file.filename=" + path + ",key-secret=k"
}

// qemuRaw is the volume's payload as qemu-img decrypts it.
func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "oracle.raw")
	qemu(t, "qemu-img", "convert", "-U", "--image-opts", imageOpts(path), "-O", "raw", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// suites are the cipher suites the tests run through, as qemu-img's
// create options.
var suites = []string{
	"key-secret=k",
	"cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
	"cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain",
	"cipher-alg=aes-128,ivgen-alg=plain64,hash-alg=sha512",
	"cipher-alg=aes-128,cipher-mode=ctr,ivgen-alg=plain64,hash-alg=md5",
}

// TestQemuVolumes: volumes qemu-img created and qemu-io wrote read the same
// through the driver, in unaligned pieces that bdrv pads to sectors; then
// unaligned writes and write-zeroes through the driver read back the same
// through qemu-img, for each cipher suite.
func TestQemuVolumes(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for i, suite := range suites {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "v.luks")
			qemu(t, "qemu-img", "create", "-q", "-f", "luks", "-o", "key-secret=k,iter-time=10,"+suite, path, "2M")
			qemu(t, "qemu-io", "--image-opts", imageOpts(path),
				"-c", "write -P 0x11 0 2M", "-c", "write -P 0xa5 4096 70000", "-c", "write -z 1M 65536", "-c", "write -P 0x3c 1536k 500k")
			want := qemuRaw(t, path)
			id := secret(t, pass)
			spec := bdrv.Spec{Filename: path, Format: "luks", Options: bdrv.Options{"key-secret": id}}
			r := rand.New(rand.NewPCG(1, uint64(len(suite))))
			bdrvtest.WithNode(t, spec, func(co *coroutine.Co, n *bdrv.Node) error {
				if n.Length() != int64(len(want)) {
					t.Fatalf("length %d, qemu-img reads %d bytes", n.Length(), len(want))
				}
				got := make([]byte, len(want))
				for off := 0; off < len(got); {
					k := min(1+r.IntN(300000), len(got)-off)
					if err := n.Preadv(co, int64(off), bdrv.IOVec{got[off : off+k]}, 0); err != nil {
						return err
					}
					off += k
				}
				if !bytes.Equal(got, want) {
					t.Errorf("read differs from qemu-img's at %d", firstDiff(got, want))
				}
				for range 20 {
					off, k := r.IntN(len(want)-1), 1+r.IntN(200000)
					k = min(k, len(want)-off)
					if r.IntN(4) == 0 {
						if err := n.PwriteZeroes(co, int64(off), int64(k), bdrv.ReqMayUnmap); err != nil {
							return err
						}
						clear(want[off : off+k])
						continue
					}
					b := make([]byte, k)
					for i := range b {
						b[i] = byte(r.Uint32())
					}
					if err := n.Pwritev(co, int64(off), bdrv.IOVec{b}, 0); err != nil {
						return err
					}
					copy(want[off:], b)
				}
				return nil
			})
			if got := qemuRaw(t, path); !bytes.Equal(got, want) {
				t.Errorf("qemu-img reads our writes differently at %d", firstDiff(got, want))
			}
		})
	}
}

// TestCreateResize: a volume the driver creates has qemu-img's layout
// (same file size, header area and key slot offsets for the same suite),
// opens in qemu-img with the passphrase, and resizes as qemu-img resize
// does: the file is the header area plus the new size, and data written
// before reads back.
func TestCreateResize(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for i, suite := range suites[:2] {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			dir := t.TempDir()
			ours, theirs := filepath.Join(dir, "ours.luks"), filepath.Join(dir, "theirs.luks")
			id := secret(t, pass)
			o, err := bdrv.ParseOptionString(suite)
			if err != nil {
				t.Fatal(err)
			}
			opts := o.Merge(bdrv.Options{"key-secret": id, "iter-time": "10"})
			err = coroutine.Run(func(co *coroutine.Co) error {
				return bdrv.Create(co, "luks", &bdrv.CreateRequest{Filename: ours, Size: 1 << 20, Options: opts})
			})
			if err != nil {
				t.Fatal(err)
			}
			qemu(t, "qemu-img", "create", "-q", "-f", "luks", "-o", "key-secret=k,iter-time=10,"+suite, theirs, "1M")
			if a, b := fileSize(t, ours), fileSize(t, theirs); a != b {
				t.Errorf("file size %d, qemu-img's %d", a, b)
			}
			if a, b := header(t, ours).Info(), header(t, theirs).Info(); a.PayloadOffset != b.PayloadOffset ||
				a.Slots[7].KeyOffset != b.Slots[7].KeyOffset || a.CipherMode != b.CipherMode || a.IVGenAlg != b.IVGenAlg {
				t.Errorf("header %+v, qemu-img's %+v", a, b)
			}
			qemu(t, "qemu-io", "--image-opts", imageOpts(ours), "-c", "write -P 0x77 512 4096")
			bdrvtest.WithNode(t, bdrv.Spec{Filename: ours, Format: "luks", Options: bdrv.Options{"key-secret": id}},
				func(co *coroutine.Co, n *bdrv.Node) error { return n.Truncate(co, 3<<20, false, bdrv.PreallocOff) })
			qemu(t, "qemu-img", "resize", "-q", "--image-opts", imageOpts(theirs), "3M")
			if a, b := fileSize(t, ours), fileSize(t, theirs); a != b {
				t.Errorf("resized file size %d, qemu-img's %d", a, b)
			}
			got := qemuRaw(t, ours)
			want := make([]byte, 3<<20)
			copy(want[512:4608], bytes.Repeat([]byte{0x77}, 4096))
			if len(got) != len(want) || !bytes.Equal(got[512:4608], want[512:4608]) {
				t.Errorf("resized volume: %d bytes, differs at %d", len(got), 512+firstDiff(got[512:4608], want[512:4608]))
			}
		})
	}
}

// TestOpenErrors: opens that must fail, with QEMU's wording where QEMU has
// one; a hostile header fails the open without a panic.
func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.luks")
	id := secret(t, pass)
	wrong := secret(t, "not it")
	err := coroutine.Run(func(co *coroutine.Co) error {
		return bdrv.Create(co, "luks", &bdrv.CreateRequest{Filename: good, Size: 1 << 20,
			Options: bdrv.Options{"key-secret": id, "iter-time": "1"}})
	})
	if err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	variant := func(name string, f func(b []byte) []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, f(bytes.Clone(img)), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		path string
		opts bdrv.Options
		want string
	}{
		{good, nil, "Parameter 'key-secret' is required for cipher"},
		{good, bdrv.Options{"key-secret": "nope"}, "No secret with id 'nope'"},
		{good, bdrv.Options{"key-secret": wrong}, "Invalid password, cannot unlock any keyslot"},
		{variant("zero", func(b []byte) []byte { return make([]byte, 1<<20) }), nil, "Volume is not in LUKS format"},
		{variant("short", func(b []byte) []byte { return b[:300] }), nil, "past the end of the file"},
		{variant("cut", func(b []byte) []byte { return b[:100000] }), nil, "payload offset 2068480 is past the end of the file"},
		{variant("stripes", func(b []byte) []byte { b[208+44] = 0xff; return b }), nil, "Keyslot 0 is corrupted"},
		{variant("keyoff", func(b []byte) []byte { b[208+40] = 0x7f; return b }), nil, "Keyslot 0 is overlapping with the encrypted payload"},
	} {
		err := bdrvtest.OpenError(bdrv.Spec{Filename: tc.path, Format: "luks", Options: tc.opts})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s %v: %v, want %q", filepath.Base(tc.path), tc.opts, err, tc.want)
		}
	}
}

// FuzzOpen opens hostile volumes for metadata (as qemu-img info does): an
// error, never a panic. The seeds are volumes from lukscrypto.Create.
func FuzzOpen(f *testing.F) {
	for _, o := range []lukscrypto.CreateOptions{{IterTime: time.Millisecond}, {IterTime: time.Millisecond, CipherMode: "cbc", IVGenAlg: "essiv"}} {
		_, area, err := lukscrypto.Create([]byte("x"), o)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(area[:4096], int64(len(area)+4096))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, head []byte, size int64) {
		fuzzlimit.Guard(t, fuzzlimit.Limits{})
		p := filepath.Join(dir, "v.luks")
		if err := os.WriteFile(p, head, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, max(int64(len(head)), min(size, 1<<30))); err != nil {
			t.Fatal(err)
		}
		bdrvtest.OpenError(bdrv.Spec{Filename: p, Format: "luks", ReadOnly: true, NoIO: true})
	})
}

func header(t testing.TB, path string) *lukscrypto.Header {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := lukscrypto.ParseHeader(b, 0)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
