package qcow2_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// refcountImages are the images the refcount width tests amend: fresh,
// with data, with snapshots (refcounts above 1), with 512-byte clusters,
// with compressed clusters (host clusters shared, refcounts above 1), and
// one whose refcount table of the widest entries needs several clusters.
var refcountImages = []struct {
	name, opts, size string
	io               []string
	maxRefcount      int // highest refcount in the image
	// qemuWidths are the widths also changed by qemu-img amend for a
	// comparison (all when empty): QEMU visits every entry of a refcount
	// table, 2^28 for 64 KiB clusters, which takes it about a second.
	qemuWidths []uint32
}{
	{"fresh", "", "4M", nil, 1, []uint32{64}},
	{"data", "", "4M", []string{"write -P 1 0 3M", "write -z 3M 64k"}, 1, []uint32{1}},
	{"snapshots", "", "4M", []string{"write -P 1 0 2M", "snapshot", "write -P 2 1M 512k", "snapshot", "write -P 3 0 64k"}, 3, []uint32{2}},
	{"cs512", "cluster_size=512", "1M", []string{"write -P 3 0 300k", "write -P 4 700k 5k"}, 1, nil},
	{"compressed", "", "4M", []string{"write -c -P 5 0 64k", "write -c -P 6 64k 64k", "write -c -P 7 128k 64k", "write -P 8 1M 64k"}, 3, []uint32{8}},
	// 3 MiB of host clusters of 512 bytes: 64-bit refcount blocks cover
	// 32 KiB each, a refcount table cluster 64 of them (2 MiB).
	{"bigtable", "cluster_size=512", "4M", []string{"write -P 9 0 3M"}, 1, nil},
}

// makeRefcountImage creates one of refcountImages in dir.
func makeRefcountImage(t *testing.T, dir string, i int) string {
	t.Helper()
	im := refcountImages[i]
	var args []string
	if im.opts != "" {
		args = []string{"-o", im.opts}
	}
	p := qimg(t, filepath.Join(dir, im.name+".qcow2"), im.size, args...)
	// One qemu-io run per stretch of commands, so that compressed
	// writes share host clusters.
	var cmds []string
	for k, c := range append(im.io, "snapshot") {
		if c != "snapshot" {
			cmds = append(cmds, c)
			continue
		}
		if len(cmds) > 0 {
			qio(t, p, cmds...)
			cmds = nil
		}
		if k < len(im.io) {
			sh(t, "qemu-img", "snapshot", "-c", fmt.Sprintf("s%d", k), p)
		}
	}
	return p
}

func copyFile(t testing.TB, from, to string) string {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	return writeRaw(t, to, b)
}

