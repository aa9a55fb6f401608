package qcow2

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/lukscrypto"
)

// The driver (this file and cache.go, cluster.go, refcount.go, read.go,
// write.go, compress.go, create.go) follows QEMU's block/qcow2*.c split.
//
// Locking follows QEMU's s->lock discipline: Image.meta is held only while
// mapping guest offsets, allocating clusters and updating metadata (which
// may yield for metadata I/O); guest data I/O — reads, writes, copy-on-write,
// backing-file reads, compression — runs with it released. Helpers named
// ...Locked are called with meta held; others are called unlocked.

func init() {
	bdrv.Register(&bdrv.Format{
		Name:             "qcow2",
		Probe:            probe,
		Open:             open,
		Create:           create,
		CreateOptions:    createOptionSpecs,
		SupportsBacking:  true,
		StrongOptions:    []string{OptKeySecret},
		CompressedWrites: true,
		Check:            Check,
		Measure:          measure,
	})
}

// Runtime (open) options understood by the driver, named as QEMU's.
const (
	// OptLazyRefcounts overrides the image's lazy refcounts bit.
	OptLazyRefcounts = "lazy-refcounts"
	// OptDataFile names the external data file when the image does not.
	OptDataFile = "data-file"
	// OptPassDiscardRequest passes guest discards of freed clusters down to
	// the file (default on, since a node only sees discards when the device
	// was configured to unmap).
	OptPassDiscardRequest = "pass-discard-request"
	// OptPassDiscardOther discards clusters freed for other reasons (copy
	// on write of shared clusters, L2 table copies); default off.
	OptPassDiscardOther = "pass-discard-other"
	// OptCrashSafeMetadata (bdrv's) writes the metadata a request changed
	// back to the image file before the request completes; default off.
	// See syncMetadata.
	OptCrashSafeMetadata = bdrv.OptCrashSafeMetadata
)

// probe recognises a qcow2 header (QEMU's qcow2_probe).
func probe(head []byte, _ string) int {
	if len(head) >= HeaderLengthV2 && be.Uint32(head) == Magic && be.Uint32(head[4:]) >= 2 {
		return 100
	}
	return 0
}

// metaKind names a kind of metadata for the overlap check (QEMU's
// QCOW2_OL_* bits).
type metaKind uint8

// Kinds of metadata in QEMU's order: when a write overlaps several, the
// first one is named.
const (
	mkNone metaKind = iota
	mkHeader
	mkActiveL1
	mkActiveL2
	mkRefTable
	mkRefBlock
	mkSnapTable
	mkInactiveL1
	mkBitmapDir
)

var metaKindNames = [...]string{"", "qcow2_header", "active L1 table", "active L2 table",
	"refcount table", "refcount block", "snapshot table", "inactive L1 table", "bitmap directory"}

// metaSet is a set of metaKinds, one bit each.
type metaSet uint16

func (k metaKind) String() string { return metaKindNames[k] }

// discardType says why a cluster is freed (QEMU's enum qcow2_discard_type),
// which decides whether the freed range is discarded in the file.
type discardType uint8

const (
	discardNever discardType = iota
	discardAlways
	discardRequest
	discardSnapshot
	discardOther
)

