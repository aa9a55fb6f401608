package qcow2

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Persistent dirty bitmaps maintained while the image is open read-write
// (QEMU's qcow2_load_dirty_bitmaps, qcow2_store_persistent_dirty_bitmaps and
// the tracking of block/dirty-bitmap.c).
//
// Life of a bitmap in a read-write open:
//
//	open:   directory parsed; the data of every bitmap not in use is read
//	        into a bitVec; enabled ("auto") bitmaps get in_use set in the
//	        directory on disk (in place, autoclear bit cleared around the
//	        rewrite) before the first guest write;
//	writes: WriteDone sets the granules of every write, write-zeroes and
//	        discard in each enabled bitmap (atomic ORs, no lock);
//	close:  changed bitmaps get new data clusters and tables, a new
//	        directory is written, refcounts flushed, the header switched to
//	        it (in_use clear) and flushed, and the old clusters freed.
//
// A crash in between leaves in_use set on disk: QEMU then reports the
// bitmap as inconsistent, which is the truth. Bitmaps found in use at open
// are inconsistent: their data is not read and their directory entry is
// kept as it is, so that only removing them changes them. Disabled bitmaps
// are not marked: their data cannot change, only a resize outdates them
// (Truncate marks them first). Unlike QEMU, which marks every bitmap, a
// crash therefore leaves disabled bitmaps usable.

// maxBitmapMemory bounds the bytes of bitmap data an open may hold for all
// bitmaps together (a hostile directory may list 65535 bitmaps of 512 MiB).
// It counts what the bitmaps may come to hold, every chunk allocated
// (bitVecBytes), which is checked whenever a bitmap is loaded, added or
// resized; nothing copies a bitmap (a resize keeps its chunks, an export
// is a view), so that count bounds what is allocated. QEMU loads the same
// bitmaps whole (HBitmap), about as much.
const maxBitmapMemory = 1 << 30

// errBitmapMemory refuses bitmaps beyond maxBitmapMemory.
var errBitmapMemory = fmt.Errorf("qcow2: bitmaps need more than %d bytes of memory", maxBitmapMemory)

// ErrBitmapsLost is matched by the error Close returns when bitmaps could
// not be stored (bdrv's sentinel).
var ErrBitmapsLost = bdrv.ErrBitmapsLost

type bitmapsLostError struct{ msg string }

func (e *bitmapsLostError) Error() string { return e.msg }
func (e *bitmapsLostError) Unwrap() error { return ErrBitmapsLost }

// dirtyBitmap is one entry of the bitmap directory and, when loaded, its
// data. Guarded by Image.meta.
type dirtyBitmap struct {
	// Bitmap is the directory entry as on disk; TableOffset 0 for a
	// bitmap not stored yet.
	Bitmap
	// table is the bitmap table as on disk, when read.
	table []uint64
	// bits is the data, nil when not loaded: the bitmap was in use at open
	// (inconsistent).
	bits    *bitVec
	enabled bool
	// stale: the copy on disk is outdated or marked in use; store it.
	stale bool
}

// inconsistent reports a bitmap found in use: its data is unusable.
func (b *dirtyBitmap) inconsistent() bool { return b.bits == nil && b.InUse() }

// bitTrack is what the write path needs of an enabled bitmap.
type bitTrack struct {
	gran uint8
	bits *bitVec
}

// bitmapState is the image's bitmaps. Everything but tracking is guarded
// by Image.meta.
type bitmapState struct {
	list []*dirtyBitmap
	// disk is the directory on disk, in its order: list as loaded or
	// last stored.
	disk   []*dirtyBitmap
	loaded bool
	// removed are stored bitmaps whose clusters are freed by the next
	// store.
	removed []*dirtyBitmap
	// changed: the directory must be stored at close.
	changed bool
	// tracking is the enabled bitmaps every write marks, replaced whole
	// so that WriteDone reads it without a lock.
	tracking atomic.Pointer[[]bitTrack]
	// lost is why the bitmaps cannot be stored (a resize made one too
	// large): their data was dropped, they stay in use on disk.
	lost error
}

// bitmapMemoryLocked is what the loaded bitmaps may hold at disk size
// size, plus a new bitmap of granularity 1<<gran when add is set
// (maxBitmapMemory's measure).
func (img *Image) bitmapMemoryLocked(size uint64, add bool, gran uint8) uint64 {
	mem := uint64(0)
	if add {
		mem = bitVecBytes(bitmapBits(size, gran))
	}
	for _, b := range img.bm.list {
		if b.bits != nil {
			mem += bitVecBytes(bitmapBits(size, b.GranularityBits))
		}
	}
	return mem
}

