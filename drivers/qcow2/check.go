package qcow2

import (
	"errors"
	"fmt"
	"math"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

// This file is the consistency checker behind `check` (QEMU's
// qcow2_co_check_locked and qcow2_check_refcounts, block/qcow2-refcount.c,
// with the snapshot table checks of block/qcow2-snapshot.c and the bitmap
// walk of block/qcow2-bitmap.c). It opens the image as QEMU does for a
// check, as an Image whose chk is set, and repairs it with the driver's own
// refcount cache, allocator and overlap check (refcount.go, cache.go,
// qcow2.go); check_repair.go holds what only a repair does (the refcount
// structure rebuild, growing the file for a refcount block past its end).
//
// The messages are QEMU 7.2's, word for word, because scripts grep them, and
// the counting follows QEMU step by step (which problems count as
// corruptions, which as leaks, when a repair needs the refcount structure
// rebuilt), so that ublkimg check and qemu-img check agree on every image.
//
// Memory is bounded by the file, not by what it holds: the in-memory
// refcounts take refcount_bits per host cluster of the file (saturating, as
// QEMU's), the active L1 table is held once (as the driver holds it), other
// tables are read a piece at a time, and messages are handed out as they
// are found, never collected.

// The check's types are bdrv's (bdrv.CheckFunc is the capability Check
// provides to the verbs); the names here keep this package's code short.
type (
	CheckResult      = bdrv.CheckResult
	CheckEvents      = bdrv.CheckEvents
	FixMode          = bdrv.FixMode
	CheckFailedError = bdrv.CheckFailedError
)

// Repair modes; 0 only checks. FixErrors repairs refcounts that are too
// low, wrong COPIED flags, broken snapshot tables, and refcount structures
// that must be rebuilt.
const (
	FixLeaks  = bdrv.FixLeaks
	FixErrors = bdrv.FixErrors
	FixAll    = bdrv.FixAll
)

// errnoOf returns the errno an error carries, EIO if none.
func errnoOf(err error) unix.Errno {
	var e unix.Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	return unix.EIO
}

// Check checks the consistency of the qcow2 image in file and, depending on
// fix, repairs it, the way `qemu-img check [-r leaks|all]` does. The lines
// qemu-img prints while checking go to ev as they are found.
//
// It walks every structure of the image (header cluster, active L1 and L2
// tables and the data clusters they map, including compressed ones, every
// internal snapshot's L1 and L2 tables, the snapshot table, the refcount
// table and blocks, the bitmap directory and bitmap tables, the LUKS header
// area), counts the references to each host cluster in memory, and compares
// the counts with the stored refcounts; it also checks table entries, the
// COPIED flags of the active tables and the snapshot table. With a fix mode
// it repairs what it may (decreasing refcounts of leaked clusters,
// increasing too-low ones, correcting COPIED flags, rebuilding an unusable
// refcount structure, rewriting a broken snapshot table, which may grow the
// refcount table), and after a repair without remaining errors clears the
// dirty and corrupt bits; opening for repair also clears unknown autoclear
// bits, as QEMU's read-write open does. When something was repaired, the
// image is checked once more without repairing and that result is returned
// (see CheckResult.Repaired).
//
// Check reads and writes only file, the image's protocol node, with the
// driver's own metadata code, and writes everything back before returning.
// Nothing else may use the image meanwhile (QEMU holds s->lock). file must
// be writable when fix is not 0 (else EROFS). A driver that has the image
// open drains its requests and writes its caches back before, and after a
// repair forgets all cached metadata and opens the image anew. A read-write
// open of an image with the dirty bit repairs it with one pass of the check
// (FixAll) before anything else, as QEMU's qcow2_do_open does; the open
// fails with "Could not repair dirty image" when the pass returns an error
// or check errors.
//
// Check does not look at the bitmaps' data the way QEMU's open does
// (qcow2_load_dirty_bitmaps refuses to open an image whose bitmap directory or
// tables are invalid); it counts the bitmap clusters and fails with EINVAL on
// the same problems, as QEMU's check would.
//
// The in-memory refcount table takes refcount_bits bits per host cluster of
// the file; images whose table would exceed 1 GiB, or with more than
// 2^31-1 clusters (QEMU's limit), fail the check instead.
//
// Errors: a *HeaderError or *UnsupportedFeatureError (through
// errors.Is ErrInvalid / ErrUnsupported) when the image cannot be opened at
// all (qemu-img: "Could not open"), with a nil result; a *CheckFailedError
// when the check could not complete, with the partial result.
func Check(co *coroutine.Co, file *bdrv.Node, fix FixMode, ev CheckEvents) (*CheckResult, error) {
	if fix != 0 && file.ReadOnly {
		return nil, fmt.Errorf("qcow2: repairing %s: %w", file.Filename, unix.EROFS)
	}
	r, err := checkPass(co, file, fix, ev)
	if err != nil || fix == 0 || (r.CorruptionsFixed == 0 && r.LeaksFixed == 0) {
		return r, err
	}
	if ev.Recheck != nil {
		ev.Recheck(r)
	}
	r2, err := checkPass(co, file, 0, ev)
	if r2 == nil {
		return r, err
	}
	r2.CorruptionsFixed, r2.LeaksFixed = r.CorruptionsFixed, r.LeaksFixed
	r2.Repaired = true
	return r2, err
}

// Limits of the checker's memory use.
const (
	// chkMaxClusters is QEMU's limit on the clusters of an image file it
	// checks (nb_clusters > INT_MAX fails with EFBIG).
	chkMaxClusters = math.MaxInt32
	// chkMaxRefArrayBytes bounds the in-memory refcount table; larger ones
	// fail the check with ENOMEM, as QEMU's allocation would.
	chkMaxRefArrayBytes = 1 << 30
	// chkMaxGrow bounds how far the repair of a refcount block beyond the
	// end of the file may grow the file (QEMU grows the file to include it,
	// wherever it is); farther blocks make the refcount structure be
	// rebuilt instead, as when QEMU cannot grow the file.
	chkMaxGrow = 64 << 20
)

// chkCounts is QEMU's BdrvCheckResult: the counts of one part of a check.
type chkCounts struct {
	corruptions, leaks, checkErrors     int
	corruptionsFixed, leaksFixed        int
	imageEndOffset                      int64
	total, allocated, fragmented, compr int64
}

// add adds src's counts to c, and its allocation information when
// withAlloc (qcow2_add_check_result).
func (c *chkCounts) add(src *chkCounts, withAlloc bool) {
	c.corruptions += src.corruptions
	c.leaks += src.leaks
	c.checkErrors += src.checkErrors
	c.corruptionsFixed += src.corruptionsFixed
	c.leaksFixed += src.leaksFixed
	if withAlloc {
		c.imageEndOffset = src.imageEndOffset
		c.total, c.allocated, c.fragmented, c.compr = src.total, src.allocated, src.fragmented, src.compr
	}
}

// chkState is one pass of the checker over an image: the image as QEMU
// opens it for a check, and what the pass keeps besides.
type chkState struct {
	co  *coroutine.Co
	img *Image
	// file, h, g and cs are img's.
	file *bdrv.Node
	h    *Header
	g    Geometry
	cs   uint64
	fix  FixMode
	ev   CheckEvents

	refMax   uint64
	dataFile bool
	// diskSize is the virtual size as QEMU sees it (whole sectors).
	diskSize uint64

	nbBitmaps                      uint32
	bitmapDirOffset, bitmapDirSize uint64

	// signaled is set once a corruption was signalled; later ones are
	// suppressed as in QEMU.
	signaled bool

	// l2 holds the last L2 table read (l2Off; valid unless l2Stale), which
	// a walk reads again for every L1 entry naming it, as QEMU does.
	l2      []byte
	l2Off   uint64
	l2Stale bool
}

func (c *chkState) msg(format string, args ...any) {
	if c.ev.Message != nil {
		c.ev.Message(fmt.Sprintf(format, args...))
	}
}

// repairWord is QEMU's `fix & BDRV_FIX_ERRORS ? "Repairing" : "ERROR"`.
func (c *chkState) repairWord() string {
	if c.fix&FixErrors != 0 {
		return "Repairing"
	}
	return "ERROR"
}

// chex formats v like C's "%#x": without the 0x prefix for zero.
func chex(v uint64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}

// checkPass runs one pass of qcow2_co_check_locked.
func checkPass(co *coroutine.Co, file *bdrv.Node, fix FixMode, ev CheckEvents) (*CheckResult, error) {
	c, err := openCheck(co, file, fix, ev)
	if err != nil {
		return nil, err
	}
	var total, snapRes, rcRes chkCounts
	result := func(err error) (*CheckResult, error) {
		if err == nil && fix != 0 {
			if ferr := c.file.Flush(c.co); ferr != nil {
				total.checkErrors++
				err = ferr
			}
		}
		r := &CheckResult{
			Corruptions: total.corruptions, Leaks: total.leaks, CheckErrors: total.checkErrors,
			CorruptionsFixed: total.corruptionsFixed, LeaksFixed: total.leaksFixed,
			ImageEndOffset: total.imageEndOffset, TotalClusters: total.total,
			AllocatedClusters: total.allocated, FragmentedClusters: total.fragmented,
			CompressedClusters: total.compr,
		}
		if err != nil {
			return r, &CheckFailedError{Errno: errnoOf(err)}
		}
		return r, nil
	}

	// A read-write open clears autoclear bits this implementation does not
	// know (qcow2_do_open), before anything else is looked at.
	if ac := c.h.AutoclearFeatures; fix != 0 && c.h.Version >= 3 && ac&^AutoclearKnown != 0 {
		if err := c.setFeatures(c.h.IncompatibleFeatures, ac&AutoclearKnown); err != nil {
			return nil, err
		}
	}

	if err := c.checkReadSnapshotTable(&snapRes); err != nil {
		total.add(&snapRes, false)
		return result(err)
	}
	err = c.checkRefcounts(&rcRes)
	total.add(&rcRes, true)
	if err != nil {
		total.add(&snapRes, false)
		return result(err)
	}
	err = c.checkFixSnapshotTable(&snapRes)
	total.add(&snapRes, false)
	if err != nil {
		return result(err)
	}
	if fix != 0 && total.checkErrors == 0 && total.corruptions == 0 {
		// qcow2_mark_clean, then qcow2_mark_consistent.
		inc := c.h.IncompatibleFeatures
		if bits := inc &^ (IncompatDirty | IncompatCorrupt); bits != inc {
			if err := c.writeBack(); err != nil {
				return result(err)
			}
			if err := c.setFeatures(bits, c.h.AutoclearFeatures); err != nil {
				return result(err)
			}
		}
	}
	return result(c.writeBack())
}

// writeBack writes the refcount blocks the pass changed and flushes the file,
// unless a fatal corruption made the image unusable (QEMU then drops the
// driver, and with it what its caches hold). A check that only reads has
// nothing to write.
func (c *chkState) writeBack() error {
	if c.fix == 0 || c.img.corrupt.Load() {
		return nil
	}
	return c.img.syncAllLocked(c.co)
}

// setFeatures stores new incompatible and autoclear feature bits in the
// header of a version 3 image.
func (c *chkState) setFeatures(incompat, autoclear uint64) error {
	img := c.img
	if c.h.Version >= 3 {
		if incompat != c.h.IncompatibleFeatures {
			if err := img.writeHeaderU64(c.co, 72, incompat); err != nil {
				return err
			}
		}
		if autoclear != c.h.AutoclearFeatures {
			if err := img.writeHeaderU64(c.co, 88, autoclear); err != nil {
				return err
			}
		}
	}
	img.setFeaturesLocked(incompat, autoclear)
	return nil
}

// signalCorruption reports corrupt metadata the way qcow2_signal_corruption
// does: once, and when repairing (the image is writable) as a fatal event
// that sets the corrupt bit and makes the image unusable. The driver's
// signalCorruptionLocked calls it for an image open for Check.
func (c *chkState) signalCorruption(what string) {
	fatal := c.fix != 0
	if c.signaled && (!fatal || c.h.IncompatibleFeatures&IncompatCorrupt != 0) {
		return
	}
	c.signaled = true
	if !fatal {
		c.msg("qcow2: Image is corrupt: %s; further non-fatal corruption events will be suppressed", what)
		return
	}
	c.msg("qcow2: Marking image as corrupt: %s; further corruption events will be suppressed", what)
	// A version 2 header cannot store the bit; QEMU keeps it in memory.
	_ = c.setFeatures(c.h.IncompatibleFeatures|IncompatCorrupt, c.h.AutoclearFeatures)
	c.img.corrupt.Store(true)
}

// openCheck opens the image in file as QEMU's qcow2_do_open does for a check:
// the header (without trusting the snapshot table pointer, which the check
// reads itself, and accepting a missing refcount table, which a repair
// rebuilds), the active L1 table and the refcount table, read as far as the
// file goes (the rest reads as zeros).
func openCheck(co *coroutine.Co, file *bdrv.Node, fix FixMode, ev CheckEvents) (*chkState, error) {
	c := &chkState{co: co, file: file, fix: fix, ev: ev, l2Stale: true}
	head := make([]byte, 512)
	if err := c.pread(0, head); err != nil {
		return nil, err
	}
	cb := be.Uint32(head[20:])
	n := uint64(512)
	if cb >= MinClusterBits && cb <= MaxClusterBits {
		n = 1 << cb
	}
	b := make([]byte, n)
	if err := c.pread(0, b); err != nil {
		return nil, err
	}
	raw := struct {
		l1Size              uint32
		l1Offset, rtOffset  uint64
		rtClusters, nbSnaps uint32
		snapOffset          uint64
	}{be.Uint32(b[36:]), be.Uint64(b[40:]), be.Uint64(b[48:]), be.Uint32(b[56:]), be.Uint32(b[60:]), be.Uint64(b[64:])}

	// Validate a copy in which the fields the check treats itself look
	// harmless; ParseHeader checks everything else as an open would.
	sane := append([]byte(nil), b...)
	be.PutUint32(sane[60:], 0)
	be.PutUint64(sane[64:], 0)
	if raw.rtOffset == 0 {
		be.PutUint64(sane[48:], n)
	}
	if raw.rtClusters == 0 {
		be.PutUint32(sane[56:], 1)
	}
	if raw.l1Offset == 0 && raw.l1Size != 0 {
		be.PutUint64(sane[40:], n)
	}
	h, err := ParseHeader(sane, -1)
	if err != nil {
		return nil, openHeaderError(err)
	}
	cs := h.ClusterSize()
	// QEMU's qcow2_validate_table for the refcount table, which a check
	// open still applies: the size limit and alignment (ParseHeader checked
	// both unless the table was missing).
	if uint64(raw.rtClusters) > MaxRefcountTableBytes/cs {
		return nil, invalid("refcount_table_clusters", "%d too large", raw.rtClusters)
	}
	if raw.rtOffset&(cs-1) != 0 || raw.rtOffset > math.MaxInt64-uint64(raw.rtClusters)*cs {
		return nil, invalid("refcount_table_offset", "%#x invalid", raw.rtOffset)
	}
	h.L1Size, h.L1TableOffset = raw.l1Size, raw.l1Offset
	h.RefcountTableOffset, h.RefcountTableClusters = raw.rtOffset, raw.rtClusters
	h.NbSnapshots, h.SnapshotsOffset = raw.nbSnaps, raw.snapOffset

	img := &Image{file: file, data: file, readOnly: fix == 0, metaClusters: map[uint64]metaSet{}, chk: c}
	img.hdr, img.g, img.cs = h, h.Geometry(), cs
	c.img, c.h, c.g, c.cs = img, h, img.g, cs
	c.refMax = c.g.RefcountMax()
	c.dataFile = h.HasDataFile()
	c.diskSize = h.Size / 512 * 512
	if h.Bitmaps != nil {
		c.nbBitmaps = h.Bitmaps.Count
		c.bitmapDirOffset, c.bitmapDirSize = h.Bitmaps.DirectoryOffset, h.Bitmaps.DirectorySize
	}
	img.l1Offset = raw.l1Offset
	if img.l1, err = img.readTable(co, raw.l1Offset, uint64(raw.l1Size)); err != nil {
		return nil, err
	}
	img.rtOffset, img.rtCluster = raw.rtOffset, raw.rtClusters
	if img.reftable, err = img.readTable(co, raw.rtOffset, uint64(raw.rtClusters)*cs/8); err != nil {
		return nil, err
	}
	img.buildMetadataMap()
	// QEMU's defaults: freed clusters are discarded unless freed for
	// "other" reasons.
	img.passDiscard[discardAlways] = true
	img.passDiscard[discardRequest] = true
	img.passDiscard[discardSnapshot] = true
	// The check reads L2 tables itself; the driver's L2 cache only takes
	// part in the write ordering.
	img.l2Cache = newCache(img, "L2 table", mkActiveL2, minL2CacheEntries, int(cs))
	img.rcCache = newCache(img, "refcount block", mkRefBlock, minRefcountCacheSize, int(cs))
	return c, nil
}

// pread reads len(b) bytes at off; the part beyond the end of the file reads
// as zeros.
func (c *chkState) pread(off uint64, b []byte) error {
	if off > math.MaxInt64/2 || uint64(len(b)) > math.MaxInt64/2-off {
		return unix.EIO
	}
	return c.file.Preadv(c.co, int64(off), bdrv.IOVec{b}, 0)
}

// pwriteSync writes a copy of b at off and flushes (bdrv_pwrite_sync).
func (c *chkState) pwriteSync(off uint64, b []byte) error {
	if off > math.MaxInt64/2 || uint64(len(b)) > math.MaxInt64/2-off {
		return unix.EIO
	}
	buf := bdrv.AlignedBuffer(len(b), 8)
	copy(buf, b)
	if err := c.file.Pwritev(c.co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
		return err
	}
	return c.file.Flush(c.co)
}

func (c *chkState) fileLen() uint64 { return uint64(max(c.file.Length(), 0)) }

// inFile returns how many of n bytes at off lie before the end of the file:
// tables are read only that far, the rest reads as zeros and zero entries
// reference nothing.
func (c *chkState) inFile(off, n uint64) uint64 {
	l := c.fileLen()
	if off >= l {
		return 0
	}
	return min(n, l-off)
}

// l2Table reads the L2 table at off, as far as the file goes. The table
// read last is kept and given again while no one but the walk that
// changes it wrote to the file (l2Stale): an L1 table whose entries all
// name one L2 table costs one read.
func (c *chkState) l2Table(off uint64) ([]byte, error) {
	n := c.inFile(off, c.cs) / c.g.L2EntrySize() * c.g.L2EntrySize()
	if !c.l2Stale && c.l2Off == off && uint64(len(c.l2)) == n {
		return c.l2, nil
	}
	if uint64(cap(c.l2)) < c.cs {
		c.l2 = make([]byte, c.cs)
	}
	c.l2, c.l2Stale = c.l2[:n], true
	if err := c.pread(off, c.l2); err != nil {
		return nil, err
	}
	c.l2Off, c.l2Stale = off, false
	return c.l2, nil
}

func (c *chkState) sizeToClusters(n uint64) uint64 { return (n + c.cs - 1) >> c.g.ClusterBits }

// ---------------------------------------------------------------------------
// In-memory refcount table

// chkRefs is QEMU's in-memory refcount table (IMRT): one refcount_bits-wide
// entry per host cluster, packed exactly like refcount blocks, so that each
// cluster-sized slice of buf is a valid refcount block for the corresponding
// range of clusters (a rebuild writes them out as they are).
type chkRefs struct {
	g   Geometry
	cs  uint64
	buf []byte // a whole number of clusters
	n   uint64 // entries in use (QEMU's nb_clusters)
}

// resize makes the table hold n entries, zeroing new ones
// (realloc_refcount_array). It fails with ENOMEM beyond the memory limit.
func (r *chkRefs) resize(n uint64) error {
	if n >= 1<<(64-MinClusterBits) {
		return unix.ENOMEM
	}
	bytes := (n<<r.g.RefcountOrder + 7) / 8
	bytes = (bytes + r.cs - 1) / r.cs * r.cs
	if bytes > chkMaxRefArrayBytes {
		return unix.ENOMEM
	}
	if bytes != uint64(len(r.buf)) {
		nb := make([]byte, bytes)
		copy(nb, r.buf)
		r.buf = nb
	}
	r.n = n
	return nil
}

func (r *chkRefs) get(i uint64) uint64 {
	v, _ := r.g.Refcount(r.buf, i)
	return v
}

func (r *chkRefs) set(i, v uint64) { _ = r.g.SetRefcount(r.buf, i, v) }

// ---------------------------------------------------------------------------
// Snapshot table (block/qcow2-snapshot.c)

// checkReadSnapshotTable reads the snapshot table for the check
// (qcow2_check_read_snapshot_table): with FixErrors, snapshots beyond QEMU's
// limits are dropped and oversized extra data is truncated.
func (c *chkState) checkReadSnapshotTable(res *chkCounts) error {
	nbReduced := 0
	if c.h.NbSnapshots > MaxSnapshots && c.fix&FixErrors != 0 {
		c.msg("Discarding %d overhanging snapshots", c.h.NbSnapshots-MaxSnapshots)
		nbReduced += int(c.h.NbSnapshots - MaxSnapshots)
		c.h.NbSnapshots = MaxSnapshots
	}
	// qcow2_validate_table(snapshots_offset, nb_snapshots, 40, 40*65536).
	var verr string
	var errno unix.Errno
	switch {
	case c.h.NbSnapshots > MaxSnapshots:
		verr, errno = "snapshot table too large", unix.EFBIG
	case c.h.SnapshotsOffset > math.MaxInt64-uint64(c.h.NbSnapshots)*SnapshotHeaderSize ||
		c.h.SnapshotsOffset&(c.cs-1) != 0:
		verr, errno = "snapshot table offset invalid", unix.EINVAL
	}
	if verr != "" {
		res.checkErrors++
		c.msg("ERROR %s", verr)
		if c.h.NbSnapshots > MaxSnapshots {
			c.msg("You can force-remove all %d overhanging snapshots with qemu-img check -r all",
				c.h.NbSnapshots-MaxSnapshots)
		}
		c.h.NbSnapshots, c.h.SnapshotsOffset = 0, 0
		return errno
	}

	extraDropped := 0
	snaps, size, reduced, dropped, err := c.readSnapshots(c.fix&FixErrors != 0)
	if err != nil {
		res.checkErrors++
		var re *chkSnapReadError
		if errors.As(err, &re) {
			c.msg("ERROR failed to read the snapshot table: %s", re.msg)
			if re.hint != "" {
				c.msg("%s", re.hint)
			}
		} else {
			c.msg("ERROR failed to read the snapshot table: Failed to read snapshot table: %s", uring.Strerror(errnoOf(err)))
		}
		c.h.NbSnapshots, c.h.SnapshotsOffset = 0, 0
		return err
	}
	nbReduced += reduced
	extraDropped += dropped
	c.img.snapshots, c.img.snapTableSize = snaps, size
	c.h.NbSnapshots = uint32(len(snaps))
	res.corruptions += nbReduced + extraDropped

	if nbReduced > 0 {
		// Updated now: the refcount check relies on nb_snapshots matching
		// the header; the clusters leaked are repaired by it.
		var b [4]byte
		be.PutUint32(b[:], c.h.NbSnapshots)
		if err := c.pwriteSync(60, b[:]); err != nil {
			res.checkErrors++
			c.msg("ERROR failed to update the snapshot count in the image header: %s", uring.Strerror(errnoOf(err)))
			return err
		}
		res.corruptionsFixed += nbReduced
		res.corruptions -= nbReduced
	}

	if c.h.Version >= 3 {
		for i, s := range c.img.snapshots {
			if s.ExtraDataSize < snapshotExtraV3 {
				res.corruptions++
				c.msg("%s snapshot table entry %d is incomplete", c.repairWord(), i)
			}
		}
	}
	return nil
}

// chkSnapReadError is a snapshot table read error with QEMU's wording.
type chkSnapReadError struct {
	msg, hint string
	errno     unix.Errno
}

func (e *chkSnapReadError) Error() string { return e.msg }
func (e *chkSnapReadError) Unwrap() error { return e.errno }

// chkReader reads a byte stream from the file through a buffer.
type chkReader struct {
	c      *chkState
	bufOff uint64
	buf    []byte
}

func (r *chkReader) read(off uint64, dst []byte) error {
	for len(dst) > 0 {
		if off < r.bufOff || off >= r.bufOff+uint64(len(r.buf)) {
			if r.buf == nil {
				r.buf = make([]byte, 64<<10)
			}
			r.bufOff = off
			if err := r.c.pread(off, r.buf); err != nil {
				r.bufOff, r.buf = 0, nil
				return err
			}
		}
		n := copy(dst, r.buf[off-r.bufOff:])
		dst = dst[n:]
		off += uint64(n)
	}
	return nil
}

// readSnapshots reads nb_snapshots entries from snapshots_offset
// (qcow2_do_read_snapshots). With repair, too much extra data is truncated
// and a table growing beyond QEMU's limits is cut short; it returns how many
// snapshots were cut and how many entries lost extra data.
func (c *chkState) readSnapshots(repair bool) (snaps []Snapshot, size uint64, reduced, dropped int, err error) {
	if c.h.NbSnapshots == 0 {
		return nil, 0, 0, 0, nil
	}
	r := &chkReader{c: c}
	off := c.h.SnapshotsOffset
	tableLen := uint64(0)
	for i := 0; i < int(c.h.NbSnapshots); i++ {
		truncate := false
		pre := off
		tableLen = (tableLen + 7) &^ 7
		off = (off + 7) &^ 7
		var hb [SnapshotHeaderSize]byte
		if err := r.read(off, hb[:]); err != nil {
			return nil, 0, 0, 0, err
		}
		off += SnapshotHeaderSize
		s := Snapshot{
			L1TableOffset: be.Uint64(hb[0:]),
			L1Size:        be.Uint32(hb[8:]),
			VMStateSize:   uint64(be.Uint32(hb[32:])),
			DateSec:       be.Uint32(hb[16:]),
			DateNsec:      be.Uint32(hb[20:]),
			VMClockNsec:   be.Uint64(hb[24:]),
			ExtraDataSize: be.Uint32(hb[36:]),
			Icount:        -1,
		}
		idLen, nameLen := uint64(be.Uint16(hb[12:])), uint64(be.Uint16(hb[14:]))
		if s.ExtraDataSize > MaxSnapshotExtraData {
			if !repair {
				return nil, 0, 0, 0, &chkSnapReadError{
					msg:   fmt.Sprintf("Too much extra metadata in snapshot table entry %d", i),
					hint:  "You can force-remove this extra metadata with qemu-img check -r all",
					errno: unix.EFBIG,
				}
			}
			c.msg("Discarding too much extra metadata in snapshot table entry %d (%d > %d)",
				i, s.ExtraDataSize, MaxSnapshotExtraData)
			dropped++
			truncate = true
		}
		var extra [snapshotExtraKnown]byte
		known := min(snapshotExtraKnown, uint64(s.ExtraDataSize))
		if err := r.read(off, extra[:known]); err != nil {
			return nil, 0, 0, 0, err
		}
		off += known
		if s.ExtraDataSize >= 8 {
			s.VMStateSize = be.Uint64(extra[0:])
		}
		if s.ExtraDataSize >= 16 {
			s.DiskSize = be.Uint64(extra[8:])
		} else {
			s.DiskSize = c.diskSize
		}
		if s.ExtraDataSize >= 24 {
			s.Icount = int64(be.Uint64(extra[16:]))
		}
		if s.ExtraDataSize > snapshotExtraKnown {
			end := off + uint64(s.ExtraDataSize) - snapshotExtraKnown
			if truncate {
				s.ExtraDataSize = MaxSnapshotExtraData
			}
			s.UnknownExtra = make([]byte, s.ExtraDataSize-snapshotExtraKnown)
			if err := r.read(off, s.UnknownExtra); err != nil {
				return nil, 0, 0, 0, err
			}
			off = end
		}
		id := make([]byte, idLen+nameLen)
		if err := r.read(off, id); err != nil {
			return nil, 0, 0, 0, err
		}
		off += idLen + nameLen
		s.ID, s.Name = string(id[:idLen]), string(id[idLen:])

		tableLen += SnapshotHeaderSize + uint64(s.ExtraDataSize) + idLen + nameLen
		if tableLen > MaxSnapshotTableSize || off-c.h.SnapshotsOffset > math.MaxInt32 {
			left := int(c.h.NbSnapshots) - i
			if !repair {
				return nil, 0, 0, 0, &chkSnapReadError{
					msg:   "Snapshot table is too big",
					hint:  fmt.Sprintf("You can force-remove all %d overhanging snapshots with qemu-img check -r all", left),
					errno: unix.EFBIG,
				}
			}
			c.msg("Discarding %d overhanging snapshots (snapshot table is too big)", left)
			reduced += left
			off = pre
			break
		}
		snaps = append(snaps, s)
	}
	return snaps, off - c.h.SnapshotsOffset, reduced, dropped, nil
}

// ---------------------------------------------------------------------------
// Refcount check (block/qcow2-refcount.c)

// incRefs counts a reference to every cluster of [off, off+size) in refs
// (qcow2_inc_refcounts_imrt). A region reaching a cluster or more past the
// end of the file is a corruption and is not counted.
func (c *chkState) incRefs(res *chkCounts, refs *chkRefs, off, size uint64) error {
	if size == 0 || int64(size) < 0 {
		return nil
	}
	fl := c.fileLen()
	if off > math.MaxInt64/2 || size > math.MaxInt64/2 || off+size >= fl+c.cs {
		c.msg("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset %#x size %#x", off, size)
		res.corruptions++
		return nil
	}
	first, last := off>>c.g.ClusterBits, (off+size-1)>>c.g.ClusterBits
	for k := first; k <= last; k++ {
		if k >= refs.n {
			if err := refs.resize(k + 1); err != nil {
				res.checkErrors++
				return err
			}
		}
		rc := refs.get(k)
		if rc == c.refMax {
			c.msg("ERROR: overflow cluster offset=%#x", k<<c.g.ClusterBits)
			c.msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing")
			res.corruptions++
			continue
		}
		refs.set(k, rc+1)
	}
	return nil
}

// chkFragInfo is set for the walk of the active L1 table, which gathers
// allocation statistics (CHECK_FRAG_INFO).
const chkFragInfo = 2

// checkL2 counts the references of an L2 table and checks its entries
// (check_refcounts_l2).
func (c *chkState) checkL2(res *chkCounts, refs *chkRefs, l2Offset uint64, flags int, active bool) error {
	g := c.g
	esz := g.L2EntrySize()
	table, err := c.l2Table(l2Offset)
	if err != nil {
		c.msg("ERROR: I/O error in check_refcounts_l2")
		res.checkErrors++
		return err
	}
	n := uint64(len(table)) / esz
	nextContiguous := uint64(0)
	offMask := uint64(1)<<g.csizeShift() - 1
	for i := range int(n) {
		e := be.Uint64(table[uint64(i)*esz:])
		var bitmap uint64
		if g.ExtendedL2 {
			bitmap = be.Uint64(table[uint64(i)*esz+8:])
		}
		if e == 0 && bitmap == 0 {
			continue // unallocated: nothing to count or check
		}
		typ := g.ClusterType(e)
		if typ != ClusterCompressed && e&L2StdReservedMask != 0 {
			c.msg("ERROR found l2 entry with reserved bits set: %x", e)
			res.corruptions++
		}
		switch typ {
		case ClusterCompressed:
			if e&OflagCopied != 0 {
				c.msg("ERROR: coffset=%#x: copied flag must never be set for compressed clusters", e&offMask)
				e &^= OflagCopied
				res.corruptions++
			}
			if c.dataFile {
				c.msg("ERROR compressed cluster %d with data file, entry=%#x", i, e)
				res.corruptions++
				continue
			}
			if bitmap != 0 {
				c.msg("ERROR compressed cluster %d with non-zero subcluster allocation bitmap, entry=%#x", i, e)
				res.corruptions++
				continue
			}
			coff, csize := g.CompressedRange(e)
			if err := c.incRefs(res, refs, coff, csize); err != nil {
				return err
			}
			if flags&chkFragInfo != 0 {
				res.allocated++
				res.compr++
				res.fragmented++
			}
		case ClusterZeroAlloc, ClusterNormal:
			off := e & L2OffsetMask
			if (bitmap>>32)&bitmap != 0 {
				res.corruptions++
				c.msg("ERROR offset=%x: Allocated cluster has corrupted subcluster allocation bitmap", off)
			}
			if off&(c.cs-1) != 0 {
				res.corruptions++
				var hasData bool
				if g.ExtendedL2 {
					hasData = bitmap&BitmapAllAlloc != 0
				} else {
					hasData = e&OflagZero == 0
				}
				if hasData {
					c.msg("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted.", off)
				} else {
					c.msg("%s offset=%x: Preallocated cluster is not properly aligned; L2 entry corrupted.", c.repairWord(), off)
					if c.fix&FixErrors != 0 {
						overlap, err := c.fixL2EntryByZero(res, l2Offset, table, i, active)
						if overlap {
							return err
						}
						if err == nil {
							continue // the cluster is no longer used
						}
					}
				}
			}
			if flags&chkFragInfo != 0 {
				res.allocated++
				if nextContiguous != 0 && off != nextContiguous {
					res.fragmented++
				}
				nextContiguous = off + c.cs
			}
			if !c.dataFile {
				if err := c.incRefs(res, refs, off, c.cs); err != nil {
					return err
				}
			}
		case ClusterZeroPlain:
		case ClusterUnallocated:
			if bitmap&BitmapAllAlloc != 0 {
				res.corruptions++
				c.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
			}
		}
	}
	return nil
}

// checkL1 counts the references of an L1 table, its L2 tables and the
// clusters they map, checking the entries (check_refcounts_l1).
func (c *chkState) checkL1(res *chkCounts, refs *chkRefs, l1Offset uint64, l1Size uint32, flags int, active bool) error {
	if l1Size == 0 {
		return nil
	}
	if err := c.incRefs(res, refs, l1Offset, uint64(l1Size)*8); err != nil {
		return err
	}
	entry := func(e uint64) error {
		if e == 0 {
			return nil
		}
		if e&L1ReservedMask != 0 {
			c.msg("ERROR found L1 entry with reserved bits set: %x", e)
			res.corruptions++
		}
		l2 := e & L1OffsetMask
		if err := c.incRefs(res, refs, l2, c.cs); err != nil {
			return err
		}
		if l2&(c.cs-1) != 0 {
			c.msg("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted", l2)
			res.corruptions++
		}
		return c.checkL2(res, refs, l2, flags, active)
	}
	if active {
		// The active table is the image's, as read at open.
		for _, e := range c.img.l1 {
			if err := entry(e); err != nil {
				return err
			}
		}
		return nil
	}
	err := c.eachEntry(l1Offset, uint64(l1Size), entry)
	if errors.Is(err, errChkRead) {
		c.msg("ERROR: I/O error in check_refcounts_l1")
		res.checkErrors++
	}
	return err
}

// errChkRead marks a failed read of a table in eachEntry.
var errChkRead = errors.New("qcow2 check: reading table")

// eachEntry calls fn for each of the n big-endian 64-bit entries of the
// table at off that lie inside the file (the others read as zeros), reading
// a piece at a time. A failed read returns an error matching errChkRead.
func (c *chkState) eachEntry(off, n uint64, fn func(e uint64) error) error {
	have := c.inFile(off, n*8) / 8
	buf := make([]byte, min(have*8, tableChunk))
	for i := uint64(0); i < have; {
		k := min(have-i, uint64(len(buf))/8)
		if err := c.pread(off+i*8, buf[:k*8]); err != nil {
			return fmt.Errorf("%w: %w", errChkRead, err)
		}
		for j := range k {
			if err := fn(be.Uint64(buf[j*8:])); err != nil {
				return err
			}
		}
		i += k
	}
	return nil
}

// checkBitmaps counts the bitmap directory, the bitmap tables and the
// bitmap data clusters (qcow2_check_bitmaps_refcounts).
func (c *chkState) checkBitmaps(res *chkCounts, refs *chkRefs) error {
	if c.nbBitmaps == 0 {
		return nil
	}
	if err := c.incRefs(res, refs, c.bitmapDirOffset, c.bitmapDirSize); err != nil {
		return err
	}
	bms, err := c.loadBitmapList()
	if err != nil {
		res.corruptions++
		return err
	}
	for _, bm := range bms {
		if err := c.incRefs(res, refs, bm.TableOffset, uint64(bm.TableSize)*8); err != nil {
			return err
		}
		// bitmap_table_load refuses the whole table if any entry is bad.
		err := c.eachEntry(bm.TableOffset, uint64(bm.TableSize), func(e uint64) error {
			if chkBitmapEntryBad(e, c.cs) {
				return unix.EINVAL
			}
			return nil
		})
		if err != nil {
			res.corruptions++
			return err
		}
		err = c.eachEntry(bm.TableOffset, uint64(bm.TableSize), func(e uint64) error {
			if off := e & L2OffsetMask; off != 0 {
				return c.incRefs(res, refs, off, c.cs)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// chkBitmapEntryBad is QEMU's check_table_entry for bitmap tables.
func chkBitmapEntryBad(e, cs uint64) bool {
	const reserved = 0xff000000000001fe
	if e&reserved != 0 {
		return true
	}
	off := e & L2OffsetMask
	return off != 0 && (e&1 != 0 || off&(cs-1) != 0)
}

// loadBitmapList reads the bitmap directory the way QEMU's
// bitmap_list_load does for a check (no repair): it fails with EINVAL on
// anything QEMU refuses.
func (c *chkState) loadBitmapList() ([]Bitmap, error) {
	size := c.bitmapDirSize
	if size == 0 || size > MaxBitmapDirectorySize {
		return nil, unix.EINVAL
	}
	// An entry is at most 2 KiB; one that starts past the end of the file
	// reads as zeros, which no valid entry is. So a directory reaching that
	// far is broken, and reading it all would only cost memory.
	if c.inFile(c.bitmapDirOffset, size)+2048 < size {
		return nil, unix.EINVAL
	}
	dir := make([]byte, size)
	if err := c.pread(c.bitmapDirOffset, dir); err != nil {
		return nil, err
	}
	var out []Bitmap
	off := uint64(0)
	for off < size {
		if size-off < bitmapEntryFixed || len(out) >= int(c.nbBitmaps) {
			return nil, unix.EINVAL
		}
		e := dir[off:]
		b, nameSize, extra := decodeBitmapEntry(e)
		entSize := roundUp8(bitmapEntryFixed + nameSize + extra)
		if entSize > size-off || extra != 0 {
			return nil, unix.EINVAL
		}
		phys := uint64(b.TableSize) * c.cs
		if b.TableSize == 0 || b.TableOffset == 0 || b.TableOffset&(c.cs-1) != 0 ||
			b.TableSize > MaxBitmapTableEntries || b.GranularityBits > MaxBitmapGranularity ||
			b.GranularityBits < MinBitmapGranularity || b.Flags&bitmapReservedFlags != 0 ||
			nameSize > MaxBitmapNameSize || b.Type != BitmapTypeDirtyTracking ||
			phys > maxBitmapPhysSize || !b.InUse() && c.diskSize > (phys*8)<<b.GranularityBits {
			// An in-use bitmap may be too small for the disk: it was
			// not saved after a resize, and is unreliable anyway.
			return nil, unix.EINVAL
		}
		b.Name = string(e[bitmapEntryFixed : bitmapEntryFixed+nameSize])
		out = append(out, b)
		off += entSize
	}
	if len(out) != int(c.nbBitmaps) {
		return nil, unix.EINVAL
	}
	return out, nil
}

// checkRefblocks checks the refcount table entries and counts the refcount
// blocks (check_refblocks). A block outside the image is repaired by growing
// the file to include it; entries it cannot use make rebuild true.
func (c *chkState) checkRefblocks(res *chkCounts, refs *chkRefs, rebuild *bool) error {
	for i, e := range c.img.reftable {
		off := e & RefTableOffsetMask
		cluster := off >> c.g.ClusterBits
		if e&RefTableReservedMask != 0 {
			c.msg("ERROR refcount table entry %d has reserved bits set", i)
			res.corruptions++
			*rebuild = true
			continue
		}
		if off&(c.cs-1) != 0 {
			c.msg("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			res.corruptions++
			*rebuild = true
			continue
		}
		if cluster >= refs.n {
			res.corruptions++
			c.msg("%s refcount block %d is outside image", c.repairWord(), i)
			if c.fix&FixErrors == 0 {
				continue
			}
			err := c.growFileTo(off)
			if err == nil {
				if err := refs.resize(max(refs.n, c.sizeToClusters(c.fileLen()))); err != nil {
					res.checkErrors++
					return err
				}
				if cluster >= refs.n {
					err = unix.EINVAL
				}
			}
			if err != nil {
				*rebuild = true
				c.msg("ERROR could not resize image: %s", uring.Strerror(errnoOf(err)))
				continue
			}
			res.corruptions--
			res.corruptionsFixed++
			if err := c.incRefs(res, refs, off, c.cs); err != nil {
				return err
			}
			continue
		}
		if off != 0 {
			if err := c.incRefs(res, refs, off, c.cs); err != nil {
				return err
			}
			if rc := refs.get(cluster); rc != 1 {
				c.msg("ERROR refcount block %d refcount=%d", i, rc)
				res.corruptions++
				*rebuild = true
			}
		}
	}
	return nil
}

// calculateRefcounts fills refs with the references to every cluster
// (calculate_refcounts).
func (c *chkState) calculateRefcounts(res *chkCounts, refs *chkRefs, rebuild *bool) error {
	c.l2Stale = true
	if err := c.incRefs(res, refs, 0, c.cs); err != nil {
		return err
	}
	if err := c.checkL1(res, refs, c.img.l1Offset, uint32(len(c.img.l1)), chkFragInfo, true); err != nil {
		return err
	}
	if c.dataFile && c.h.NbSnapshots != 0 {
		c.msg("ERROR %d snapshots in image with data file", c.h.NbSnapshots)
		res.corruptions++
	}
	for _, s := range c.img.snapshots {
		if s.L1TableOffset&(c.cs-1) != 0 {
			c.msg("ERROR snapshot %s (%s) l1_offset=%s: L1 table is not cluster aligned; snapshot table entry corrupted",
				s.ID, s.Name, chex(s.L1TableOffset))
			res.corruptions++
			continue
		}
		if uint64(s.L1Size) > MaxL1TableBytes/8 {
			c.msg("ERROR snapshot %s (%s) l1_size=%s: L1 table is too large; snapshot table entry corrupted",
				s.ID, s.Name, chex(uint64(s.L1Size)))
			res.corruptions++
			continue
		}
		if err := c.checkL1(res, refs, s.L1TableOffset, s.L1Size, 0, false); err != nil {
			return err
		}
	}
	if err := c.incRefs(res, refs, c.h.SnapshotsOffset, c.img.snapTableSize); err != nil {
		return err
	}
	if err := c.incRefs(res, refs, c.img.rtOffset, uint64(len(c.img.reftable))*8); err != nil {
		return err
	}
	if cr := c.h.Crypto; cr != nil && cr.Length != 0 {
		if err := c.incRefs(res, refs, cr.Offset, cr.Length); err != nil {
			return err
		}
	}
	if err := c.checkBitmaps(res, refs); err != nil {
		return err
	}
	return c.checkRefblocks(res, refs, rebuild)
}

// compareRefcounts compares the stored refcount of every cluster with refs
// and, as fix allows, corrects it (compare_refcounts). A stored refcount of
// zero for a used cluster cannot be corrected in place: it sets rebuild.
func (c *chkState) compareRefcounts(res *chkCounts, fix FixMode, rebuild *bool, highest *uint64, refs *chkRefs) {
	*highest = 0
	for i := uint64(0); i < refs.n; i++ {
		stored, err := c.img.getRefcountLocked(c.co, i)
		if err != nil {
			c.msg("Can't get refcount for cluster %d: %s", i, uring.Strerror(errnoOf(err)))
			res.checkErrors++
			continue
		}
		want := refs.get(i)
		if stored > 0 || want > 0 {
			*highest = i
		}
		if stored == want {
			continue
		}
		var fixed *int
		switch {
		case stored == 0:
			*rebuild = true
		case stored > want && fix&FixLeaks != 0:
			fixed = &res.leaksFixed
		case stored < want && fix&FixErrors != 0:
			fixed = &res.corruptionsFixed
		}
		word := "Leaked"
		switch {
		case fixed != nil:
			word = "Repairing"
		case stored < want:
			word = "ERROR"
		}
		c.msg("%s cluster %d refcount=%d reference=%d", word, i, stored, want)
		if fixed != nil {
			diff, dec := want-stored, false
			if stored > want {
				diff, dec = stored-want, true
			}
			if err := c.img.updateRefcountLocked(c.co, i<<c.g.ClusterBits, 1, diff, dec, discardAlways); err == nil {
				*fixed++
				continue
			}
		}
		if stored < want {
			res.corruptions++
		} else {
			res.leaks++
		}
	}
	// Clusters freed are discarded (QCOW2_DISCARD_ALWAYS).
	c.img.processDiscardsLocked(c.co)
}

// checkRefcounts is qcow2_check_refcounts: count, compare, repair or
// rebuild, then check the COPIED flags.
func (c *chkState) checkRefcounts(res *chkCounts) error {
	size := c.fileLen()
	nb := c.sizeToClusters(size)
	if nb > chkMaxClusters {
		res.checkErrors++
		return unix.EFBIG
	}
	res.total = int64(c.sizeToClusters(c.diskSize))

	refs := &chkRefs{g: c.g, cs: c.cs}
	if err := refs.resize(nb); err != nil {
		res.checkErrors++
		return err
	}
	rebuild := false
	if err := c.calculateRefcounts(res, refs, &rebuild); err != nil {
		return err
	}

	// Without a rebuild, a repair compares again with fixing enabled and
	// the first comparison's counts are dropped.
	pre := *res
	var highest uint64
	c.compareRefcounts(res, 0, &rebuild, &highest, refs)

	if rebuild && c.fix&FixErrors != 0 {
		old := *res
		freshLeaks := 0
		c.msg("Rebuilding refcount structure")
		if err := c.rebuildRefcountStructure(res, refs); err != nil {
			return err
		}
		res.corruptions, res.leaks = 0, 0
		// The old refcount structure is gone: count again.
		rebuild = false
		clear(refs.buf)
		if err := c.calculateRefcounts(res, refs, &rebuild); err != nil {
			return err
		}
		if c.fix&FixLeaks != 0 {
			// The old refcount structures are now leaked; fix that. Leaks
			// that remain were made by the rebuild.
			saved := *res
			*res = chkCounts{}
			c.compareRefcounts(res, FixLeaks, &rebuild, &highest, refs)
			if rebuild {
				c.msg("ERROR rebuilt refcount structure is still broken")
			}
			freshLeaks = res.leaks
			*res = saved
		}
		if res.corruptions < old.corruptions {
			res.corruptionsFixed += old.corruptions - res.corruptions
		}
		if res.leaks < old.leaks {
			res.leaksFixed += old.leaks - res.leaks
		}
		res.leaks += freshLeaks
	} else if c.fix != 0 {
		if rebuild {
			c.msg("ERROR need to rebuild refcount structures")
			res.checkErrors++
			return unix.EIO
		}
		if res.leaks != 0 || res.corruptions != 0 {
			*res = pre
			c.compareRefcounts(res, c.fix, &rebuild, &highest, refs)
		}
	}
	if err := c.checkOflagCopied(res); err != nil {
		return err
	}
	res.imageEndOffset = int64((highest + 1) * c.cs)
	return nil
}

// checkOflagCopied checks the COPIED flag of every entry of the active L1
// table and its L2 tables against the stored refcounts, and repairs it when
// fixing errors, or when fixing leaks left the refcounts accurate
// (check_oflag_copied).
func (c *chkState) checkOflagCopied(res *chkCounts) error {
	var repair bool
	switch {
	case c.fix&FixErrors != 0:
		repair = true
	case c.fix&FixLeaks != 0:
		repair = res.checkErrors == 0 && res.corruptions == 0 && res.leaks == 0
	}
	word := "ERROR"
	if repair {
		word = "Repairing"
	}
	c.l2Stale = true
	g := c.g
	esz := g.L2EntrySize()
	for i := range c.img.l1 {
		e := c.img.l1[i]
		l2 := e & L1OffsetMask
		if l2 == 0 {
			continue
		}
		rc, err := c.img.getRefcountLocked(c.co, l2>>c.g.ClusterBits)
		if err != nil {
			continue // reported by the comparison already
		}
		if (rc == 1) != (e&OflagCopied != 0) {
			res.corruptions++
			c.msg("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", word, i, e, rc)
			if repair {
				ne := e &^ OflagCopied
				if rc == 1 {
					ne |= OflagCopied
				}
				c.img.l1[i] = ne
				if err := c.img.writeL1EntryLocked(c.co, uint64(i)); err != nil {
					c.img.l1[i] = e
					res.checkErrors++
					return err
				}
				res.corruptions--
				res.corruptionsFixed++
			}
		}

		table, err := c.l2Table(l2)
		if err != nil {
			c.msg("ERROR: Could not read L2 table: %s", uring.Strerror(errnoOf(err)))
			res.checkErrors++
			return err
		}
		n := uint64(len(table)) / esz
		dirty := 0
		for j := range int(n) {
			le := be.Uint64(table[uint64(j)*esz:])
			if le == 0 {
				continue
			}
			if t := g.ClusterType(le); t != ClusterNormal && t != ClusterZeroAlloc {
				continue
			}
			rc := uint64(1)
			if !c.dataFile {
				if rc, err = c.img.getRefcountLocked(c.co, (le&L2OffsetMask)>>c.g.ClusterBits); err != nil {
					continue
				}
			}
			if (rc == 1) != (le&OflagCopied != 0) {
				res.corruptions++
				c.msg("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", word, le, rc)
				if repair {
					ne := le &^ OflagCopied
					if rc == 1 {
						ne |= OflagCopied
					}
					be.PutUint64(table[uint64(j)*esz:], ne)
					dirty++
				}
			}
		}
		if dirty > 0 {
			c.l2Stale = true // until written
			if err := c.img.checkOverlapLocked(c.co, l2, c.cs, mkActiveL2); err != nil {
				c.msg("ERROR: Could not write L2 table; metadata overlap check failed: %s", uring.Strerror(unix.EIO))
				res.checkErrors++
				return unix.EIO
			}
			if err := c.file.Pwritev(c.co, int64(l2), bdrv.IOVec{table}, 0); err != nil {
				c.msg("ERROR: Could not write L2 table: %s", uring.Strerror(errnoOf(err)))
				res.checkErrors++
				return err
			}
			c.l2Stale = false
			res.corruptions -= dirty
			res.corruptionsFixed += dirty
		}
	}
	return nil
}