// Image is an open qcow2 image: the driver of a qcow2 node. Besides the I/O
// of bdrv.Driver it has the image capabilities bdrv defines for the verbs
// (info, snapshots, amend, bitmaps, make-empty, backing file changes);
// nothing outside this package needs its type.
type Image struct {
	node *bdrv.Node
	// file is the protocol node holding the image; data holds guest data:
	// file itself, or the external data file.
	file, data *bdrv.Node
	ownData    bool // data was opened here and is closed by Close

	g        Geometry
	cs       uint64 // cluster size
	readOnly bool
	lazy     bool // lazy refcounts in use
	// crashSafe is OptCrashSafeMetadata; set at open.
	crashSafe bool
	// passDiscard says which freed clusters are discarded in the file.
	passDiscard [discardOther + 1]bool
	l2SliceSize uint64 // bytes of one L2 cache entry
	l2SliceEnts uint64 // L2 entries in one slice

	// meta guards everything below: the header copy, the L1 table, the
	// refcount table, both caches, the allocation cursors, the in-flight
	// allocations, the snapshot table and the metadata map used by the
	// overlap check.
	meta coroutine.Mutex

	// hdr is the current header, kept in sync with the disk. Its feature
	// words change under meta and hdrMu; Header() reads under hdrMu alone.
	hdr       *Header
	hdrMu     sync.Mutex
	l1        []uint64
	l1Offset  uint64
	reftable  []uint64
	rtOffset  uint64
	rtCluster uint32 // refcount_table_clusters

	l2Cache *cache
	rcCache *cache
	// counters are the figures Counters reports besides the caches'.
	counters struct{ clustersAllocated, cowBytes bdrv.StatCounter }
	// metaDirty is set (under meta) when a cache entry becomes dirty and
	// cleared once both caches were written back; read without the lock
	// so that a request that changed no metadata does not take it again.
	metaDirty atomic.Bool

	freeClusterIndex uint64
	freeByteOffset   uint64 // next byte for compressed data, 0 = none
	inflight         []*l2Meta
	discards         []pendingDiscard

	snapshots     []Snapshot
	snapTableSize uint64
	// metaClusters maps the cluster index of every active L2 table and
	// refcount block to its kinds; the tables with ranges (header, L1,
	// refcount table, snapshot table and L1s) are checked separately.
	metaClusters map[uint64]metaSet

	// dirtyOnDisk is the dirty bit as written in the header.
	dirtyOnDisk bool
	// corrupt is set once corruption was found in a writable image: all
	// further requests fail. Read without the lock by every request.
	corrupt atomic.Bool

	preallocChecked, metadataPrealloc bool

	// ccache holds recently decompressed clusters (its own lock).
	ccache clusterCache

	// bm holds the persistent dirty bitmaps (bitmap_rw.go).
	bm bitmapState

	// crypt is the encryption of guest data (crypt.go); set at open.
	crypt cryptState

	// chk is set while the image is open for Check (check.go): the
	// refcount primitives then read refcount structures as leniently as
	// QEMU's do, and corruption is reported as QEMU's lines.
	chk *chkState
}

// Header returns a copy of the image header as currently on disk.
func (img *Image) Header() Header {
	img.hdrMu.Lock()
	defer img.hdrMu.Unlock()
	return *img.hdr
}

// Snapshots returns the internal snapshot table as read at open.
func (img *Image) Snapshots() []Snapshot { return slices.Clone(img.snapshots) }

// setFeatures updates the header's feature words in memory after they were
// written. Called with meta held.
func (img *Image) setFeaturesLocked(incompat, autoclear uint64) {
	img.hdrMu.Lock()
	img.hdr.IncompatibleFeatures = incompat
	img.hdr.AutoclearFeatures = autoclear
	img.hdrMu.Unlock()
}

// ioError is the error of a request that failed because of corrupt
// metadata: it matches unix.EIO (the completion result) and carries the
// *CorruptError that names what is wrong.
type ioError struct {
	errno unix.Errno
	cause error
}

func (e *ioError) Error() string   { return e.cause.Error() }
func (e *ioError) Unwrap() []error { return []error{e.errno, e.cause} }

// errImageCorrupt fails every request after corruption was found.
var errImageCorrupt = &ioError{unix.EIO, errors.New("qcow2: image marked corrupt; further I/O refused")}

func open(co *coroutine.Co, n *bdrv.Node, opts bdrv.Options) (bdrv.Driver, error) {
	img := &Image{node: n, file: n.File, readOnly: n.ReadOnly, metaClusters: map[uint64]metaSet{}}
	if err := img.openLocked(co, opts, false); err != nil {
		if img.ownData && img.data != nil {
			img.data.Close(co)
		}
		return nil, err
	}
	return img, nil
}

// tableChunk is the unit in which tables are read: a table costs its own
// size in memory, not twice that.
const tableChunk = 1 << 20

