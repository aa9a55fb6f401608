package bdrv_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/file"
	_ "ublkimg/drivers/null"
	_ "ublkimg/drivers/raw"
	"ublkimg/internal/qemutest"
)

// makeFile creates a file of size bytes with a deterministic pattern and
// returns its path and content.
func makeFile(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(1, uint64(size)))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

var cacheModes = []bdrv.CacheMode{bdrv.CacheWriteback, bdrv.CacheNone}

// TestUnalignedReadWrite writes and reads at odd offsets, lengths and buffer
// addresses, in both cache modes, and checks the file against a model.
func TestUnalignedReadWrite(t *testing.T) {
	cases := []struct{ off, n, bufSkew int }{
		{0, 4096, 0}, {1, 1, 0}, {511, 2, 0}, {100, 5000, 3}, {4095, 4097, 1},
		{8192, 512, 7}, {12345, 70000, 0}, {0, 131072, 9}, {60000, 1, 0},
	}
	for _, cache := range cacheModes {
		t.Run(cache.String(), func(t *testing.T) {
			path, model := makeFile(t, 256<<10)
			bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw", Cache: cache}, func(co *coroutine.Co, n *bdrv.Node) error {
				for i, c := range cases {
					src := make([]byte, c.n+c.bufSkew)[c.bufSkew:]
					for j := range src {
						src[j] = byte(i*31 + j)
					}
					if err := n.Pwritev(co, int64(c.off), bdrv.IOVec{src}, 0); err != nil {
						return fmt.Errorf("write %+v: %w", c, err)
					}
					copy(model[c.off:], src)
					got := make([]byte, c.n+c.bufSkew)[c.bufSkew:]
					if err := n.Preadv(co, int64(c.off), bdrv.IOVec{got}, 0); err != nil {
						return fmt.Errorf("read %+v: %w", c, err)
					}
					if !bytes.Equal(got, src) {
						return fmt.Errorf("read back %+v differs", c)
					}
				}
				// A vector of odd pieces.
				v := bdrv.IOVec{make([]byte, 3), make([]byte, 1000), make([]byte, 4093)}
				if err := n.Preadv(co, 777, v, 0); err != nil {
					return err
				}
				flat := append(append(append([]byte{}, v[0]...), v[1]...), v[2]...)
				if !bytes.Equal(flat, model[777:777+len(flat)]) {
					return errors.New("vectored read differs")
				}
				return nil
			})
			got, _ := os.ReadFile(path)
			if !bytes.Equal(got, model) {
				t.Fatal("file content differs from model")
			}
		})
	}
}

// TestConcurrentRMWAcrossLoops has coroutines on several loops write
// disjoint, unaligned ranges that share 512-byte blocks of an O_DIRECT file.
// Each write is a read-modify-write of whole blocks; without serialisation
// they would overwrite each other's bytes.
func TestConcurrentRMWAcrossLoops(t *testing.T) {
	path, _ := makeFile(t, 64<<10)
	const writers, piece = 96, 100 // 96*100 bytes: blocks shared by ~5 writers each
	var loops []*coroutine.Loop
	for range 3 {
		l, err := coroutine.Start(coroutine.Config{})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		loops = append(loops, l)
	}
	var node *bdrv.Node
	if err := loops[0].Call(func(co *coroutine.Co) (err error) {
		node, err = bdrv.Open(co, bdrv.Spec{Filename: path, Format: "raw", Cache: bdrv.CacheNone})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := loops[w%len(loops)].Call(func(co *coroutine.Co) error {
				buf := bytes.Repeat([]byte{byte(w + 1)}, piece)
				return node.Pwritev(co, int64(w*piece+3), bdrv.IOVec{buf}, 0)
			})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := loops[0].Call(func(co *coroutine.Co) error { return node.Close(co) }); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	for w := range writers {
		for i := range piece {
			if b := got[w*piece+3+i]; b != byte(w+1) {
				t.Fatalf("writer %d byte %d = %d: a concurrent read-modify-write lost it", w, i, b)
			}
		}
	}
}

func TestReadPastEndIsZero(t *testing.T) {
	path, data := makeFile(t, 1000)
	for _, cache := range cacheModes {
		bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "file", Cache: cache}, func(co *coroutine.Co, n *bdrv.Node) error {
			buf := bytes.Repeat([]byte{0xaa}, 8192)
			if err := n.Preadv(co, 0, bdrv.IOVec{buf}, 0); err != nil {
				return err
			}
			if !bytes.Equal(buf[:1000], data) || !bdrv.IsZero(buf[1000:]) {
				return fmt.Errorf("%v: read across EOF: want data then zeros", cache)
			}
			return nil
		})
	}
}

