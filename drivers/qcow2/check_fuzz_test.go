package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/fuzzlimit"
	"ublkimg/internal/qemutest"
)

// TestCheckExitCode checks qemu-img check's exit statuses and the wording of
// a failed check.
func TestCheckExitCode(t *testing.T) {
	for _, c := range []struct {
		r    CheckResult
		code int
	}{
		{CheckResult{}, 0}, {CheckResult{Leaks: 1}, 3}, {CheckResult{Leaks: 1, Corruptions: 1}, 2},
		{CheckResult{CheckErrors: 1}, 1}, {CheckResult{Corruptions: 2, Leaks: 3, CheckErrors: 1}, 1},
	} {
		if got := c.r.ExitCode(); got != c.code {
			t.Errorf("%+v: exit code %d, want %d", c.r, got, c.code)
		}
	}
	fe := &CheckFailedError{Errno: unix.EFBIG}
	if fe.Error() != "Check failed: File too large" || !errors.Is(fe, unix.EFBIG) {
		t.Errorf("CheckFailedError: %q", fe.Error())
	}
}

// TestCheckHugeFile checks an image file of more than 2^31 clusters (a
// sparse file): QEMU refuses to count that many clusters, and so does Check.
func TestCheckHugeFile(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := qemuCreate(t, t.TempDir(), "huge.qcow2", "1M", "-o", "cluster_size=512")
	if err := os.Truncate(p, (1<<31+1)*512); err != nil {
		t.Skipf("cannot make a 1 TiB sparse file: %v", err)
	}
	qo := ckQemu(t, p)
	r, err := ckCheck(t, p, 0)
	if oo := ckOurs(r, err, p); !ckSame(qo, oo) {
		t.Errorf("qemu-img: %v\n\nours: %v", qo, oo)
	}
	var fe *CheckFailedError
	if !errors.As(err, &fe) || fe.Errno != unix.EFBIG {
		t.Errorf("err = %v, want EFBIG", err)
	}
}

// TestCheckRefsLimit checks that the in-memory refcount table refuses to
// grow beyond its memory limit instead of allocating.
func TestCheckRefsLimit(t *testing.T) {
	g := Geometry{ClusterBits: 9, RefcountOrder: 6, Version: 3}
	r := &chkRefs{g: g, cs: 512}
	if err := r.resize(chkMaxRefArrayBytes / 8); err != nil {
		t.Fatalf("resize to the limit: %v", err)
	}
	r.buf = nil
	for _, n := range []uint64{chkMaxRefArrayBytes/8 + 1, 1 << 54, 1<<64 - 1} {
		if err := r.resize(n); !errors.Is(err, unix.ENOMEM) {
			t.Errorf("resize(%d) = %v, want ENOMEM", n, err)
		}
	}
}