// bitmapBits is the number of granules of 1<<gran bytes covering size bytes.
func bitmapBits(size uint64, gran uint8) uint64 {
	return (size + uint64(1)<<gran - 1) >> gran
}

// bitmapTableSize is the number of bitmap table entries (clusters of data)
// a bitmap of nbits bits needs.
func (img *Image) bitmapTableSize(nbits uint64) uint64 {
	return ((nbits+7)/8 + img.cs - 1) / img.cs
}

// WriteDone implements bdrv.WriteTracker: every enabled bitmap gets the
// granules of [off, off+bytes) set. Called unlocked, from any loop.
func (img *Image) WriteDone(off, bytes int64) {
	p := img.bm.tracking.Load()
	if p == nil || bytes <= 0 || off < 0 {
		return
	}
	for _, t := range *p {
		t.bits.setRange(uint64(off)>>t.gran, uint64(off+bytes-1)>>t.gran)
	}
}

// publishTrackingLocked makes the write path mark the enabled bitmaps.
func (img *Image) publishTrackingLocked() {
	var ts []bitTrack
	for _, b := range img.bm.list {
		if b.enabled && b.bits != nil && !img.readOnly {
			ts = append(ts, bitTrack{b.GranularityBits, b.bits})
		}
	}
	if len(ts) == 0 {
		img.bm.tracking.Store(nil)
		return
	}
	img.bm.tracking.Store(&ts)
}

// loadBitmapsLocked reads the bitmap directory and the data of every
// bitmap not in use (QEMU's qcow2_load_dirty_bitmaps, without the
// marking). Errors are QEMU's reasons to refuse the open, among them any
// extra data in the directory (QEMU's bitmap_list_load understands none
// and refuses it, extra_data_compatible or not).
func (img *Image) loadBitmapsLocked(co *coroutine.Co) error {
	if img.bm.loaded {
		return nil
	}
	h := img.hdr
	if h.Bitmaps == nil {
		img.bm.loaded = true
		return nil
	}
	ext := *h.Bitmaps
	dir, err := img.readFile(co, ext.DirectoryOffset, ext.DirectorySize)
	if err != nil {
		return fmt.Errorf("qcow2: reading the bitmap directory at %#x: %w", ext.DirectoryOffset, err)
	}
	entries, err := ParseBitmapDirectory(dir, ext, img.g.ClusterBits, h.Size)
	if err != nil {
		return err
	}
	var list []*dirtyBitmap
	mem := uint64(0)
	for _, e := range entries {
		if len(e.ExtraData) > 0 {
			return fmt.Errorf("Bitmap extra data is not supported: %w", unix.ENOTSUP)
		}
		b := &dirtyBitmap{Bitmap: e, enabled: e.Auto()}
		list = append(list, b)
		if e.InUse() {
			continue
		}
		nbits := bitmapBits(h.Size, e.GranularityBits)
		if mem += bitVecBytes(nbits); mem > maxBitmapMemory {
			return errBitmapMemory
		}
		if err := img.loadBitmapDataLocked(co, b, nbits); err != nil {
			return fmt.Errorf("qcow2: Could not read bitmap '%s' from image: %w", e.Name, err)
		}
	}
	img.bm.list, img.bm.disk, img.bm.loaded = list, slices.Clone(list), true
	return nil
}

// readBitmapTableLocked reads and checks a bitmap's table (QEMU's
// bitmap_table_load).
func (img *Image) readBitmapTableLocked(co *coroutine.Co, b *dirtyBitmap) ([]uint64, error) {
	raw, err := img.readFile(co, b.TableOffset, uint64(b.TableSize)*8)
	if err != nil {
		return nil, err
	}
	// Freeing the clusters of a table that points into other metadata
	// would corrupt the image: such tables are refused.
	bad := func(i int64, format string, args ...any) error {
		return fmt.Errorf("%w: %w", corrupt("bitmap table", b.TableOffset, i, format, args...), unix.EINVAL)
	}
	if k := img.overlapLocked(b.TableOffset, uint64(b.TableSize)*8, mkNone); k != mkNone {
		return nil, bad(-1, "bitmap %q: table overlaps the %s", b.Name, k)
	}
	table := make([]uint64, b.TableSize)
	for i := range table {
		e := be.Uint64(raw[i*8:])
		if chkBitmapEntryBad(e, img.cs) {
			return nil, bad(int64(i), "bitmap %q: invalid entry %#x", b.Name, e)
		}
		if k := img.overlapLocked(e&L2OffsetMask, img.cs, mkNone); e&L2OffsetMask != 0 && k != mkNone {
			return nil, bad(int64(i), "bitmap %q: data cluster %#x overlaps the %s", b.Name, e&L2OffsetMask, k)
		}
		table[i] = e
	}
	return table, nil
}

