package qcow2_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// storedBitmap is a bitmap as stored in an image, for comparing what
// ublkimg wrote with what QEMU wrote: everything but where it lies.
type storedBitmap struct {
	Flags           uint32
	GranularityBits uint8
	TableSize       uint32
	// Data is the bitmap's bytes, table entry by table entry (clean
	// entries as zeros, "all ones" entries as 0xff).
	Data []byte
	// Allocated says which table entries point at a cluster.
	Allocated string
}

// readStoredBitmaps parses the bitmaps of the image file at path with the
// package's own parser; autoclear says whether the autoclear bit is set
// (no bitmaps are returned when it is clear).
func readStoredBitmaps(t testing.TB, path string) (bms map[string]storedBitmap, names []string, autoclear bool) {
	t.Helper()
	f, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ParseHeader(f, int64(len(f)))
	if err != nil {
		t.Fatal(err)
	}
	autoclear = h.AutoclearFeatures&qcow2.AutoclearBitmaps != 0
	if h.Bitmaps == nil {
		return nil, nil, autoclear
	}
	ext := *h.Bitmaps
	entries, err := qcow2.ParseBitmapDirectory(f[ext.DirectoryOffset:], ext, h.ClusterBits, h.Size)
	if err != nil {
		t.Fatal(err)
	}
	cs := h.ClusterSize()
	bms = map[string]storedBitmap{}
	for _, e := range entries {
		sb := storedBitmap{Flags: e.Flags, GranularityBits: e.GranularityBits, TableSize: e.TableSize}
		var alloc strings.Builder
		for i := uint64(0); i < uint64(e.TableSize); i++ {
			te := binary.BigEndian.Uint64(f[e.TableOffset+8*i:])
			off := te & qcow2.L2OffsetMask
			switch {
			case off != 0:
				sb.Data = append(sb.Data, f[off:off+cs]...)
				alloc.WriteByte('A')
			case te&1 != 0:
				sb.Data = append(sb.Data, bytes.Repeat([]byte{0xff}, int(cs))...)
				alloc.WriteByte('1')
			default:
				sb.Data = append(sb.Data, make([]byte, cs)...)
				alloc.WriteByte('.')
			}
		}
		sb.Allocated = alloc.String()
		bms[e.Name] = sb
		names = append(names, e.Name)
	}
	return bms, names, autoclear
}

// bitmapOp is one request, written as the qemu-io command that does the
// same: "write OFF LEN", "zero OFF LEN", "discard OFF LEN" or "truncate
// SIZE".
type bitmapOp string

func (op bitmapOp) qemuIO() string {
	f := strings.Fields(string(op))
	switch f[0] {
	case "write":
		return "write -P 0x5a " + f[1] + " " + f[2]
	case "zero":
		return "write -z " + f[1] + " " + f[2]
	}
	return string(op)
}

func (op bitmapOp) run(co *coroutine.Co, n *bdrv.Node) error {
	f := strings.Fields(string(op))
	num := func(i int) int64 {
		v, err := strconv.ParseInt(f[i], 0, 64)
		if err != nil {
			panic(err)
		}
		return v
	}
	switch f[0] {
	case "write":
		buf := bytes.Repeat([]byte{0x5a}, int(num(2)))
		return n.Pwritev(co, num(1), bdrv.IOVec{buf}, 0)
	case "zero":
		return n.PwriteZeroes(co, num(1), num(2), 0)
	case "discard":
		return n.Pdiscard(co, num(1), num(2))
	case "truncate":
		return n.Truncate(co, num(1), false, bdrv.PreallocOff)
	}
	return fmt.Errorf("unknown op %q", op)
}