// readTable reads a table of n big-endian 64-bit entries at off. Entries
// past the end of the file are zero, as the file reads there (only a check
// opens an image whose tables reach that far).
func (img *Image) readTable(co *coroutine.Co, off, n uint64) ([]uint64, error) {
	t := make([]uint64, n)
	have := uint64(0)
	if flen := uint64(max(img.file.Length(), 0)); off < flen {
		have = min(n, (flen-off)/8)
	}
	buf := bdrv.AlignedBuffer(int(min(have*8, tableChunk)), 4096)
	for i := uint64(0); i < have; {
		k := min(have-i, uint64(len(buf))/8)
		if err := img.file.Preadv(co, int64(off+i*8), bdrv.IOVec{buf[:k*8]}, 0); err != nil {
			return nil, err
		}
		for j := range k {
			t[i+j] = be.Uint64(buf[j*8:])
		}
		i += k
	}
	return t, nil
}

// readFile reads n bytes at off from the image file into a new buffer.
func (img *Image) readFile(co *coroutine.Co, off, n uint64) ([]byte, error) {
	buf := bdrv.AlignedBuffer(int(n), 4096)
	if err := img.file.Preadv(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
		return nil, err
	}
	return buf, nil
}

// openLocked reads and validates the header and the tables every request
// needs. It runs before the node is visible to anyone, so it needs no lock;
// it is named ...Locked because the helpers it calls expect meta held.
func (img *Image) openLocked(co *coroutine.Co, opts bdrv.Options, repaired bool) error {
	flen := img.file.Length()
	if flen < HeaderLengthV2 {
		return fmt.Errorf("qcow2: image file too short for a header (%d bytes)", flen)
	}
	// Read the header cluster, and no more: reading guest data here would
	// also change what SEEK_HOLE reports for unwritten extents.
	head, err := img.readFile(co, 0, min(uint64(flen), 4096))
	if err != nil {
		return fmt.Errorf("qcow2: reading header: %w", err)
	}
	if cb := be.Uint32(head[20:]); cb > 12 && cb <= MaxClusterBits { // head holds >= 72 bytes
		if head, err = img.readFile(co, 0, min(uint64(flen), uint64(1)<<cb)); err != nil {
			return fmt.Errorf("qcow2: reading header: %w", err)
		}
	}
	h, err := ParseHeader(head, flen)
	if err != nil {
		return openHeaderError(err)
	}
	img.hdr = h
	img.g = h.Geometry()
	img.cs = img.g.ClusterSize()

	if !img.readOnly && h.Corrupt() {
		return errors.New("qcow2: Image is corrupt; cannot be opened read/write")
	}
	if !img.readOnly && h.Dirty() && !repaired {
		// Refcounts were left stale by lazy refcounts: rebuild them
		// before trusting them, then read everything again (QEMU's
		// qcow2_do_open repairs dirty images the same way, with one
		// pass of the check and no second one to confirm).
		res, err := checkPass(co, img.file, FixAll, CheckEvents{})
		if err == nil && res.CheckErrors > 0 {
			err = unix.EIO
		}
		if err != nil {
			return fmt.Errorf("Could not repair dirty image: %w", err)
		}
		return img.openLocked(co, opts, true)
	}
	if err := img.openCrypto(co, opts); err != nil {
		return err
	}
	img.dirtyOnDisk = h.Dirty()
	img.lazy = opts.Bool(OptLazyRefcounts, h.LazyRefcounts())
	if img.lazy && h.Version < 3 {
		return errors.New("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
	}
	img.passDiscard[discardAlways] = true
	img.passDiscard[discardRequest] = opts.Bool(OptPassDiscardRequest, true)
	img.passDiscard[discardSnapshot] = true
	img.passDiscard[discardOther] = opts.Bool(OptPassDiscardOther, false)
	img.crashSafe = opts.Bool(OptCrashSafeMetadata, false) && !img.readOnly

	// Active L1 table; ParseHeader bounded its size and checked that it
	// lies inside the file.
	img.l1Offset = h.L1TableOffset
	if img.l1, err = img.readTable(co, h.L1TableOffset, uint64(h.L1Size)); err != nil {
		return fmt.Errorf("qcow2: reading L1 table at %#x: %w", h.L1TableOffset, err)
	}
	// Refcount table (at most 8 MiB, inside the file).
	img.rtOffset, img.rtCluster = h.RefcountTableOffset, h.RefcountTableClusters
	if img.reftable, err = img.readTable(co, h.RefcountTableOffset, uint64(h.RefcountTableClusters)*img.cs/8); err != nil {
		return fmt.Errorf("qcow2: reading refcount table at %#x: %w", h.RefcountTableOffset, err)
	}
	if err := img.readSnapshots(co); err != nil {
		return err
	}
	img.buildMetadataMap()

	l2n, l2sz, rcn, err := cacheSizes(opts, img.g, h.Size)
	if err != nil {
		return err
	}
	img.l2SliceSize = uint64(l2sz)
	img.l2SliceEnts = img.l2SliceSize / img.g.L2EntrySize()
	img.l2Cache = newCache(img, "L2 table", mkActiveL2, l2n, l2sz)
	img.rcCache = newCache(img, "refcount block", mkRefBlock, rcn, int(img.cs))

	if err := img.openDataFile(co, opts); err != nil {
		return err
	}
	img.node.BackingFile = h.BackingFile
	img.node.BackingFormat = h.BackingFormat
	if h.Size > math.MaxInt64 {
		return fmt.Errorf("qcow2: size %d too large", h.Size)
	}
	img.node.SetLength(int64(h.Size))

	if !img.readOnly {
		// An implementation must clear the autoclear bits of features it
		// does not maintain before it writes.
		keep := h.AutoclearFeatures & AutoclearKnown
		if keep != h.AutoclearFeatures && h.Version >= 3 {
			if err := img.writeHeaderU64(co, 88, keep); err != nil {
				return fmt.Errorf("qcow2: clearing autoclear features: %w", err)
			}
			img.setFeaturesLocked(h.IncompatibleFeatures, keep)
		}
		if err := img.openBitmapsLocked(co); err != nil {
			return err
		}
	}
	return nil
}

// errNoDataFile fails guest I/O of an image with an external data file
// opened for metadata only.
var errNoDataFile = &ioError{unix.EIO, errors.New("qcow2: image opened for metadata only: its data file is not open")}

// openDataFile opens the external data file the image names (or the
// data-file option), or takes the image file itself as the data file.
// A metadata-only open (bdrv.Spec.NoIO: qemu-img info) never opens it, as
// QEMU since its fix for CVE-2024-4467: info must be safe on an image
// whose data file names any file at all, and needs none of its content.
// img.data is then nil and guest I/O fails (checkIO).
func (img *Image) openDataFile(co *coroutine.Co, opts bdrv.Options) error {
	h := img.hdr
	img.data = img.file
	if img.node.NoIO {
		if h.HasDataFile() {
			img.data = nil
		}
		return nil
	}
	if !h.HasDataFile() {
		if opts.Has(OptDataFile) {
			return errors.New("'data-file' can only be set for images with an external data file")
		}
		return nil
	}
	name := opts.String(OptDataFile, h.DataFile)
	if name == "" {
		return errors.New("'data-file' is required for this image")
	}
	dopts := bdrv.Options{}
	for _, k := range []string{"locking", "force-share"} {
		if v, ok := opts[k]; ok {
			dopts[k] = v
		}
	}
	// QEMU 7.2 opens a relative data file name relative to the current
	// directory, not to the image; take that if it exists, else the
	// image's directory.
	fname := name
	if _, err := os.Stat(name); err != nil && !filepath.IsAbs(name) {
		if alt := bdrv.ResolveBacking(img.node.Filename, name); alt != name {
			if _, err := os.Stat(alt); err == nil {
				fname = alt
			}
		}
	}
	d, err := bdrv.Open(co, bdrv.Spec{
		Filename: fname,
		Format:   "file",
		Options:  dopts,
		Cache:    img.node.Cache,
		ReadOnly: img.readOnly,
	})
	if err != nil {
		return fmt.Errorf("Could not open data file: %w", err)
	}
	img.data, img.ownData = d, true
	return nil
}

// readSnapshots reads and parses the snapshot table, which is kept as read
// (QEMU also only checks it fully when a snapshot is used).
func (img *Image) readSnapshots(co *coroutine.Co) error {
	h := img.hdr
	if h.NbSnapshots == 0 {
		return nil
	}
	flen := uint64(img.file.Length())
	avail := min(flen-min(flen, h.SnapshotsOffset), MaxSnapshotTableSize+8)
	// Walk the entries to learn the table size, reading in chunks, so a
	// small table costs a small read.
	var buf []byte
	ensure := func(n uint64) error {
		if n <= uint64(len(buf)) {
			return nil
		}
		if n > avail {
			return nil // ParseSnapshotTable reports the truncation
		}
		want := min(avail, max(n, uint64(len(buf))*2, 64<<10))
		b, err := img.readFile(co, h.SnapshotsOffset, want)
		if err != nil {
			return fmt.Errorf("qcow2: reading snapshot table at %#x: %w", h.SnapshotsOffset, err)
		}
		buf = b
		return nil
	}
	off := uint64(0)
	for i := uint32(0); i < h.NbSnapshots; i++ {
		off = (off + 7) &^ 7
		if err := ensure(off + SnapshotHeaderSize); err != nil {
			return err
		}
		if off+SnapshotHeaderSize > uint64(len(buf)) {
			break
		}
		sz, err := SnapshotEntrySize(buf[off:])
		if err != nil {
			return err
		}
		off += uint64(sz)
		if off > MaxSnapshotTableSize {
			break
		}
		if err := ensure(off); err != nil {
			return err
		}
	}
	snaps, size, err := ParseSnapshotTable(buf, h.NbSnapshots, h.Size)
	if err != nil {
		return err
	}
	img.snapshots, img.snapTableSize = snaps, uint64(size)
	return nil
}

// buildMetadataMap records the clusters of active L2 tables and refcount
// blocks for the overlap check. Entries are taken as QEMU's overlap check
// takes them, bad ones too: an unaligned table covers two clusters.
func (img *Image) buildMetadataMap() {
	img.addMetaTables(img.l1, L1OffsetMask, mkActiveL2)
	img.addMetaTables(img.reftable, RefTableOffsetMask, mkRefBlock)
}

// addMetaTables records the cluster-sized tables that the entries of an L1
// or refcount table (offsets under mask) point to as metadata of kind k.
func (img *Image) addMetaTables(entries []uint64, mask uint64, k metaKind) {
	for _, e := range entries {
		if off := e & mask; off != 0 {
			img.addMeta(off/img.cs, k)
			if off%img.cs != 0 {
				img.addMeta(off/img.cs+1, k)
			}
		}
	}
}

// addMeta records that host cluster c holds metadata of kind k.
func (img *Image) addMeta(c uint64, k metaKind) { img.metaClusters[c] |= 1 << k }

// dropMeta records that host cluster c no longer holds metadata of kind k.
func (img *Image) dropMeta(c uint64, k metaKind) {
	if s := img.metaClusters[c] &^ (1 << k); s != 0 {
		img.metaClusters[c] = s
	} else {
		delete(img.metaClusters, c)
	}
}

// checkOverlapLocked refuses a write of size bytes at host offset off that
// would hit metadata other than ignore (QEMU's
// qcow2_pre_write_overlap_check with the "cached" template: everything but
// inactive L2 tables). A hit means the image's metadata is inconsistent: it
// is marked corrupt. Called with meta held.
func (img *Image) checkOverlapLocked(co *coroutine.Co, off, size uint64, ignore metaKind) error {
	hit := img.overlapLocked(off, size, ignore)
	if hit == mkNone {
		return nil
	}
	return img.signalCorruptionLocked(co, &CorruptError{
		What:  fmt.Sprintf("Preventing invalid write on metadata (overlaps with %s)", hit),
		Table: "write", Offset: off, Index: -1,
	})
}

// overlapLocked returns the kind of metadata other than ignore that host
// range [off, off+size), widened to whole clusters, overlaps, or mkNone
// (QEMU's qcow2_check_metadata_overlap); of several, the first in QEMU's
// order.
func (img *Image) overlapLocked(off, size uint64, ignore metaKind) metaKind {
	if size == 0 {
		return mkNone
	}
	cs := img.cs
	end := satAdd(off, size)
	off &^= cs - 1
	end = satAdd(end, cs-1) &^ (cs - 1)
	var hits metaSet
	add := func(k metaKind, start, n uint64) {
		if n > 0 && start < end && off < satAdd(start, n) {
			hits |= 1 << k
		}
	}
	add(mkHeader, 0, cs)
	add(mkActiveL1, img.l1Offset, uint64(len(img.l1))*8)
	add(mkRefTable, img.rtOffset, uint64(img.rtCluster)*cs)
	add(mkSnapTable, img.hdr.SnapshotsOffset, img.snapTableSize)
	for _, s := range img.snapshots {
		add(mkInactiveL1, s.L1TableOffset, uint64(s.L1Size)*8)
	}
	if b := img.hdr.Bitmaps; img.chk != nil && b != nil && img.hdr.AutoclearFeatures&AutoclearBitmaps != 0 {
		// Only for Check so far: the bitmap code rewrites the
		// directory in place without telling the overlap check.
		add(mkBitmapDir, b.DirectoryOffset, b.DirectorySize)
	}
	first, last := off/cs, (end-1)/cs
	if last-first < uint64(len(img.metaClusters)) {
		for c := first; c <= last; c++ {
			hits |= img.metaClusters[c]
		}
	} else {
		for c, k := range img.metaClusters {
			if c >= first && c <= last {
				hits |= k
			}
		}
	}
	hits &^= 1<<ignore | 1<<mkNone
	if hits == 0 {
		return mkNone
	}
	return metaKind(bits.TrailingZeros16(uint16(hits)))
}

func satAdd(a, b uint64) uint64 {
	if a > math.MaxUint64-b {
		return math.MaxUint64
	}
	return a + b
}

// signalCorruptionLocked reports corrupt metadata (QEMU's
// qcow2_signal_corruption): in a writable image it sets the corrupt bit
// and fails every later request; either way the request fails with EIO
// and an error naming the problem. Called with meta held.
func (img *Image) signalCorruptionLocked(co *coroutine.Co, ce *CorruptError) error {
	if img.chk != nil {
		img.chk.signalCorruption(ce.What)
		return &ioError{unix.EIO, ce}
	}
	if !img.readOnly && !img.corrupt.Load() {
		img.corrupt.Store(true)
		if img.hdr.Version >= 3 {
			f := img.hdr.IncompatibleFeatures | IncompatCorrupt
			if err := img.writeHeaderU64(co, 72, f); err == nil {
				img.setFeaturesLocked(f, img.hdr.AutoclearFeatures)
			}
		}
		ce.What += "; further corruption events will be suppressed"
	}
	return &ioError{unix.EIO, ce}
}

// corruptL2 builds the corruption error for an L2 entry.
func (img *Image) corruptL2Locked(co *coroutine.Co, l2Off uint64, index uint64, format string, args ...any) error {
	return img.signalCorruptionLocked(co, &CorruptError{What: fmt.Sprintf(format, args...),
		Table: "L2 table", Offset: l2Off, Index: int64(index)})
}

// asCorruption turns an error from the on-disk layer into a corruption
// signal when it is one.
func (img *Image) asCorruptionLocked(co *coroutine.Co, err error) error {
	var ce *CorruptError
	if errors.As(err, &ce) {
		return img.signalCorruptionLocked(co, ce)
	}
	return err
}

// writeHeaderU64 writes one 64-bit header field and flushes (QEMU's
// bdrv_pwrite_sync of a single field).
func (img *Image) writeHeaderU64(co *coroutine.Co, off int64, v uint64) error {
	buf := bdrv.AlignedBuffer(8, 8)
	be.PutUint64(buf, v)
	if err := img.file.Pwritev(co, off, bdrv.IOVec{buf}, 0); err != nil {
		return err
	}
	return img.file.Flush(co)
}

// markDirtyLocked sets the dirty bit before the first refcount update that
// lazy refcounts defer (QEMU's qcow2_mark_dirty). Called with meta held.
func (img *Image) markDirtyLocked(co *coroutine.Co) error {
	if img.dirtyOnDisk {
		return nil
	}
	f := img.hdr.IncompatibleFeatures | IncompatDirty
	if err := img.writeHeaderU64(co, 72, f); err != nil {
		return err
	}
	img.setFeaturesLocked(f, img.hdr.AutoclearFeatures)
	img.dirtyOnDisk = true
	return nil
}

// needAccurateRefcounts reports whether refcounts must reach the disk before
// the L2 entries that rely on them: always, unless the dirty bit says they
// will be rebuilt anyway.
func (img *Image) needAccurateRefcountsLocked() bool { return !img.dirtyOnDisk }

// flushFilesLocked flushes the image file and the external data file, for a
// cache that depends on a flush.
func (img *Image) flushFilesLocked(co *coroutine.Co) error {
	if img.data != nil && img.data != img.file {
		if err := img.data.Flush(co); err != nil {
			return err
		}
	}
	return img.file.Flush(co)
}

// writeCachesLocked writes both caches back in dependency order (QEMU's
// qcow2_write_caches). Called with meta held.
func (img *Image) writeCachesLocked(co *coroutine.Co) error {
	if err := img.l2Cache.writeLocked(co); err != nil {
		return err
	}
	if err := img.rcCache.writeLocked(co); err != nil {
		return err
	}
	// Cleared only now: a request that finds it clear must not complete
	// while the write-back of its metadata is still under way. Nothing
	// dirtied an entry meanwhile: that takes meta.
	img.metaDirty.Store(false)
	return nil
}

// Flush implements bdrv.Driver: write the metadata caches back (the
// generic layer then syncs the image file) and sync an external data file.
func (img *Image) Flush(co *coroutine.Co) error {
	if img.readOnly {
		return nil
	}
	if img.data != nil && img.data != img.file {
		if err := img.data.Flush(co); err != nil {
			return err
		}
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if img.corrupt.Load() {
		return errImageCorrupt
	}
	return img.writeCachesLocked(co)
}

// Close implements bdrv.Driver: write everything back and mark the image
// clean (QEMU's qcow2_close / qcow2_mark_clean).
func (img *Image) Close(co *coroutine.Co) error {
	var errs []error
	if !img.readOnly && !img.corrupt.Load() {
		img.meta.Lock(co)
		errs = append(errs, img.storeBitmapsLocked(co))
		err := img.writeCachesLocked(co)
		if err == nil {
			err = img.file.Flush(co)
		}
		if err == nil && img.dirtyOnDisk {
			f := img.hdr.IncompatibleFeatures &^ IncompatDirty
			if err = img.writeHeaderU64(co, 72, f); err == nil {
				img.setFeaturesLocked(f, img.hdr.AutoclearFeatures)
				img.dirtyOnDisk = false
			}
		}
		img.meta.Unlock(co)
		errs = append(errs, err)
	}
	if img.ownData {
		errs = append(errs, img.data.Close(co))
		img.ownData = false
	}
	return errors.Join(errs...)
}

// RefreshLimits implements bdrv.LimitsRefresher: byte-granular requests
// (sector-granular in encrypted images); write-zeroes in subclusters and
// discard in clusters, as QEMU's qcow2_refresh_limits.
func (img *Image) RefreshLimits() bdrv.Limits {
	align := int64(1)
	if img.encrypted() {
		align = lukscrypto.SectorSize
	}
	return bdrv.Limits{
		RequestAlignment:      align,
		PwriteZeroesAlignment: int64(img.g.SubclusterSize()),
		PdiscardAlignment:     int64(img.cs),
	}
}

// SupportedWriteFlags implements bdrv.WriteFlagser: compressed writes are
// native; FUA is emulated with a flush by the generic layer.
func (img *Image) SupportedWriteFlags() bdrv.ReqFlags { return bdrv.ReqWriteCompressed }

// HasZeroInit implements bdrv.ZeroIniter: a new image reads as zeros unless
// the guest data lives in a raw data file that already has content.
func (img *Image) HasZeroInit() bool {
	if img.hdr.DataFileRaw() {
		return img.data != nil && img.data.HasZeroInit()
	}
	return true
}

// AllocatedSize implements bdrv.AllocatedSizer: the image file's, without
// an external data file, as qemu-img 7.2 reports it (info's disk size and
// actual-size).
func (img *Image) AllocatedSize(co *coroutine.Co) (int64, error) {
	return img.file.AllocatedSize(co), nil
}

// checkIO fails requests on an image found corrupt, or opened for metadata
// only without its data file.
func (img *Image) checkIO() error {
	if img.corrupt.Load() {
		return errImageCorrupt
	}
	if img.data == nil {
		return errNoDataFile
	}
	return nil
}