// refcountBitsOf is the refcount width qemu-img info reports.
func refcountBitsOf(t testing.TB, path string) int {
	t.Helper()
	var info struct {
		FormatSpecific struct {
			Data struct {
				RefcountBits int `json:"refcount-bits"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(sh(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info.FormatSpecific.Data.RefcountBits
}

// TestAmendRefcountBits changes every image of refcountImages from 16 bits
// to every other width. The result must check clean, report the new width
// and read as before (qemu-img convert). For the widths in qemuWidths
// qemu-img amend changes a copy, and the two images must compare
// identical, and are even byte-identical (same allocations as QEMU's);
// the copy qemu-img amended must read the same here. Narrowing below the
// highest refcount is refused before any write, with qemu-img's message.
// After a change the open image takes new allocations (its refcount cache
// and table are the new ones).
func TestAmendRefcountBits(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for i, im := range refcountImages {
		t.Run(im.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			orig := makeRefcountImage(t, dir, i)
			want := rawOf(t, orig)
			origBytes, _ := os.ReadFile(orig)
			widths := []uint32{1, 2, 4, 8, 32, 64}
			if raceEnabled {
				widths = []uint32{1, 8, 64}
			}
			for _, bits := range widths {
				ours := copyFile(t, orig, filepath.Join(dir, fmt.Sprintf("ours%d.qcow2", bits)))
				fits := uint64(1)<<bits-1 >= uint64(im.maxRefcount)
				var amendErr error
				bdrvtest.WithNode(t, bdrv.Spec{Filename: ours}, func(co *coroutine.Co, n *bdrv.Node) error {
					amendErr = imageOf(t, n).AmendWith(co, qcow2.AmendOptions{RefcountBits: bits})
					return nil
				})
				if amendErr != nil || !fits {
					out, qerr := exec_("amend", "-o", fmt.Sprintf("refcount_bits=%d", bits), orig)
					if amendErr == nil || qerr == nil || fits {
						t.Fatalf("%d bits, highest refcount %d: Amend: %v; qemu-img amend: %v %s", bits, im.maxRefcount, amendErr, qerr, out)
					}
					if out != "qemu-img: "+amendErr.Error()+"\n" {
						t.Errorf("%d bits: error %q, qemu-img says %q", bits, amendErr, out)
					}
					if b, _ := os.ReadFile(ours); !bytes.Equal(b, origBytes) {
						t.Errorf("%d bits: refused, but the image changed at %#x", bits, firstDiff(b, origBytes))
					}
					continue
				}
				qcheck(t, ours, false)
				if got := refcountBitsOf(t, ours); got != int(bits) {
					t.Errorf("%d bits: qemu-img info says %d", bits, got)
				}
				if got := rawOf(t, ours); !bytes.Equal(got, want) {
					t.Errorf("%d bits: content differs at %#x", bits, firstDiff(got, want))
				}
				if len(im.qemuWidths) == 0 || slices.Contains(im.qemuWidths, bits) {
					theirs := copyFile(t, orig, filepath.Join(dir, fmt.Sprintf("theirs%d.qcow2", bits)))
					sh(t, "qemu-img", "amend", "-o", fmt.Sprintf("refcount_bits=%d", bits), theirs)
					sh(t, "qemu-img", "compare", ours, theirs)
					a, _ := os.ReadFile(ours)
					b, _ := os.ReadFile(theirs)
					if !bytes.Equal(a, b) {
						t.Errorf("%d bits: image differs from qemu-img's at %#x", bits, firstDiff(a, b))
					}
					bdrvtest.WithNode(t, bdrv.Spec{Filename: theirs, ReadOnly: true}, func(co *coroutine.Co, n *bdrv.Node) error {
						got, err := readChunked(co, n, []int{1 << 20})
						if err == nil && !bytes.Equal(got, want) {
							err = fmt.Errorf("qemu-img's %d-bit image reads differently at %#x", bits, firstDiff(got, want))
						}
						return err
					})
				}
				if bits == 1 || bits == 64 {
					// The amended image keeps working: back to
					// 16 bits and new allocations in one open.
					bdrvtest.WithNode(t, bdrv.Spec{Filename: ours}, func(co *coroutine.Co, n *bdrv.Node) error {
						if err := imageOf(t, n).AmendWith(co, qcow2.AmendOptions{RefcountBits: 16}); err != nil {
							return err
						}
						return n.Pwritev(co, n.Length()-100<<10, bdrv.IOVec{bytes.Repeat([]byte{0xee}, 100<<10)}, 0)
					})
					qcheck(t, ours, false)
					if got := rawOf(t, ours); !bytes.Equal(got[:len(got)-100<<10], want[:len(want)-100<<10]) {
						t.Errorf("%d bits and back: content differs", bits)
					}
				}
			}
		})
	}
}

// TestAmendRefcountCircuit goes once through every ordered pair of refcount
// widths on one image (an Eulerian circuit of the complete graph on the 7
// widths), checking the image and its content after each change.
func TestAmendRefcountCircuit(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	p := makeRefcountImage(t, t.TempDir(), 1)
	want := rawOf(t, p)
	widths := []uint32{1, 2, 4, 8, 16, 32, 64}
	// Hierholzer on the complete directed graph, from 16.
	used := map[[2]int]bool{}
	var circuit []int
	var visit func(v int)
	visit = func(v int) {
		for w := range widths {
			if w != v && !used[[2]int{v, w}] {
				used[[2]int{v, w}] = true
				visit(w)
			}
		}
		circuit = append(circuit, v)
	}
	visit(4)
	if len(circuit) != 43 {
		t.Fatalf("circuit of %d steps", len(circuit))
	}
	// Six changes per open (the driver carries on with its new
	// structures), then qemu-img looks at the image.
	for k := len(circuit) - 2; k >= 0; k -= 6 {
		var b uint32
		bdrvtest.WithNode(t, bdrv.Spec{Filename: p}, func(co *coroutine.Co, n *bdrv.Node) error {
			for j := k; j >= 0 && j > k-6; j-- {
				b = widths[circuit[j]]
				if err := imageOf(t, n).AmendWith(co, qcow2.AmendOptions{RefcountBits: b}); err != nil {
					return fmt.Errorf("to %d bits: %w", b, err)
				}
			}
			return nil
		})
		qcheck(t, p, false)
		if got := refcountBitsOf(t, p); got != int(b) {
			t.Fatalf("to %d bits: qemu-img info says %d", b, got)
		}
	}
	qcheck(t, p, false)
	if got := rawOf(t, p); !bytes.Equal(got, want) {
		t.Fatalf("content differs at %#x after the circuit", firstDiff(got, want))
	}
}

// crashFile is a protocol driver for tests ("crashfile://PATH"): the file
// driver, except that after a budget of writes (and flushes, zero writes,
// discards) every further one is dropped, as if the power failed there, or
// with failOnce the next one fails with EIO and the rest reach the file.
type crashFile struct {
	inner *bdrv.Node
	b     *crashBudget
}

type crashBudget struct {
	left     int // writes still reaching the file; negative: unlimited
	failOnce bool
}

var crashBudgets = struct {
	sync.Mutex
	m map[string]*crashBudget
}{m: map[string]*crashBudget{}}

func init() {
	bdrv.Register(&bdrv.Format{
		Name:     "crashfile",
		Protocol: true,
		Open: func(co *coroutine.Co, n *bdrv.Node, _ bdrv.Options) (bdrv.Driver, error) {
			path := strings.TrimPrefix(n.Filename, "crashfile://")
			crashBudgets.Lock()
			b := crashBudgets.m[path]
			crashBudgets.Unlock()
			if b == nil {
				return nil, errors.New("crashfile: no budget for " + path)
			}
			in, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "file", ReadOnly: n.ReadOnly})
			if err != nil {
				return nil, err
			}
			n.SetLength(in.Length())
			return &crashFile{inner: in, b: b}, nil
		},
	})
}

// spend reports whether the next write reaches the file, and if not, its
// error.
func (f *crashFile) spend() (bool, error) {
	switch {
	case f.b.left == 0 && f.b.failOnce:
		f.b.left = -1
		return false, unix.EIO
	case f.b.left == 0:
		return false, nil
	case f.b.left > 0:
		f.b.left--
	}
	return true, nil
}

func (f *crashFile) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, fl bdrv.ReqFlags) error {
	return f.inner.Preadv(co, off, iov, fl)
}

func (f *crashFile) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, fl bdrv.ReqFlags) error {
	if ok, err := f.spend(); !ok {
		return err
	}
	return f.inner.Pwritev(co, off, iov, fl)
}

func (f *crashFile) PwriteZeroes(co *coroutine.Co, off, n int64, fl bdrv.ReqFlags) error {
	if ok, err := f.spend(); !ok {
		return err
	}
	return f.inner.PwriteZeroes(co, off, n, fl)
}

func (f *crashFile) Pdiscard(co *coroutine.Co, off, n int64) error {
	if ok, err := f.spend(); !ok {
		return err
	}
	return f.inner.Pdiscard(co, off, n)
}

func (f *crashFile) Flush(co *coroutine.Co) error {
	if ok, err := f.spend(); !ok {
		return err
	}
	return f.inner.Flush(co)
}

func (f *crashFile) Close(co *coroutine.Co) error { return f.inner.Close(co) }

// TestAmendRefcountCrash cuts the power after every write of a refcount
// width change (snapshot image, 16 -> 8 and 16 -> 64 bits; 512-byte
// clusters with a multi-cluster new table, 16 -> 64), and for the first
// also fails each write once with EIO (the change fails and cleans up, or
// carries on): what reached the file must check clean apart from leaks,
// read the same, and use either width.
func TestAmendRefcountCrash(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, tc := range []struct {
		img      int
		bits     uint32
		failOnce bool
	}{{2, 8, false}, {2, 8, true}, {2, 64, false}, {5, 64, false}} {
		if raceEnabled && tc.bits == 64 && tc.img == 2 {
			continue
		}
		t.Run(fmt.Sprintf("%s_%d_failonce=%v", refcountImages[tc.img].name, tc.bits, tc.failOnce), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			orig := makeRefcountImage(t, dir, tc.img)
			want := rawOf(t, orig)
			p := filepath.Join(dir, "crash.qcow2")
			// amend runs the change (and the close) with a budget of
			// writes and returns how many it had left.
			amend := func(budget int, failOnce bool) int {
				copyFile(t, orig, p)
				b := &crashBudget{left: -1}
				crashBudgets.Lock()
				crashBudgets.m[p] = b
				crashBudgets.Unlock()
				err := coroutine.Run(func(co *coroutine.Co) error {
					n, err := bdrv.Open(co, bdrv.Spec{Filename: "crashfile://" + p, Format: "qcow2"})
					if err != nil {
						return err
					}
					b.left, b.failOnce = budget, failOnce
					err = imageOf(t, n).AmendWith(co, qcow2.AmendOptions{RefcountBits: tc.bits})
					if cerr := n.Close(co); err == nil {
						err = cerr
					}
					return err
				})
				if b.left > 0 && err != nil {
					t.Fatalf("budget %d not used up: %v", budget, err)
				}
				return b.left
			}
			const unlimited = 1 << 30
			total := unlimited - amend(unlimited, false)
			if refcountBitsOf(t, p) != int(tc.bits) {
				t.Fatalf("no cut: still %d bits", refcountBitsOf(t, p))
			}
			// Every cut point of small changes; about 15 of larger
			// ones, always the last six (header switch, freeing).
			stride := max(1, total/12)
			for budget := 0; budget < total; budget++ {
				if budget%stride != 0 && budget < total-6 {
					continue
				}
				amend(budget, tc.failOnce)
				qcheck(t, p, true)
				if got := rawOf(t, p); !bytes.Equal(got, want) {
					t.Fatalf("cut after %d writes: content differs at %#x", budget, firstDiff(got, want))
				}
				if b := refcountBitsOf(t, p); b != 16 && b != int(tc.bits) {
					t.Fatalf("cut after %d writes: %d refcount bits", budget, b)
				}
			}
			t.Logf("%d writes, cut points checked every %d", total, stride)
		})
	}
}

// TestAmendRefcountHostile: a refcount block listed twice in the refcount
// table is refused as corruption before anything is allocated (the walk
// would otherwise cost the table's size times the block's entries).
func TestAmendRefcountHostile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := qimg(t, filepath.Join(t.TempDir(), "dup.qcow2"), "4M")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	rt := headerOf(t, p).RefcountTableOffset
	copy(b[rt+8:rt+16], b[rt:rt+8])
	writeRaw(t, p, b)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: p}, func(co *coroutine.Co, n *bdrv.Node) error {
		err := imageOf(t, n).AmendWith(co, qcow2.AmendOptions{RefcountBits: 8})
		var ce *qcow2.CorruptError
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), "listed twice") {
			t.Errorf("Amend: %v, want a corruption error", err)
		}
		return nil
	})
	if h := headerOf(t, p); h.RefcountBits() != 16 || !h.Corrupt() {
		t.Errorf("after the refusal: %d refcount bits, corrupt %v", h.RefcountBits(), h.Corrupt())
	}
}