// TestBitmapTracking writes with ublkimg and with qemu-io to copies of the
// same image with persistent bitmaps, and compares the stored bitmaps
// (flags, granularity, table size, data, which entries are allocated), the
// guest content and qemu-img check.
func TestBitmapTracking(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	cases := []struct {
		name, size, opts string
		// setup runs on the base image: qemu-img bitmap arguments
		// ("--add -g 4k b") or qemu-io commands ("io: write 0 64k").
		setup []string
		ops   []bitmapOp
		leaks bool // the setup leaves leaked clusters
	}{
		{name: "writes", size: "4M", setup: []string{"--add b64k", "--add -g 512 b512", "--add -g 1M --disable off"},
			ops: []bitmapOp{"write 0 4096", "write 70000 100", "write 1048576 131072", "write 4193792 512"}},
		{name: "zero-discard", size: "4M", opts: "cluster_size=4096",
			setup: []string{"io: write -P 1 0 1M", "--add -g 8k b", "--add -g 512 fine"},
			ops:   []bitmapOp{"zero 4096 8192", "zero 100000 1000", "discard 65536 65536", "discard 300000 100", "write 2097152 1"}},
		{name: "cow-backing-free", size: "2M", opts: "cluster_size=65536,extended_l2=on",
			setup: []string{"io: write -P 7 0 2M", "--add -g 2k b"},
			ops:   []bitmapOp{"write 4096 2048", "zero 131072 4096"}},
		{name: "preloaded", size: "8M", setup: []string{"--add -g 4k b", "io: write 0 12k", "io: write 5M 1"},
			ops: []bitmapOp{"write 6291456 65536"}},
		{name: "nothing-written", size: "1M", setup: []string{"--add b"}},
		{name: "in-use-at-open", size: "1M", setup: []string{"--add -g 4k b", "--add --disable d", "crash: write 0 4k", "--add c"},
			ops: []bitmapOp{"write 8192 4096"}},
		{name: "ignored", size: "1M", setup: []string{"--add -g 4k b", "ignore"},
			ops: []bitmapOp{"write 8192 4096"}, leaks: true},
		{name: "grow", size: "1M", setup: []string{"--add -g 512 b", "--add --disable d", "io: write 0 4k"},
			ops: []bitmapOp{"truncate 3145728", "write 2097152 4096"}},
		{name: "shrink", size: "3M", setup: []string{"--add -g 16k b", "io: write 2M 64k", "io: write 0 512"},
			ops: []bitmapOp{"truncate 1048576", "write 65536 4096"}},
		{name: "many-clusters", size: "64M", opts: "cluster_size=512",
			setup: []string{"--add -g 512 b", "io: write 40M 512"},
			ops:   []bitmapOp{"write 0 512", "write 33554432 1024", "zero 60000000 70000"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			var co []string
			if tc.opts != "" {
				co = []string{"-o", tc.opts}
			}
			qimg(t, base, tc.size, co...)
			for _, s := range tc.setup {
				if cmd, ok := strings.CutPrefix(s, "io: "); ok {
					qio(t, base, cmd)
				} else if cmd, ok := strings.CutPrefix(s, "crash: "); ok {
					// qemu-io aborts with the bitmaps in use.
					exec.Command("qemu-io", "-c", cmd, "-c", "abort", base).Run() //nolint:errcheck // it aborts
				} else if s == "ignore" {
					// A program without bitmap support wrote:
					// the autoclear bit is clear.
					f, err := os.ReadFile(base)
					if err != nil {
						t.Fatal(err)
					}
					binary.BigEndian.PutUint64(f[88:], binary.BigEndian.Uint64(f[88:])&^qcow2.AutoclearBitmaps)
					if err := os.WriteFile(base, f, 0o644); err != nil {
						t.Fatal(err)
					}
				} else {
					f := strings.Fields(s)
					args := append(append([]string{"bitmap"}, f[:len(f)-1]...), base, f[len(f)-1])
					sh(t, "qemu-img", args...)
				}
			}
			ours, theirs := filepath.Join(dir, "ours.qcow2"), filepath.Join(dir, "theirs.qcow2")
			sh(t, "cp", base, ours)
			sh(t, "cp", base, theirs)
			if len(tc.ops) > 0 {
				var cmds []string
				for _, op := range tc.ops {
					cmds = append(cmds, op.qemuIO())
				}
				qio(t, theirs, cmds...)
			}
			before, _, _ := readStoredBitmaps(t, base)
			bdrvtest.WithNode(t, bdrv.Spec{Filename: ours, Format: "qcow2"}, func(co *coroutine.Co, n *bdrv.Node) error {
				// Before the first write, enabled bitmaps are
				// marked in use on disk, with the autoclear bit set.
				bms, _, ac := readStoredBitmaps(t, ours)
				for name, b := range bms {
					want := b.Flags&qcow2.BitmapFlagAuto != 0 || before[name].Flags&qcow2.BitmapFlagInUse != 0
					if (b.Flags&qcow2.BitmapFlagInUse != 0) != want || !ac {
						t.Errorf("open: bitmap %s flags %#x, autoclear %v", name, b.Flags, ac)
					}
				}
				for _, op := range tc.ops {
					if err := op.run(co, n); err != nil {
						return fmt.Errorf("%s: %w", op, err)
					}
				}
				// A crash now (the image as flushed, never closed)
				// leaves a consistent image whose enabled bitmaps QEMU
				// calls in use.
				if err := n.Flush(co); err != nil {
					return err
				}
				crashed := filepath.Join(dir, "crashed.qcow2")
				sh(t, "cp", ours, crashed)
				qcheck(t, crashed, true)
				bms, _, _ = readStoredBitmaps(t, crashed)
				for name, b := range bms {
					if b.Flags&qcow2.BitmapFlagAuto != 0 && b.Flags&qcow2.BitmapFlagInUse == 0 {
						t.Errorf("crash: enabled bitmap %s not in use", name)
					}
				}
				return nil
			})
			qcheck(t, ours, tc.leaks)
			if out, err := exec_("compare", "-U", ours, theirs); err != nil {
				t.Fatalf("qemu-img compare: %v\n%s", err, out)
			}
			got, gotNames, gotAC := readStoredBitmaps(t, ours)
			want, wantNames, wantAC := readStoredBitmaps(t, theirs)
			if gotAC != wantAC || len(got) != len(want) {
				t.Fatalf("autoclear %v, %d bitmaps; qemu-io: %v, %d", gotAC, len(got), wantAC, len(want))
			}
			for _, name := range wantNames {
				g, w := got[name], want[name]
				if g.Flags != w.Flags || g.GranularityBits != w.GranularityBits || g.TableSize != w.TableSize || g.Allocated != w.Allocated {
					t.Errorf("bitmap %s: flags %#x gran %d table %d %s; qemu-io: %#x %d %d %s", name,
						g.Flags, g.GranularityBits, g.TableSize, g.Allocated, w.Flags, w.GranularityBits, w.TableSize, w.Allocated)
				}
				if i := firstDiff(g.Data, w.Data); i >= 0 {
					t.Errorf("bitmap %s: data differs from byte %d: %x, qemu-io %x", name, i,
						g.Data[i:min(i+8, len(g.Data))], w.Data[i:min(i+8, len(w.Data))])
				}
			}
			if fmt.Sprint(gotNames) != fmt.Sprint(wantNames) {
				t.Errorf("directory order %v, qemu-io %v", gotNames, wantNames)
			}
		})
	}
}