func TestWriteZeroesAndDiscard(t *testing.T) {
	path, _ := makeFile(t, 1<<20)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw"}, func(co *coroutine.Co, n *bdrv.Node) error {
		before := n.AllocatedSize(co)
		// Unaligned zeroes with unmap, zeroes without, and a discard.
		if err := n.PwriteZeroes(co, 1000, 300000, bdrv.ReqMayUnmap); err != nil {
			return err
		}
		if err := n.PwriteZeroes(co, 500000, 4096*3+5, 0); err != nil {
			return err
		}
		if err := n.Pdiscard(co, 700000, 200000); err != nil {
			return err
		}
		if err := n.Flush(co); err != nil {
			return err
		}
		after := n.AllocatedSize(co)
		if after >= before-200000 {
			return fmt.Errorf("allocated %d -> %d: unmap and discard freed too little", before, after)
		}
		buf := make([]byte, 300000)
		if err := n.Preadv(co, 1000, bdrv.IOVec{buf}, 0); err != nil {
			return err
		}
		if !bdrv.IsZero(buf) {
			return errors.New("zeroed range does not read as zeros")
		}
		return nil
	})
	got, _ := os.ReadFile(path)
	if !bdrv.IsZero(got[1000:301000]) || !bdrv.IsZero(got[500000:500000+4096*3+5]) {
		t.Fatal("file not zeroed where asked")
	}
	if got[999] == 0 && got[301000] == 0 {
		t.Fatal("zeroing spilled outside its range")
	}
}

// TestZeroFallback: null-co drops zero writes; NoFallback on a node whose
// driver cannot zero must fail with ErrNotSupported rather than write.
func TestZeroFallbackFlag(t *testing.T) {
	path, _ := makeFile(t, 64<<10)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw", Cache: bdrv.CacheNone}, func(co *coroutine.Co, n *bdrv.Node) error {
		// Unaligned with NO_FALLBACK: the head and tail blocks need a
		// read-modify-write, which is still done; the middle goes to
		// the driver.
		return n.PwriteZeroes(co, 100, 20000, bdrv.ReqNoFallback)
	})
	got, _ := os.ReadFile(path)
	if !bdrv.IsZero(got[100:20100]) {
		t.Fatal("range not zeroed")
	}
}

func TestBlockStatusHoles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sparse.raw")
	f, _ := os.Create(path)
	f.Truncate(4 << 20)
	f.WriteAt(bytes.Repeat([]byte{1}, 64<<10), 1<<20)
	f.Close()
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw"}, func(co *coroutine.Co, n *bdrv.Node) error {
		type ext struct {
			off, len int64
			data     bool
		}
		var got []ext
		for off := int64(0); off < n.Length(); {
			st, err := n.BlockStatusAbove(co, nil, true, off, n.Length()-off)
			if err != nil {
				return err
			}
			got = append(got, ext{off, st.Pnum, st.Flags&bdrv.StatusData != 0})
			off += st.Pnum
		}
		want := []ext{{0, 1 << 20, false}, {1 << 20, 64 << 10, true}, {1<<20 + 64<<10, 4<<20 - (1<<20 + 64<<10), false}}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("extents %v, want %v", got, want)
		}
		return nil
	})
}

func TestTruncatePrealloc(t *testing.T) {
	for _, p := range []bdrv.Prealloc{bdrv.PreallocOff, bdrv.PreallocFalloc, bdrv.PreallocFull} {
		t.Run(p.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "x.raw")
			err := coroutine.Run(func(co *coroutine.Co) error {
				return bdrv.Create(co, "raw", &bdrv.CreateRequest{Filename: path, Size: 3 << 20,
					Options: bdrv.Options{"preallocation": p.String()}})
			})
			if err != nil {
				t.Fatal(err)
			}
			var st unix.Stat_t
			unix.Stat(path, &st)
			if st.Size != 3<<20 {
				t.Fatalf("size %d", st.Size)
			}
			allocated := st.Blocks*512 >= 3<<20
			if allocated != (p != bdrv.PreallocOff) {
				t.Fatalf("preallocation %v: %d bytes allocated", p, st.Blocks*512)
			}
			bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw"}, func(co *coroutine.Co, n *bdrv.Node) error {
				if err := n.Truncate(co, 5<<20, true, p); err != nil {
					return err
				}
				if n.Length() != 5<<20 {
					return fmt.Errorf("length %d after grow", n.Length())
				}
				err := n.Truncate(co, 1<<20, true, bdrv.PreallocFull)
				if err == nil {
					return errors.New("shrink with preallocation accepted")
				}
				return n.Truncate(co, 1<<20, true, bdrv.PreallocOff)
			})
			if fi, _ := os.Stat(path); fi.Size() != 1<<20 {
				t.Fatalf("size after shrink %d", fi.Size())
			}
		})
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	ro := filepath.Join(dir, "ro.raw")
	os.WriteFile(ro, make([]byte, 4096), 0o444)
	cases := []struct {
		name string
		spec bdrv.Spec
		want string
		is   error
	}{
		{"missing", bdrv.Spec{Filename: filepath.Join(dir, "nope")}, "Could not open", unix.ENOENT},
		{"unknown format", bdrv.Spec{Filename: ro, Format: "vhdx9"}, "unknown file format 'vhdx9'", nil},
		{"not a file", bdrv.Spec{Filename: dir, Format: "raw", ReadOnly: true}, "to be a regular file or a block device", nil},
	}
	if os.Geteuid() != 0 {
		cases = append(cases, struct {
			name string
			spec bdrv.Spec
			want string
			is   error
		}{"read-only file for writing", bdrv.Spec{Filename: ro, Format: "raw"}, "Permission denied", unix.EACCES})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := bdrvtest.OpenError(c.spec)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want it to contain %q", err, c.want)
			}
			if c.is != nil && !errors.Is(err, c.is) {
				t.Fatalf("error %v does not wrap %v", err, c.is)
			}
		})
	}
}