// TestCheckReadOnlyRepair checks that a repair refuses a read-only node.
func TestCheckReadOnlyRepair(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := qemuCreate(t, t.TempDir(), "ro.qcow2", "1M")
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, bdrv.Spec{Filename: p, Format: "file", ReadOnly: true})
		if err != nil {
			return err
		}
		defer n.Close(co)
		if _, err := Check(co, n, FixLeaks, CheckEvents{}); !errors.Is(err, unix.EROFS) {
			return fmt.Errorf("Check(FixLeaks) on a read-only node: %v, want EROFS", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestCheckRepairDirty is what the driver must do when it opens a dirty
// lazy-refcounts image read-write: Check(FixAll), then require no
// corruptions and no check errors. The dirty bit must be gone afterwards,
// and the data intact.
func TestCheckRepairDirty(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	sh := ckShape{name: "dirty", size: "64M", opts: "lazy_refcounts=on", killed: true,
		io: []string{"write -P 7 0 1M", "write -P 8 2M 128k", "write -z 4M 64k"}}
	im := ckBuild(t, sh)
	pristine := filepath.Join(t.TempDir(), "pristine.qcow2")
	ckCopy(t, im.path, pristine)
	if ckFeatures(t, im.path)[0]&IncompatDirty == 0 {
		t.Fatal("killed writer left no dirty bit")
	}
	r, err := ckCheck(t, im.path, FixAll)
	if err != nil || r.Corruptions != 0 || r.CheckErrors != 0 || !r.Repaired || r.CorruptionsFixed == 0 {
		t.Fatalf("repair: %v\n%+v", err, r)
	}
	if ckFeatures(t, im.path)[0]&IncompatDirty != 0 {
		t.Error("dirty bit still set after the repair")
	}
	if q := ckQemu(t, im.path); q.rc != 0 {
		t.Errorf("qemu-img check after the repair: %v", q)
	}
	ckSameContent(t, im, pristine, im.path)
}

// ---------------------------------------------------------------------------
// Fuzzing

// ckSyntheticImage builds a tiny valid image without qemu-img: 512-byte
// clusters, header, refcount table, refcount block, L1 table, one L2 table
// mapping two data clusters, one of them compressed.
func ckSyntheticImage() []byte {
	const cs = 512
	h := &Header{Version: 3, ClusterBits: 9, Size: 1 << 20, L1Size: 32, L1TableOffset: 3 * cs,
		RefcountTableOffset: 1 * cs, RefcountTableClusters: 1, RefcountOrder: 4}
	hdr, err := h.Marshal(cs)
	if err != nil {
		panic(err)
	}
	img := make([]byte, 8*cs)
	copy(img, hdr)
	be.PutUint64(img[1*cs:], 2*cs)                       // refcount table -> block
	be.PutUint64(img[3*cs:], 4*cs|OflagCopied)           // L1 -> L2
	be.PutUint64(img[4*cs:], 5*cs|OflagCopied)           // data cluster
	be.PutUint64(img[4*cs+8:], OflagCompressed|6*cs+100) // compressed, 1 sector
	be.PutUint64(img[4*cs+16:], OflagZero)
	for c := range 7 {
		be.PutUint16(img[2*cs+2*c:], 1)
	}
	copy(img[5*cs:], "data")
	return img[:7*cs]
}

// ckFuzzSeeds returns the synthetic image and, with qemu-img, small images
// of several shapes.
func ckFuzzSeeds(f *testing.F) [][]byte {
	seeds := [][]byte{ckSyntheticImage()}
	if !qemutest.Have(f, "qemu-img", "qemu-io") {
		return seeds
	}
	dir := f.TempDir()
	for i, sh := range []ckShape{
		{size: "64k", opts: "cluster_size=512", snaps: 1, snapWrite: "1k",
			io: []string{"write -P 1 0 2k", "write -c -P 2 4k 512", "write -z 8k 512"}},
		{size: "64k", opts: "compat=0.10,cluster_size=512", snaps: 1, snapWrite: "1k",
			io: []string{"write -P 1 0 1k", "write -c 2k 512"}},
		{size: "64k", opts: "cluster_size=1k,refcount_bits=2", io: []string{"write -P 1 0 3k"}},
		{size: "64k", opts: "cluster_size=512,lazy_refcounts=on", killed: true, io: []string{"write -P 1 0 2k"}},
		{size: "64k", opts: "cluster_size=512,refcount_bits=64", bitmaps: true, io: []string{"write -P 1 0 1k"}},
	} {
		sd := filepath.Join(dir, fmt.Sprint(i))
		if err := os.Mkdir(sd, 0o755); err != nil {
			f.Fatal(err)
		}
		p, err := ckMake(sd, sh)
		if err != nil {
			f.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

// FuzzCheck checks and repairs damaged small images: no panic, no hang, no
// large allocation; checking never writes; a successful repair writes past
// the end of the original file only clusters the repaired image uses. The
// seeds are small (512-byte clusters) so that minimizing stays quick:
//
//	go test -run '^$' -fuzz '^FuzzCheck$' -fuzztime 10m -fuzzminimizetime 100x ./drivers/qcow2/
func FuzzCheck(f *testing.F) {
	for _, s := range ckFuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		fuzzlimit.Guard(t, fuzzlimit.Limits{})
		if len(img) < 512 || len(img) > 64<<10 {
			return
		}
		p := filepath.Join(t.TempDir(), "f.qcow2")
		if err := os.WriteFile(p, img, 0o644); err != nil {
			t.Fatal(err)
		}
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		start := time.Now()

		r, err := ckCheck(t, p, 0)
		if r == nil && err == nil {
			t.Fatal("nil result without error")
		}
		after, _ := os.ReadFile(p)
		if !bytes.Equal(after, img) {
			t.Fatal("check without repair changed the file")
		}

		_, err = ckCheck(t, p, FixAll)
		if d := time.Since(start); d > 20*time.Second {
			t.Errorf("check and repair took %v", d)
		}
		runtime.ReadMemStats(&m1)
		if a := m1.TotalAlloc - m0.TotalAlloc; a > 512<<20 {
			t.Errorf("allocated %d MiB", a>>20)
		}
		var fe *CheckFailedError
		if err != nil && !errors.As(err, &fe) {
			return // the header did not open; nothing was written
		}
		after, err2 := os.ReadFile(p)
		if err2 != nil {
			t.Fatal(err2)
		}
		if len(after) > len(img)+chkMaxGrow+len(img)+(64<<20) {
			t.Errorf("repair grew the file from %d to %d bytes", len(img), len(after))
		}
		if err != nil || len(after) <= len(img) {
			return
		}
		ckCheckWritesUsed(t, p, img, after)
	})
}

// ckCheckWritesUsed checks that every cluster with data past the end of the
// original image is referenced by the repaired image.
func ckCheckWritesUsed(t *testing.T, p string, orig, after []byte) {
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, bdrv.Spec{Filename: p, Format: "file", ReadOnly: true})
		if err != nil {
			return err
		}
		defer n.Close(co)
		c, err := openCheck(co, n, 0, CheckEvents{})
		if err != nil {
			return fmt.Errorf("repaired image does not open: %w", err)
		}
		var res chkCounts
		if err := c.checkReadSnapshotTable(&res); err != nil {
			return nil // not counted: no claim to check
		}
		refs := &chkRefs{g: c.g, cs: c.cs}
		if err := refs.resize(c.sizeToClusters(c.fileLen())); err != nil {
			return err
		}
		var rebuild bool
		if err := c.calculateRefcounts(&res, refs, &rebuild); err != nil {
			return nil
		}
		cs := int(c.cs)
		for off := (len(orig) + cs - 1) / cs * cs; off < len(after); off += cs {
			chunk := after[off:min(off+cs, len(after))]
			if !allZero(chunk) && uint64(off/cs) < refs.n && refs.get(uint64(off/cs)) == 0 {
				return fmt.Errorf("cluster at %#x past the original end (%#x) written but unused", off, len(orig))
			}
		}
		return nil
	})
	if err != nil && !strings.Contains(err.Error(), "not counted") {
		t.Error(err)
	}
}
