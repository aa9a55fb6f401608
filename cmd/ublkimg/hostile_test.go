package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	bin "encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"ublkimg/bdrv"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// Hostile images whose cost must stay bounded: peak memory (the largest
// resident set, as /usr/bin/time -v reports it) is compared with
// qemu-img's for the same work.

// peak is one run of a command and its peak resident set.
type peak struct {
	result
	maxRSS int64 // KiB
}

// runPeak runs a command and measures its peak resident set with GNU
// time. The rusage of a child this process starts directly would not do:
// Go starts children with vfork semantics (CLONE_VM), and the kernel
// counts the parent's resident set, the test binary's, into the child's
// peak when it execs.
func runPeak(t *testing.T, name string, args ...string) peak {
	t.Helper()
	const gnuTime = "/usr/bin/time" // scripts/deps.sh installs it
	rss := filepath.Join(t.TempDir(), "maxrss")
	r := runCmd(t, exec.Command(gnuTime, append([]string{"-f", "%M", "-o", rss, name}, args...)...))
	// GNU time writes "Command exited with non-zero status N" first
	// when the command fails; the peak is the last line.
	b, err := os.ReadFile(rss)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(b))
	kib, err := strconv.ParseInt(lines[len(lines)-1], 10, 64)
	if err != nil {
		t.Fatalf("%s: %q", gnuTime, b)
	}
	return peak{r, kib}
}

// declareZstdWindow rewrites, in place, the header of every zstd frame of
// the compressed clusters of the qcow2 image at path (as qemu-img writes
// them: single segment, content size) into a header that declares window
// descriptor wd and no content size: the frame gets 3 bytes shorter, its
// blocks and checksum stay as they are, so every reader decodes the same
// data. A streaming decoder allocates the declared window for such a frame.
func declareZstdWindow(t *testing.T, path string, wd byte) {
	t.Helper()
	f, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ParseHeader(f, int64(len(f)))
	if err != nil {
		t.Fatal(err)
	}
	g := h.Geometry()
	n := 0
	for i := range int(h.L1Size) {
		e, _ := qcow2.TableEntry(f[h.L1TableOffset:], i)
		l2 := e & qcow2.L1OffsetMask
		for j := 0; l2 != 0 && j < int(g.L2Entries()); j++ {
			e, _, err := g.L2EntryAt(f[l2:l2+g.ClusterSize()], j)
			if err != nil || g.ClusterType(e) != qcow2.ClusterCompressed {
				continue
			}
			off, _ := g.CompressedRange(e)
			fr := f[off:]
			if bin.LittleEndian.Uint32(fr) != 0xfd2fb528 || fr[4]&0xfb != 0xa0 {
				t.Fatalf("compressed cluster at %#x: not a single-segment frame with a 4-byte content size: % x", off, fr[:5])
			}
			// The blocks (RFC 8878 3.1.1.2) and checksum follow the
			// 9-byte header.
			end := 9
			for last := false; !last; {
				bh := uint32(fr[end]) | uint32(fr[end+1])<<8 | uint32(fr[end+2])<<16
				last = bh&1 != 0
				end += 3 + int(bh>>3)
				if bh>>1&3 == 1 { // RLE: one byte
					end += 1 - int(bh>>3)
				}
			}
			if fr[4]&0x04 != 0 {
				end += 4
			}
			// Magic, descriptor (no content size, not single segment,
			// checksum flag kept), window descriptor, the rest.
			fr[4] &= 0x04
			fr[5] = wd
			copy(fr[6:], fr[9:end])
			n++
		}
	}
	if n == 0 {
		t.Fatal("no compressed cluster")
	}
	if err := os.WriteFile(path, f, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestZstdWindowMemory: zstd frames that declare windows far larger than
// the cluster (64 MiB, 128 MiB, 1 GiB, 3.75 TiB) decode within the memory
// of a cluster: convert reads them with no more than twice qemu-img's
// peak. qemu-img reads windows up to 128 MiB (libzstd's default limit) and
// refuses larger ones with EIO; ublkimg decodes them too. (Before, each
// decoder allocated the window: 234 MB for this image with 64 MiB windows,
// where qemu-img takes 49 MB, and 128 MiB windows were refused.)
func TestZstdWindowMemory(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	raw := filepath.Join(dir, "data.raw")
	data := qemutest.Text(1, 64<<20)
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "base.qcow2")
	if r := qemuImg(t, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=2M", raw, base); r.code != 0 {
		t.Fatalf("qemu-img convert: %s", r.stderr)
	}
	orig, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	var qemuPeak int64
	for _, tc := range []struct {
		name      string
		wd        byte
		qemuReads bool
	}{
		{"64M", 16 << 3, true},
		{"128M", 17 << 3, true},
		{"1G", 20 << 3, false},
		{"3.75T", 0xff, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(dir, tc.name+".qcow2")
			if err := os.WriteFile(img, orig, 0o644); err != nil {
				t.Fatal(err)
			}
			declareZstdWindow(t, img, tc.wd)
			out := filepath.Join(dir, "out.raw")
			ours := runPeak(t, binary, "convert", "-O", "raw", img, out)
			if ours.code != 0 {
				t.Fatalf("ublkimg convert: %s", ours.stderr)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
				t.Fatal("ublkimg convert: wrong data")
			}
			theirs := runPeak(t, "qemu-img", "convert", "-O", "raw", img, out)
			if (theirs.code == 0) != tc.qemuReads {
				t.Fatalf("qemu-img convert: exit %d, %s", theirs.code, theirs.stderr)
			}
			if tc.qemuReads {
				if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
					t.Fatal("qemu-img convert: wrong data")
				}
				qemuPeak = max(qemuPeak, theirs.maxRSS)
			}
			os.Remove(img)
			t.Logf("convert, 64 MiB in 2 MiB zstd clusters declaring a %s window: peak RSS ublkimg %d KiB, qemu-img %d KiB (exit %d)",
				tc.name, ours.maxRSS, theirs.maxRSS, theirs.code)
			if qemuPeak == 0 {
				t.Fatal("no qemu-img peak to compare with")
			}
			if ours.maxRSS > 2*qemuPeak {
				t.Errorf("ublkimg's peak %d KiB is more than twice qemu-img's %d KiB", ours.maxRSS, qemuPeak)
			}
		})
	}
}