// TestBitmapConcurrentWrites marks one bitmap from several loops at once
// (small unaligned writes, so neighbouring requests share bitmap words) and
// checks that every granule written, and only those, is set.
func TestBitmapConcurrentWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	p := qimg(t, filepath.Join(dir, "img.qcow2"), "8M")
	sh(t, "qemu-img", "bitmap", "--add", "-g", "512", p, "b")
	const loops, perLoop, step, size = 3, 4, 1536, 700
	var node *bdrv.Node
	if err := coroutine.Run(func(co *coroutine.Co) error {
		var err error
		node, err = bdrv.Open(co, bdrv.Spec{Filename: p, Format: "qcow2"})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// Request k writes [k*step, k*step+size) for k below n: granules
	// 3k and 3k+1 set, 3k+2 clear.
	n := int64(8<<20)/step - 1
	buf := bytes.Repeat([]byte{1}, size)
	onLoops(t, loops, perLoop, func(co *coroutine.Co, worker int) error {
		for k := int64(worker); k < n; k += loops * perLoop {
			if err := node.Pwritev(co, k*step, bdrv.IOVec{buf}, 0); err != nil {
				return err
			}
		}
		return nil
	})
	if err := coroutine.Run(func(co *coroutine.Co) error { return node.Close(co) }); err != nil {
		t.Fatal(err)
	}
	qcheck(t, p, false)
	bms, _, _ := readStoredBitmaps(t, p)
	data := bms["b"].Data
	for g := int64(0); g < 8<<20/512; g++ {
		set := data[g/8]&(1<<(g%8)) != 0
		if want := g%3 != 2 && g/3 < n; set != want {
			t.Fatalf("granule %d: set %v, want %v", g, set, want)
		}
	}
}

// BenchmarkRewriteBitmaps is BenchmarkRewrite with two enabled bitmaps
// (64 KiB and 512-byte granularity) marked by every write.
func BenchmarkRewriteBitmaps(b *testing.B) {
	p := benchImage(b, "", true)
	sh(b, "qemu-img", "bitmap", "--add", p, "coarse")
	sh(b, "qemu-img", "bitmap", "--add", "-g", "512", p, "fine")
	withBenchNode(b, p, func(co *coroutine.Co, n *bdrv.Node) {
		runDepth(b, n, co, func(co *coroutine.Co, i int, buf []byte) error {
			return n.Pwritev(co, int64(i*benchReq)%benchSize, bdrv.IOVec{buf}, 0)
		})
	})
}

// onLoops runs fn as perLoop coroutines on each of loops new loops at once
// (workers 0 to loops*perLoop-1) and fails the test on the first error.
func onLoops(t *testing.T, loops, perLoop int, fn func(co *coroutine.Co, worker int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, loops*perLoop)
	var lps []*coroutine.Loop
	for l := range loops {
		lp, err := coroutine.Start(coroutine.Config{})
		if err != nil {
			t.Fatal(err)
		}
		lps = append(lps, lp)
		for w := range perLoop {
			worker := l*perLoop + w
			wg.Add(1)
			lp.Spawn(func(co *coroutine.Co) {
				defer wg.Done()
				if err := fn(co, worker); err != nil {
					errs <- err
				}
			})
		}
	}
	wg.Wait()
	for _, lp := range lps {
		lp.Close()
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestBitmapHostile: images whose bitmaps a read-write open must refuse,
// leaving the file as it was: a bitmap table entry pointing at an L2 table
// (storing the bitmap would free the L2 table's cluster) and extra data in
// the directory (QEMU refuses it too).
func TestBitmapHostile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	cases := []struct {
		name, want string
		edit       func(f []byte, h *qcow2.Header, bms []qcow2.Bitmap) []byte
	}{
		{"table-points-at-L2", "overlaps the active L2 table", func(f []byte, h *qcow2.Header, bms []qcow2.Bitmap) []byte {
			l2 := binary.BigEndian.Uint64(f[h.L1TableOffset:]) & qcow2.L2OffsetMask
			binary.BigEndian.PutUint64(f[bms[0].TableOffset:], l2)
			return f
		}},
		{"extra-data", "Bitmap extra data is not supported", func(f []byte, h *qcow2.Header, bms []qcow2.Bitmap) []byte {
			bms[0].ExtraData = []byte{1, 2, 3}
			bms[0].Flags |= qcow2.BitmapFlagExtraDataCompatible
			dir := qcow2.MarshalBitmapDirectory(bms)
			// The bigger directory goes to a new cluster at the end;
			// the extension's size and offset follow.
			cs := h.ClusterSize()
			off := (uint64(len(f)) + cs - 1) / cs * cs
			f = append(f, make([]byte, off+cs-uint64(len(f)))...)
			copy(f[off:], dir)
			ext := bytes.Index(f[:h.ClusterSize()], binary.BigEndian.AppendUint32(nil, qcow2.ExtBitmaps))
			binary.BigEndian.PutUint64(f[ext+16:], uint64(len(dir)))
			binary.BigEndian.PutUint64(f[ext+24:], off)
			return f
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := qimg(t, filepath.Join(t.TempDir(), "img.qcow2"), "1M")
			sh(t, "qemu-img", "bitmap", "--add", p, "b")
			qio(t, p, "write 0 4k")
			f, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			h, err := qcow2.ParseHeader(f, int64(len(f)))
			if err != nil {
				t.Fatal(err)
			}
			bms, err := qcow2.ParseBitmapDirectory(f[h.Bitmaps.DirectoryOffset:], *h.Bitmaps, h.ClusterBits, h.Size)
			if err != nil {
				t.Fatal(err)
			}
			f = tc.edit(f, h, bms)
			if err := os.WriteFile(p, f, 0o644); err != nil {
				t.Fatal(err)
			}
			err = bdrvtest.OpenError(bdrv.Spec{Filename: p, Format: "qcow2"})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("open: %v, want %q", err, tc.want)
			}
			if g, err := os.ReadFile(p); err != nil || !bytes.Equal(g, f) {
				t.Errorf("image changed by the failed open (%v)", err)
			}
		})
	}
}

// rangesOnly hides the concrete type of a bitmap's data, as the data of
// another format would come: MergeBitmap then merges by dirty ranges.
type rangesOnly struct{ bdrv.BitmapData }

// dirtyRanges lists a bitmap's dirty ranges as "start+length" strings.
func dirtyRanges(d bdrv.BitmapData) []string {
	var out []string
	for off := uint64(0); ; {
		start, n := d.NextDirty(off)
		if n == 0 {
			return out
		}
		out = append(out, fmt.Sprintf("%d+%d", start, n))
		off = start + n
	}
}

// TestBitmapMergeAnyFormat merges a bitmap into bitmaps of other
// granularities through bdrv.PersistentBitmaps, once as this driver's data
// (word by word) and once as opaque bdrv.BitmapData (by dirty ranges, as a
// bitmap of another format merges): both give the writes' ranges rounded
// out to the target's granules.
func TestBitmapMergeAnyFormat(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	path := qimg(t, filepath.Join(t.TempDir(), "m.qcow2"), "4M")
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "qcow2"}, func(co *coroutine.Co, n *bdrv.Node) error {
		pb, ok := n.Driver().(bdrv.PersistentBitmaps)
		if !ok || !pb.SupportsBitmaps() {
			return fmt.Errorf("%T has no persistent bitmaps", n.Driver())
		}
		if err := pb.AddBitmap(co, "src", 512, false); err != nil {
			return err
		}
		writes := [][2]int64{{0, 512}, {70000, 100}, {1 << 20, 3 << 16}, {4<<20 - 512, 512}}
		for _, w := range writes {
			if err := n.Pwritev(co, w[0], bdrv.IOVec{make([]byte, w[1])}, 0); err != nil {
				return err
			}
		}
		for _, g := range []uint64{512, 4096, 1 << 16} {
			var want []string
			for _, w := range writes {
				start := uint64(w[0]) / g * g
				end := (uint64(w[0]+w[1]) + g - 1) / g * g
				want = append(want, fmt.Sprintf("%d+%d", start, end-start))
			}
			if g == 1<<16 {
				// 0+512 and 70000+100 fall in neighbouring granules.
				want = append([]string{"0+131072"}, want[2:]...)
			}
			for _, how := range []string{"native", "ranges"} {
				name := fmt.Sprintf("%s-%d", how, g)
				if err := pb.AddBitmap(co, name, g, true); err != nil {
					return err
				}
				src, err := pb.ExportBitmap(co, "src")
				if err != nil {
					return err
				}
				if how == "ranges" {
					src = rangesOnly{src}
				}
				if err := pb.MergeBitmap(co, name, src); err != nil {
					return err
				}
				got, err := pb.ExportBitmap(co, name)
				if err != nil {
					return err
				}
				if r := dirtyRanges(got); !slices.Equal(r, want) {
					t.Errorf("%s: dirty %v, want %v", name, r, want)
				}
			}
		}
		return nil
	})
}