// loadBitmapDataLocked reads a bitmap's table and data (QEMU's
// load_bitmap_data): the table must have exactly the entries the disk
// size needs; entry 0 is a clean cluster of bits, 1 a cluster of set bits.
func (img *Image) loadBitmapDataLocked(co *coroutine.Co, b *dirtyBitmap, nbits uint64) error {
	if need := img.bitmapTableSize(nbits); uint64(b.TableSize) != need {
		return fmt.Errorf("bitmap table has %d entries, the image size needs %d: %w", b.TableSize, need, unix.EINVAL)
	}
	table, err := img.readBitmapTableLocked(co, b)
	if err != nil {
		return err
	}
	v := newBitVec(nbits)
	buf := bdrv.AlignedBuffer(int(img.cs), 4096)
	for i, e := range table {
		at := uint64(i) * img.cs
		switch off := e & L2OffsetMask; {
		case off != 0:
			if err := img.file.Preadv(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
				return err
			}
			v.deserialize(at, buf)
		case e&1 != 0:
			v.setBytes(at, img.cs)
		}
	}
	b.table, b.bits = table, v
	return nil
}

// openBitmapsLocked loads the bitmaps of an image opened read-write and
// marks the enabled ones in use on disk before any write can change what
// they describe (QEMU's qcow2_load_dirty_bitmaps).
func (img *Image) openBitmapsLocked(co *coroutine.Co) error {
	if err := img.loadBitmapsLocked(co); err != nil {
		return err
	}
	var mark []*dirtyBitmap
	for _, b := range img.bm.list {
		if b.bits != nil && b.enabled {
			mark = append(mark, b)
		}
	}
	if err := img.markBitmapsInUseLocked(co, mark); err != nil {
		return fmt.Errorf("qcow2: Can't update bitmap directory: %w", err)
	}
	img.publishTrackingLocked()
	return nil
}

// markBitmapsInUseLocked sets in_use on bitmaps whose copy on disk is about
// to become outdated, rewriting the directory in place (QEMU's
// update_ext_header_and_dir_in_place): the autoclear bit is cleared
// first and set again after, each step flushed, so a torn directory write
// leaves bitmaps QEMU ignores rather than trusts.
func (img *Image) markBitmapsInUseLocked(co *coroutine.Co, bms []*dirtyBitmap) error {
	need := false
	for _, b := range bms {
		if b.TableOffset != 0 && !b.InUse() {
			need = true
		}
		b.stale = true
		img.bm.changed = true
	}
	ext := img.hdr.Bitmaps
	if !need || ext == nil {
		return nil
	}
	entries := make([]Bitmap, len(img.bm.disk))
	for i, b := range img.bm.disk {
		entries[i] = b.Bitmap
		if b.stale && b.TableOffset != 0 {
			entries[i].Flags |= BitmapFlagInUse
		}
	}
	dir := MarshalBitmapDirectory(entries)
	if uint64(len(dir)) != ext.DirectorySize {
		return fmt.Errorf("qcow2: internal error: bitmap directory of %d bytes, %d on disk", len(dir), ext.DirectorySize)
	}
	if err := img.checkOverlapLocked(co, ext.DirectoryOffset, ext.DirectorySize, mkNone); err != nil {
		return err
	}
	af := img.hdr.AutoclearFeatures
	if err := img.writeHeaderU64(co, 88, af&^AutoclearBitmaps); err != nil {
		return err
	}
	buf := bdrv.AlignedBuffer(len(dir), 4096)
	copy(buf, dir)
	if err := img.file.Pwritev(co, int64(ext.DirectoryOffset), bdrv.IOVec{buf}, 0); err != nil {
		return err
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	if err := img.writeHeaderU64(co, 88, af); err != nil {
		return err
	}
	for i, b := range img.bm.disk {
		b.Flags = entries[i].Flags
	}
	return nil
}

// MarshalBitmapDirectory encodes bitmap directory entries (spec "Bitmap
// directory"): fixed part, extra data, name, zero padding to 8 bytes.
func MarshalBitmapDirectory(bms []Bitmap) []byte {
	var d []byte
	for _, b := range bms {
		e := make([]byte, bitmapEntryFixed, roundUp8(uint64(bitmapEntryFixed+len(b.ExtraData)+len(b.Name))))
		be.PutUint64(e, b.TableOffset)
		be.PutUint32(e[8:], b.TableSize)
		be.PutUint32(e[12:], b.Flags)
		e[16], e[17] = b.Type, b.GranularityBits
		be.PutUint16(e[18:], uint16(len(b.Name)))
		be.PutUint32(e[20:], uint32(len(b.ExtraData)))
		e = append(append(e, b.ExtraData...), b.Name...)
		d = append(d, e[:cap(e)]...)
	}
	return d
}

// extent is a host range to free once nothing on disk points at it.
type extent struct {
	off, n uint64
	dt     discardType
}

// clustersOf lists the clusters of a stored bitmap: its data clusters and
// its table.
func (img *Image) clustersOf(b *dirtyBitmap) []extent {
	var out []extent
	for _, e := range b.table {
		if off := e & L2OffsetMask; off != 0 {
			out = append(out, extent{off, img.cs, discardAlways})
		}
	}
	if b.TableOffset != 0 {
		out = append(out, extent{b.TableOffset, uint64(b.TableSize) * 8, discardOther})
	}
	return out
}

// writeBitmapLocked writes a bitmap's data into new clusters and a new
// table (QEMU's store_bitmap_data and store_bitmap): clean clusters of bits
// get entry 0. It returns the table's offset and entries; on error the
// clusters it took are freed.
func (img *Image) writeBitmapLocked(co *coroutine.Co, b *dirtyBitmap) (uint64, []uint64, error) {
	cs := img.cs
	table := make([]uint64, img.bitmapTableSize(b.bits.n))
	var taken []extent
	fail := func(err error) (uint64, []uint64, error) {
		for _, e := range taken {
			img.freeClustersLocked(co, e.off, e.n, discardNever)
		}
		return 0, nil, err
	}
	buf := bdrv.AlignedBuffer(int(cs), 4096)
	for i := range table {
		if !b.bits.serialize(uint64(i)*cs, buf) {
			continue
		}
		off, err := img.allocClustersLocked(co, 1)
		if err != nil {
			return fail(err)
		}
		taken = append(taken, extent{off, cs, discardNever})
		if err := img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
			return fail(err)
		}
		table[i] = off
	}
	n := (uint64(len(table))*8 + cs - 1) / cs
	raw := bdrv.AlignedBuffer(int(n*cs), 4096)
	for i, e := range table {
		be.PutUint64(raw[i*8:], e)
	}
	toff, err := img.allocClustersLocked(co, n)
	if err != nil {
		return fail(err)
	}
	taken = append(taken, extent{toff, n * cs, discardNever})
	if err := img.file.Pwritev(co, int64(toff), bdrv.IOVec{raw}, 0); err != nil {
		return fail(err)
	}
	return toff, table, nil
}