// bitmapTables returns the bitmaps of the qcow2 image f (its bytes up to
// the end of its metadata at least) and their tables.
func bitmapTables(t *testing.T, f *os.File) (*qcow2.Header, []qcow2.Bitmap, [][]uint64) {
	t.Helper()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 1<<20)
	n, _ := f.ReadAt(head, 0)
	h, err := qcow2.ParseHeader(head[:n], st.Size())
	if err != nil {
		t.Fatal(err)
	}
	if h.Bitmaps == nil {
		return h, nil, nil
	}
	ext := *h.Bitmaps
	dir := make([]byte, ext.DirectorySize)
	if _, err := f.ReadAt(dir, int64(ext.DirectoryOffset)); err != nil {
		t.Fatal(err)
	}
	bms, err := qcow2.ParseBitmapDirectory(dir, ext, h.ClusterBits, h.Size)
	if err != nil {
		t.Fatal(err)
	}
	tables := make([][]uint64, len(bms))
	for i, b := range bms {
		raw := make([]byte, 8*int(b.TableSize))
		if _, err := f.ReadAt(raw, int64(b.TableOffset)); err != nil {
			t.Fatal(err)
		}
		for j := range int(b.TableSize) {
			tables[i] = append(tables[i], bin.BigEndian.Uint64(raw[8*j:]))
		}
	}
	return h, bms, tables
}