// TestOpenSpecialFiles: only regular files and block devices are opened.
// A FIFO (whose open for reading would wait for a writer), a character
// device (/dev/zero reads forever) or a directory is refused before any
// read, read-only or read-write, by its name or through a symlink, as
// when a hostile image names one as its backing or data file.
func TestOpenSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(fifo, link); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{fifo, link, "/dev/null", "/dev/zero", dir} {
		for _, ro := range []bool{true, false} {
			done := make(chan error, 1)
			go func() {
				done <- bdrvtest.OpenError(bdrv.Spec{Filename: name, ReadOnly: ro})
			}()
			select {
			case err := <-done:
				want := "'file' driver requires '" + name + "' to be a regular file or a block device"
				if !ro && name == dir {
					want = "Is a directory" // refused by open(2)
				}
				if err == nil || !strings.Contains(err.Error(), want) {
					t.Errorf("%s (read-only %v): %v, want %q", name, ro, err, want)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("%s (read-only %v): the open hangs", name, ro)
			}
		}
	}
}

func TestReadOnlyNodeRefusesWrites(t *testing.T) {
	path, _ := makeFile(t, 8192)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw", ReadOnly: true}, func(co *coroutine.Co, n *bdrv.Node) error {
		if err := n.Pwritev(co, 0, bdrv.IOVec{make([]byte, 512)}, 0); !errors.Is(err, unix.EROFS) {
			return fmt.Errorf("write on read-only node: %v, want EROFS", err)
		}
		return nil
	})
}

// TestImageLockingWithQEMU checks the lock bytes interoperate with QEMU: a
// second writer is refused, qemu-img cannot read an image we write, and we
// cannot write an image qemu-io holds open.
func TestImageLockingWithQEMU(t *testing.T) {
	qemutest.Require(t, "qemu-io")
	path, _ := makeFile(t, 1<<20)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw"}, func(co *coroutine.Co, n *bdrv.Node) error {
		_, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "raw"})
		if err == nil || err.Error() != `Failed to get "write" lock` || !errors.Is(err, bdrv.ErrLocked) {
			return fmt.Errorf("second writer: %v", err)
		}
		ro, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "raw", ReadOnly: true,
			Options: bdrv.Options{"force-share": "on"}})
		if err != nil {
			return fmt.Errorf("force-share reader refused: %v", err)
		}
		ro.Close(co)
		// QEMU's raw driver shares every permission, so only a QEMU
		// writer conflicts with us: we do not share "write".
		out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "write 0 512", path).CombinedOutput()
		if !strings.Contains(string(out), `Failed to get "write" lock`) {
			return fmt.Errorf("qemu-io writing an image we write: %s", out)
		}
		return nil
	})
	// qemu-io writing the raw image (sharing everything) holds byte 101
	// only: we do not share writing, so we cannot open it.
	qemutest.HoldWithQemuIO(t, path, []int{101}, "-f", "raw")
	err := bdrvtest.OpenError(bdrv.Spec{Filename: path, Format: "raw"})
	if err == nil || err.Error() != `Failed to get shared "write" lock` || !errors.Is(err, bdrv.ErrLocked) {
		t.Fatalf("opening an image qemu-io holds: %v", err)
	}
}