// storeBitmapsLocked writes every changed bitmap and a new directory, in an
// order that keeps the image consistent at every crash point (QEMU's
// qcow2_store_persistent_dirty_bitmaps): new data and tables, new
// directory, refcounts and data flushed, header switched (flushed), then
// the old clusters freed. Inconsistent bitmaps keep their
// entries as they are.
func (img *Image) storeBitmapsLocked(co *coroutine.Co) error {
	if !img.bm.changed || img.hdr.Version < 3 {
		// A version 2 image (amend downgraded it) cannot say its
		// bitmaps are consistent: they are dropped, their clusters
		// leaked, as QEMU leaves them.
		return nil
	}
	if img.bm.lost != nil {
		// As QEMU's store, which checks every bitmap before writing
		// any: nothing is stored, the bitmaps stay in use on disk.
		return &bitmapsLostError{fmt.Sprintf("Lost persistent bitmaps during inactivation of node '%s': %v",
			img.node.Filename, img.bm.lost)}
	}
	type update struct {
		b     *dirtyBitmap
		entry Bitmap
		table []uint64
	}
	var (
		ups  []update
		old  []extent
		ents []Bitmap
	)
	for _, b := range img.bm.removed {
		old = append(old, img.clustersOf(b)...)
	}
	// The directory keeps the stored bitmaps in their order and appends
	// the new ones newest first, as QEMU's store walks its bitmap list.
	var stored, added []*dirtyBitmap
	for _, b := range img.bm.list {
		if b.TableOffset != 0 {
			stored = append(stored, b)
		} else {
			added = append(added, b)
		}
	}
	slices.Reverse(added)
	img.bm.list = append(stored, added...)
	for _, b := range img.bm.list {
		e := b.Bitmap
		if b.stale && b.bits != nil {
			toff, table, err := img.writeBitmapLocked(co, b)
			if err != nil {
				return fmt.Errorf("qcow2: Failed to write bitmap '%s' to file: %w", b.Name, err)
			}
			old = append(old, img.clustersOf(b)...)
			e.TableOffset, e.TableSize = toff, uint32(len(table))
			e.Flags &^= BitmapFlagInUse | BitmapFlagAuto
			if b.enabled {
				e.Flags |= BitmapFlagAuto
			}
			ups = append(ups, update{b, e, table})
		}
		ents = append(ents, e)
	}
	h := img.Header()
	if h.Bitmaps != nil {
		old = append(old, extent{h.Bitmaps.DirectoryOffset, h.Bitmaps.DirectorySize, discardOther})
	}
	h.Bitmaps = nil
	h.AutoclearFeatures &^= AutoclearBitmaps
	if len(ents) > 0 {
		dir := MarshalBitmapDirectory(ents)
		n := (uint64(len(dir)) + img.cs - 1) / img.cs
		doff, err := img.allocClustersLocked(co, n)
		if err != nil {
			return fmt.Errorf("qcow2: allocating the bitmap directory: %w", err)
		}
		buf := bdrv.AlignedBuffer(int(n*img.cs), 4096)
		copy(buf, dir)
		if err := img.file.Pwritev(co, int64(doff), bdrv.IOVec{buf}, 0); err != nil {
			return fmt.Errorf("qcow2: writing the bitmap directory: %w", err)
		}
		h.Bitmaps = &BitmapsExt{Count: uint32(len(ents)), DirectorySize: uint64(len(dir)), DirectoryOffset: doff}
		h.AutoclearFeatures |= AutoclearBitmaps
	}
	if err := img.writeCachesLocked(co); err != nil {
		return err
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	if err := img.rewriteHeaderLocked(co, &h); err != nil {
		return fmt.Errorf("qcow2: updating the header for the bitmap directory: %w", err)
	}
	for _, u := range ups {
		u.b.Bitmap, u.b.table, u.b.stale = u.entry, u.table, false
	}
	img.bm.removed, img.bm.changed = nil, false
	img.bm.disk = slices.Clone(img.bm.list)
	var errs []error
	for _, e := range old {
		errs = append(errs, img.freeClustersLocked(co, e.off, e.n, e.dt))
	}
	return errors.Join(errs...)
}

// prepareBitmapResizeLocked checks that every bitmap can follow a resize
// to size bytes (QEMU's qcow2_truncate_bitmaps_check: all loaded, none
// inconsistent; and within maxBitmapMemory unless they will be dropped)
// and marks in use the loaded ones not marked yet, whose tables stop
// matching the size on disk.
func (img *Image) prepareBitmapResizeLocked(co *coroutine.Co, size uint64) error {
	notLoaded := &refusal{"Cannot resize qcow2 with persistent bitmaps that were not loaded", unix.ENOTSUP}
	if !img.bm.loaded {
		if img.hdr.Bitmaps == nil {
			return nil
		}
		return notLoaded
	}
	for _, b := range img.bm.list {
		switch {
		case b.inconsistent():
			return &refusal{inconsistentError(b.Name).Error(), unix.ENOTSUP}
		case b.bits == nil:
			return notLoaded
		}
	}
	if img.unstorableBitmapLocked(size) == nil && img.bitmapMemoryLocked(size, false, 0) > maxBitmapMemory {
		return errBitmapMemory
	}
	return img.markBitmapsInUseLocked(co, img.bm.list)
}

// unstorableBitmapLocked returns why the first bitmap, in the order QEMU
// stores them (newest first), cannot be stored with disk size size, or
// nil.
func (img *Image) unstorableBitmapLocked(size uint64) error {
	for _, b := range slices.Backward(img.bm.list) {
		if b.bits == nil {
			continue
		}
		if err := img.bitmapConstraints(size, b.GranularityBits, b.Name); err != nil {
			return fmt.Errorf("Bitmap '%s' doesn't satisfy the constraints: %w", b.Name, err)
		}
	}
	return nil
}

// resizeBitmapsLocked gives the loaded bitmaps the new disk size in place:
// bits past the old end start clear (QEMU's bdrv_dirty_bitmap_truncate).
// When one of them cannot be stored at that size, none will be (QEMU's
// store fails at close, leaving them in use on disk): their data is
// dropped now. Requests must not run concurrently.
func (img *Image) resizeBitmapsLocked(size uint64) {
	lost := img.unstorableBitmapLocked(size)
	for _, b := range img.bm.list {
		if b.bits == nil {
			continue
		}
		if lost != nil {
			b.bits = nil
		} else {
			b.bits.resize(bitmapBits(size, b.GranularityBits))
		}
		b.stale = true
		img.bm.changed = true
	}
	if lost != nil {
		img.bm.lost = lost
	}
	img.publishTrackingLocked()
}