// fillBitmaps rewrites the data of every bitmap of the image at path in
// place: "ones" makes every table entry "all ones" (no data cluster),
// "random" fills every data cluster with random bytes (the clusters stay
// where they are, so the image stays consistent).
func fillBitmaps(t *testing.T, path, fill string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, bms, tables := bitmapTables(t, f)
	cs := h.ClusterSize()
	data := make([]byte, cs)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	for i, b := range bms {
		for j, e := range tables[i] {
			var err error
			switch off := e & qcow2.L2OffsetMask; {
			case fill == "ones":
				_, err = f.WriteAt(bin.BigEndian.AppendUint64(nil, 1), int64(b.TableOffset)+8*int64(j))
			case off == 0:
				t.Fatalf("bitmap %s: table entry %d has no data cluster to fill", b.Name, j)
			default:
				_, err = f.WriteAt(data, int64(off))
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
}

// bitmapDigest describes an image's bitmaps: name, flags, granularity and a
// digest of the data (whatever clusters hold it), for comparing the images
// two tools made.
func bitmapDigest(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, bms, tables := bitmapTables(t, f)
	cs := h.ClusterSize()
	var out strings.Builder
	buf := make([]byte, cs)
	ones, zeros := bytes.Repeat([]byte{0xff}, int(cs)), make([]byte, cs)
	for i, b := range bms {
		// Clusters of set or clear bits count as such, stored or not
		// (hashing gigabytes of them would be slow).
		d := sha256.New()
		for _, e := range tables[i] {
			switch off := e & qcow2.L2OffsetMask; {
			case off != 0:
				if _, err := f.ReadAt(buf, int64(off)); err != nil {
					t.Fatal(err)
				}
				switch {
				case bytes.Equal(buf, ones):
					d.Write([]byte("ones"))
				case bytes.Equal(buf, zeros):
					d.Write([]byte("zeros"))
				default:
					d.Write(buf)
				}
			case e&1 != 0:
				d.Write([]byte("ones"))
			default:
				d.Write([]byte("zeros"))
			}
		}
		fmt.Fprintf(&out, "%s flags %#x granularity %d table %d: %x\n", b.Name, b.Flags, b.Granularity(), b.TableSize, d.Sum(nil))
	}
	return out.String()
}

// TestBitmapResizeMemory resizes images with big bitmaps (512-byte
// granularity over 512 GiB or 2 TiB) with ublkimg and qemu-img: same
// result (exit status, output, bitmaps), and a peak memory that counts
// each bitmap at most once, as QEMU does: random bitmap data costs its
// size (before, a resize copied every bitmap: 540 MB for 256 MiB of
// bitmap where qemu-img took 275 MB), and "all ones" bitmaps, enabled or
// not, cost nothing (two disabled 512 MiB ones on a 2 TiB image: 1.6-2.1
// GB before, qemu-img 1.07 GB). Growing past 512 MiB of bitmap data loses
// the bitmaps, as in QEMU: they are left in use.
func TestBitmapResizeMemory(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, tc := range []struct {
		name    string
		size    string
		bitmaps int
		fill    string
		// maxRatio bounds ublkimg's peak over qemu-img's.
		maxRatio float64
	}{
		{"random 128 MiB", "512G", 1, "random", 1.25},
		{"all ones 2x128 MiB", "512G", 2, "ones", 0.25},
		{"all ones 2x512 MiB, lost", "2T", 2, "ones", 0.25},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			if r := ublkimg(t, "create", "-q", "-f", "qcow2", img, tc.size); r.code != 0 {
				t.Fatal(r.stderr)
			}
			// Random data needs clusters to fill: an enabled bitmap
			// that qemu-io marks.
			add := []string{"bitmap", "--add", "-g", "512", "--disable", img}
			if tc.fill == "random" {
				add = slices.Delete(add, 4, 5)
			}
			for i := range tc.bitmaps {
				if r := ublkimg(t, append(add, fmt.Sprintf("b%d", i))...); r.code != 0 {
					t.Fatal(r.stderr)
				}
			}
			if tc.fill == "random" {
				// One discard per 128 MiB marks a bit in every
				// cluster of bitmap data, so that qemu-img
				// stores them all.
				size, err := bdrv.ParseSize(tc.size)
				if err != nil {
					t.Fatal(err)
				}
				var cmds strings.Builder
				for off := int64(0); off < size; off += 128 << 20 {
					fmt.Fprintf(&cmds, "discard %d 512\n", off)
				}
				qio := exec.Command("qemu-io", "-f", "qcow2", img)
				qio.Stdin = strings.NewReader(cmds.String())
				if out, err := qio.CombinedOutput(); err != nil {
					t.Fatalf("qemu-io: %v\n%.500s", err, out)
				}
			}
			fillBitmaps(t, img, tc.fill)
			ours, theirs := filepath.Join(dir, "ours.qcow2"), filepath.Join(dir, "theirs.qcow2")
			for _, p := range []string{ours, theirs} {
				if out, err := exec.Command("cp", "--sparse=always", img, p).CombinedOutput(); err != nil {
					t.Fatalf("cp: %v %s", err, out)
				}
			}
			os.Remove(img)
			got := runPeak(t, binary, "resize", ours, "+1G")
			want := runPeak(t, "qemu-img", "resize", theirs, "+1G")
			t.Logf("resize +1G, %d bitmaps %s over %s: peak RSS ublkimg %d KiB, qemu-img %d KiB",
				tc.bitmaps, tc.fill, tc.size, got.maxRSS, want.maxRSS)
			if got.code != want.code || got.stdout != want.stdout {
				t.Errorf("ublkimg exit %d, stdout %q; qemu-img exit %d, stdout %q", got.code, got.stdout, want.code, want.stdout)
			}
			if g, w := normBitmapStderr(t, got.result, "ublkimg"), normBitmapStderr(t, want.result, "qemu-img"); g != w {
				t.Errorf("stderr:\n%s\nqemu-img's:\n%s", g, w)
			}
			if r := qemuImg(t, "check", ours); r.code != 0 {
				t.Errorf("qemu-img check: %s", r.stdout)
			}
			if g, w := bitmapDigest(t, ours), bitmapDigest(t, theirs); g != w {
				t.Errorf("bitmaps:\n%s\nqemu-img's:\n%s", g, w)
			}
			if float64(got.maxRSS) > tc.maxRatio*float64(want.maxRSS) {
				t.Errorf("ublkimg's peak %d KiB is more than %.2f times qemu-img's %d KiB", got.maxRSS, tc.maxRatio, want.maxRSS)
			}
		})
	}
}

// runTimeout runs a command in dir and fails the test if it does not end
// within a minute (it hangs).
func runTimeout(t *testing.T, dir, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	r := runCmd(t, cmd)
	if ctx.Err() != nil {
		t.Fatalf("%s %v hangs", name, args)
	}
	return r
}

// TestMetadataOnlyOpens: info, and create's look at its backing file,
// never open the external data file an image names (QEMU's fix for
// CVE-2024-4467), so that they are safe on untrusted images: a FIFO
// (whose open would hang), a character device, a symlink to a secret, a
// missing file. They print what qemu-img prints. The verbs that do open
// the data file refuse anything but a regular file or a block device,
// without hanging. An encrypted backing file needs no key for create.
func TestMetadataOnlyOpens(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(dir, "secret")
	if err := os.Symlink(fifo, secret); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, data string }{
		{"fifo", fifo},
		{"symlink", secret},
		{"char device", "/dev/zero"},
		{"missing", filepath.Join(dir, "missing")},
		{"shadow", "/etc/shadow"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".qcow2")
			// Made with a regular data file, then pointed at
			// tc.data (qemu-img create would open it).
			raw := filepath.Join(dir, "data.raw")
			if r := qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+raw, img, "1M"); r.code != 0 {
				t.Fatal(r.stderr)
			}
			if r := qemuImg(t, "amend", "-f", "qcow2", "-o", "data_file="+tc.data, img); r.code != 0 {
				t.Fatal(r.stderr)
			}
			for _, args := range [][]string{
				{"info", img},
				{"info", "--output=json", img},
				{"info", "--backing-chain", img},
				{"create", "-f", "qcow2", "-b", img, "-F", "qcow2", filepath.Join(dir, "top.qcow2")},
			} {
				got := runTimeout(t, dir, binary, args...)
				want := runTimeout(t, dir, "qemu-img", args...)
				if got.code != want.code || got.stdout != want.stdout {
					t.Errorf("%v: ublkimg exit %d\n%s%s\nqemu-img exit %d\n%s%s", args, got.code, got.stdout, got.stderr,
						want.code, want.stdout, want.stderr)
				}
			}
			if tc.name == "missing" || tc.name == "shadow" {
				return
			}
			// qemu-img hangs on these opening the FIFO; ublkimg
			// refuses what is not a regular file or block device.
			for _, args := range [][]string{{"map", img}, {"snapshot", "-l", img}, {"convert", "-O", "raw", img, filepath.Join(dir, "out.raw")}} {
				r := runTimeout(t, dir, binary, args...)
				if msg := oneErrorLine(t, r); !strings.Contains(msg, "to be a regular file or a block device") {
					t.Errorf("%v: %s", args, msg)
				}
			}
		})
	}
	// An encrypted backing file, opened by create for its size: no key
	// is needed (qemu-img opens it for metadata only too).
	enc := filepath.Join(dir, "enc.qcow2")
	r := result{code: -1}
	qemutest.RetryPBKDF2Timing(func() string {
		r = qemuImg(t, "create", "-q", "--object", "secret,id=s,data=abc", "-f", "qcow2",
			"-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", enc, "1M")
		return r.stderr
	})
	if r.code != 0 {
		t.Fatal(r.stderr)
	}
	for _, tool := range []string{binary, "qemu-img"} {
		top := filepath.Join(dir, "enc-top.qcow2")
		if r := runTimeout(t, dir, tool, "create", "-q", "-f", "qcow2", "-b", enc, "-F", "qcow2", top); r.code != 0 {
			t.Errorf("%s create over an encrypted backing file: %s", tool, r.stderr)
		}
		os.Remove(top)
	}
}