// TestTakeBitmap takes a bitmap's content as a backup does: the copy holds
// the writes before the take and no later one, the bitmap those after it;
// merging the copy back (a failed backup) gives the union, which is what
// the image stores at close. A bitmap that is not there is QEMU's error.
func TestTakeBitmap(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	path := qimg(t, filepath.Join(t.TempDir(), "t.qcow2"), "4M")
	write := func(co *coroutine.Co, n *bdrv.Node, off, length int64) error {
		return n.Pwritev(co, off, bdrv.IOVec{make([]byte, length)}, 0)
	}
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "qcow2"}, func(co *coroutine.Co, n *bdrv.Node) error {
		pb := n.Driver().(bdrv.PersistentBitmaps)
		if _, err := pb.TakeBitmap(co, "b"); err == nil || err.Error() != "Dirty bitmap 'b' not found" {
			return fmt.Errorf("taking a missing bitmap: %v", err)
		}
		if err := pb.AddBitmap(co, "b", 4096, false); err != nil {
			return err
		}
		if err := write(co, n, 0, 4096); err != nil {
			return err
		}
		if err := write(co, n, 2<<20, 1<<20); err != nil {
			return err
		}
		taken, err := pb.TakeBitmap(co, "b")
		if err != nil {
			return err
		}
		if err := write(co, n, 8192, 4096); err != nil {
			return err
		}
		if r, want := dirtyRanges(taken), []string{"0+4096", "2097152+1048576"}; !slices.Equal(r, want) {
			t.Errorf("taken: dirty %v, want %v", r, want)
		}
		now, err := pb.ExportBitmap(co, "b")
		if err != nil {
			return err
		}
		if r, want := dirtyRanges(now), []string{"8192+4096"}; !slices.Equal(r, want) {
			t.Errorf("after the take: dirty %v, want %v", r, want)
		}
		if err := pb.MergeBitmap(co, "b", taken); err != nil {
			return err
		}
		if r, want := dirtyRanges(now), []string{"0+4096", "8192+4096", "2097152+1048576"}; !slices.Equal(r, want) {
			t.Errorf("merged back: dirty %v, want %v", r, want)
		}
		return nil
	})
	qcheck(t, path, false)
	bms, _, _ := readStoredBitmaps(t, path)
	data := bms["b"].Data
	for g := range 4 << 20 / 4096 {
		set := data[g/8]&(1<<(g%8)) != 0
		if want := g == 0 || g == 2 || g >= 512 && g < 768; set != want {
			t.Fatalf("stored granule %d: set %v, want %v", g, set, want)
		}
	}
}