func TestNullDriver(t *testing.T) {
	bdrvtest.WithNode(t, bdrv.Spec{Filename: "null-co://", Format: "null-co", Options: bdrv.Options{"size": "1M"}},
		func(co *coroutine.Co, n *bdrv.Node) error {
			if n.Length() != 1<<20 {
				return fmt.Errorf("length %d", n.Length())
			}
			buf := bytes.Repeat([]byte{9}, 4096)
			if err := n.Pwritev(co, 0, bdrv.IOVec{buf}, bdrv.ReqFUA); err != nil {
				return err
			}
			if err := n.Preadv(co, 0, bdrv.IOVec{buf}, 0); err != nil || !bdrv.IsZero(buf) {
				return fmt.Errorf("null read: %v", err)
			}
			return nil
		})
}

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true}, {"512", 512, true}, {"1k", 1024, true}, {"1K", 1024, true},
		{"10M", 10 << 20, true}, {"1G", 1 << 30, true}, {"1.5G", 3 << 29, true},
		{"2T", 2 << 40, true}, {"1P", 1 << 50, true}, {"7E", 7 << 60, true}, {"8E", 0, false},
		{"1b", 1, true}, {"1.5", 0, false}, {"-1", 0, false}, {"1Q", 0, false}, {"", 0, false},
		{"abc", 0, false}, {"1..5G", 0, false},
	}
	for _, c := range cases {
		got, err := bdrv.ParseSize(c.in)
		if (err == nil) != c.ok || (c.ok && got != c.want) {
			t.Errorf("ParseSize(%q) = %d, %v; want %d ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}

// sliceSink keeps Slice's results on the heap in the allocation checks, as
// passing them to a driver does.
var sliceSink bdrv.IOVec

// TestIOVecSlice: every range of vectors with and without empty elements;
// ranges of whole elements allocate nothing, and appending to such a
// result leaves the vector alone.
func TestIOVecSlice(t *testing.T) {
	for _, v := range []bdrv.IOVec{
		{[]byte("abc"), []byte("defgh"), []byte("ij")},
		{nil, []byte("abc"), nil, []byte("defgh"), []byte("ij"), nil},
	} {
		for off := int64(0); off <= 10; off++ {
			for n := int64(0); off+n <= 10; n++ {
				s := v.Slice(off, n)
				var flat []byte
				for _, b := range s {
					flat = append(flat, b...)
				}
				if string(flat) != "abcdefghij"[off:off+n] {
					t.Fatalf("%q.Slice(%d,%d) = %q", v, off, n, flat)
				}
			}
		}
	}
	v := bdrv.IOVec{[]byte("abc"), []byte("defgh"), []byte("ij")}
	for _, r := range [][2]int64{{0, 10}, {0, 3}, {3, 5}, {3, 7}} {
		if a := testing.AllocsPerRun(10, func() { sliceSink = v.Slice(r[0], r[1]) }); a != 0 {
			t.Errorf("Slice(%d,%d), whole elements: %v allocations", r[0], r[1], a)
		}
	}
	_ = append(v.Slice(0, 3), []byte("X"))
	if string(v[1]) != "defgh" {
		t.Errorf("appending to a slice of v changed v[1] to %q", v[1])
	}
}

// benchSequential issues b.N requests of 4 KiB through a raw node from 32
// coroutines, walking the image sequentially like qemu-img bench.
func benchSequential(b *testing.B, cache bdrv.CacheMode, write bool) {
	path := filepath.Join(b.TempDir(), "bench.raw")
	// Written data, as qemu-img create -o preallocation=full makes: reads
	// of holes or unwritten extents would not touch any data.
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", path, "256M").CombinedOutput(); err != nil {
		b.Fatalf("qemu-img create: %v %s", err, out)
	}
	const depth, size = 32, 4096
	n := b.N
	err := coroutine.Run(func(co *coroutine.Co) error {
		node, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "raw", Cache: cache})
		if err != nil {
			return err
		}
		defer node.Close(co)
		var next int64
		var done coroutine.Queue
		left := depth
		var firstErr error
		b.ResetTimer()
		for range depth {
			co.Loop().Go(func(c *coroutine.Co) {
				buf := bdrv.AlignedBuffer(size, 4096)
				iov := bdrv.IOVec{buf}
				for {
					i := next
					if i >= int64(n) {
						break
					}
					next++
					off := (i * size) % node.Length()
					var err error
					if write {
						err = node.Pwritev(c, off, iov, 0)
					} else {
						err = node.Preadv(c, off, iov, 0)
					}
					if err != nil && firstErr == nil {
						firstErr = err
					}
				}
				left--
				done.Next(c)
			})
		}
		for left > 0 {
			done.Wait(co, nil)
		}
		b.StopTimer()
		return firstErr
	})
	if err != nil {
		b.Fatal(err)
	}
}

func BenchmarkRead4KWriteback(b *testing.B)  { benchSequential(b, bdrv.CacheWriteback, false) }
func BenchmarkWrite4KWriteback(b *testing.B) { benchSequential(b, bdrv.CacheWriteback, true) }
func BenchmarkRead4KNone(b *testing.B)       { benchSequential(b, bdrv.CacheNone, false) }
func BenchmarkWrite4KNone(b *testing.B)      { benchSequential(b, bdrv.CacheNone, true) }
