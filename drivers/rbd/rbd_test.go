package rbd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/file"
	_ "ublkimg/drivers/qcow2"
	_ "ublkimg/drivers/raw"
	"ublkimg/internal/cephtest"
	"ublkimg/internal/qemutest"
)

func TestMain(m *testing.M) { cephtest.Main(m) }

// newImage creates an image of size bytes with the rbd tool and returns
// its rbd: file name.
func newImage(t *testing.T, size string) (conf, name, spec string) {
	t.Helper()
	conf = cephtest.Conf(t)
	name = cephtest.ImageName(t)
	cephtest.Rbd(t, conf, "create", "--size", size, cephtest.Pool+"/"+name)
	return conf, name, cephtest.Spec(conf, name)
}

// export reads the whole image with qemu-img (librbd through QEMU's driver).
func export(t *testing.T, spec string) []byte {
	t.Helper()
	qemutest.Require(t, "qemu-img")
	out := filepath.Join(t.TempDir(), "export.raw")
	if b, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", spec, out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, b)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestReadWrite writes a pattern with many concurrent requests from
// coroutines on several loops through one node, flushes, and checks it
// through qemu-img, then reads it back through the driver.
func TestReadWrite(t *testing.T) {
	const size = 8 << 20
	_, _, spec := newImage(t, "8M")
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	bdrvtest.WithNode(t, bdrv.Spec{Filename: spec, Format: "raw", Cache: bdrv.CacheNone}, func(co *coroutine.Co, n *bdrv.Node) error {
		if n.Length() != size {
			return fmt.Errorf("length %d, want %d", n.Length(), size)
		}
		// Four loops, each with 16 coroutines writing 64 KiB pieces.
		if err := onLoops(4, 16, func(co *coroutine.Co, loop, i int) error {
			for off := int64((loop*16 + i) * 65536); off < size; off += 64 * 65536 {
				// Two iovec elements per request.
				buf := append([]byte(nil), want[off:off+65536]...)
				if err := n.Pwritev(co, off, bdrv.IOVec{buf[:4096], buf[4096:]}, 0); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return err
		}
		if err := n.Flush(co); err != nil {
			return err
		}
		got := make([]byte, size)
		if err := n.Preadv(co, 0, bdrv.IOVec{got}, 0); err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			return errors.New("read back differs from what was written")
		}
		return nil
	})
	if got := export(t, spec); !bytes.Equal(got, want) {
		t.Fatal("qemu-img reads different data")
	}
}

// onLoops runs per coroutines on each of nloops new loops and returns the
// first error.
func onLoops(nloops, per int, fn func(co *coroutine.Co, loop, i int) error) error {
	errc := make(chan error, nloops*per)
	for l := range nloops {
		loop, err := coroutine.Start(coroutine.Config{})
		if err != nil {
			return err
		}
		defer loop.Close()
		for i := range per {
			loop.Spawn(func(co *coroutine.Co) { errc <- fn(co, l, i) })
		}
	}
	var first error
	for range nloops * per {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// TestZeroesDiscardStatus checks write-zeroes, discard and block status
// against what was written.
func TestZeroesDiscardStatus(t *testing.T) {
	_, _, spec := newImage(t, "64M")
	obj := int64(4 << 20)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: spec, Format: "rbd"}, func(co *coroutine.Co, n *bdrv.Node) error {
		data := bytes.Repeat([]byte{0xab}, 1<<20)
		// Objects 2 and 5 hold data.
		for _, o := range []int64{2, 5} {
			if err := n.Pwritev(co, o*obj, bdrv.IOVec{data}, 0); err != nil {
				return err
			}
		}
		for _, c := range []struct {
			off, bytes int64
			zero       bool
			pnum       int64
		}{
			{0, 64 << 20, true, 2 * obj},
			{obj + 4096, 64<<20 - obj - 4096, true, obj - 4096},
			{2 * obj, 62 << 20, false, obj},
			{2*obj + 512, 62<<20 - 512, false, obj - 512},
			{3 * obj, 61 << 20, true, 2 * obj},
		} {
			st, err := n.BlockStatus(co, true, c.off, c.bytes)
			if err != nil {
				return err
			}
			if st.Flags&bdrv.StatusZero != 0 != c.zero || st.Pnum != c.pnum {
				return fmt.Errorf("status at %d: flags %#x pnum %d, want zero=%v pnum %d", c.off, st.Flags, st.Pnum, c.zero, c.pnum)
			}
		}
		if err := n.Pdiscard(co, 5*obj, obj); err != nil {
			return err
		}
		if err := n.PwriteZeroes(co, 2*obj, 4096, 0); err != nil {
			return err
		}
		got := make([]byte, 8192)
		if err := n.Preadv(co, 2*obj, bdrv.IOVec{got}, 0); err != nil {
			return err
		}
		if !bytes.Equal(got[:4096], make([]byte, 4096)) || got[4096] != 0xab {
			return errors.New("write-zeroes did not zero exactly its range")
		}
		st, err := n.BlockStatus(co, true, 5*obj, obj)
		if err != nil {
			return err
		}
		if st.Flags&bdrv.StatusZero == 0 {
			return fmt.Errorf("discarded object: flags %#x, want zero", st.Flags)
		}
		return nil
	})
}

// TestOpenErrors checks QEMU's messages for a missing pool, image,
// snapshot, conf file and conf option, each still matching ENOENT.
func TestOpenErrors(t *testing.T) {
	conf, name, _ := newImage(t, "1M")
	for _, c := range []struct{ filename, want string }{
		{"rbd:nopool/x:conf=" + conf, "error opening pool nopool: No such file or directory"},
		{"rbd:rbd/nox:conf=" + conf, "error reading header from nox: No such file or directory"},
		{"rbd:rbd/" + name + "@nosnap:conf=" + conf, "error reading header from " + name + ": No such file or directory"},
		{"rbd:rbd/" + name + ":conf=/nonexistent", "error reading conf file /nonexistent: No such file or directory"},
		{"rbd:rbd/" + name + ":conf=" + conf + ":foo=bar", "invalid conf option foo: No such file or directory"},
	} {
		err := coroutine.Run(func(co *coroutine.Co) error {
			n, err := bdrv.Open(co, bdrv.Spec{Filename: c.filename, Format: "raw", ReadOnly: true})
			if err == nil {
				n.Close(co)
			}
			return err
		})
		if err == nil || err.Error() != c.want {
			t.Errorf("open %s: %v, want %s", c.filename, err, c.want)
		}
		// The errno stays matchable under the message (uring.Errno).
		if !errors.Is(err, unix.ENOENT) {
			t.Errorf("open %s: %v does not match ENOENT", c.filename, err)
		}
	}
}

// TestNoLibrary: without librbd the driver says so in one line.
func TestNoLibrary(t *testing.T) {
	err := doLoad("librbd-that-is-not-there.so.1")
	if err == nil || err.Error() != "rbd: librbd.so.1 not found (install librbd1)" {
		t.Fatalf("load: %v", err)
	}
}

// TestUnreachable: a cluster that does not answer is an error after the
// connect timeout, in QEMU's words.
func TestUnreachable(t *testing.T) {
	t.Parallel()
	if err := load(); err != nil {
		t.Skip(err)
	}
	conf := filepath.Join(t.TempDir(), "ceph.conf")
	// A port nothing listens on (the discard port, never served here).
	if err := os.WriteFile(conf, []byte("[global]\nmon_host = 127.0.0.1:9\nauth_client_required = none\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		limit time.Duration
	}{
		{"rbd:rbd/x:conf=" + conf + ":client_mount_timeout=2", 10 * time.Second},
		// The driver's default timeout, without an override.
		{"rbd:rbd/x:conf=" + conf, 40 * time.Second},
	} {
		t0 := time.Now()
		err := coroutine.Run(func(co *coroutine.Co) error {
			n, err := bdrv.Open(co, bdrv.Spec{Filename: c.name, Format: "raw", ReadOnly: true})
			if err == nil {
				n.Close(co)
			}
			return err
		})
		took := time.Since(t0)
		if err == nil || err.Error() != "error connecting: Connection timed out" {
			t.Errorf("%s: %v", c.name, err)
		}
		if took > c.limit {
			t.Errorf("%s: failed after %v, want under %v", c.name, took, c.limit)
		}
		t.Logf("%s: %v after %v", c.name, err, took.Round(100*time.Millisecond))
	}
}

// TestCephxKey: on a cluster that requires cephx, the key from a secret
// (key-secret, as QEMU's) opens the image, and a wrong key is refused in
// QEMU's one line.
func TestCephxKey(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts a cluster of its own")
	}
	p := cephtest.NewPrivate(t, cephtest.PrivateOptions{Cephx: true})
	cephtest.Rbd(t, p.Conf, "create", "--size", "4M", cephtest.Pool+"/k")
	for _, c := range []struct {
		key, err string
	}{
		{p.AdminKey, ""},
		{"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==", "error connecting: Permission denied"},
	} {
		if _, err := bdrv.AddSecretObject("secret,id=cephx-key,format=base64,data=" + c.key); err != nil {
			t.Fatal(err)
		}
		err := coroutine.Run(func(co *coroutine.Co) error {
			n, err := bdrv.Open(co, bdrv.Spec{Format: "rbd", ReadOnly: true,
				Options: bdrv.Options{"pool": cephtest.Pool, "image": "k", "conf": p.Conf, "key-secret": "cephx-key"}})
			if err != nil {
				return err
			}
			if n.Length() != 4<<20 {
				t.Errorf("length %d", n.Length())
			}
			return n.Close(co)
		})
		bdrv.RemoveSecret("cephx-key")
		if c.err == "" && err != nil || c.err != "" && (err == nil || err.Error() != c.err) {
			t.Errorf("key %s: %v, want %q", c.key, err, c.err)
		}
	}
}
