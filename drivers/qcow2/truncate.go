package qcow2

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

// Resizing (QEMU's qcow2_co_truncate, qcow2_grow_l1_table,
// qcow2_shrink_l1_table).

// Truncate implements bdrv.Truncater: growing allocates a larger L1 table
// if needed and, with preallocation, maps (and for falloc/full allocates)
// the new clusters; shrinking drops every cluster past the new end, the L2
// tables that mapped only them, and the unused tail of the file. exact is
// ignored, as QEMU ignores it for qcow2. As in QEMU, a version 3 image
// with internal snapshots can be resized (each snapshot keeps its own
// size, which applying it restores), a version 2 image with snapshots
// cannot; persistent bitmaps follow the new size.
func (img *Image) Truncate(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc) error {
	return img.truncate(co, size, exact, prealloc, false)
}

// TruncateZeroed implements bdrv.ZeroTruncater: Truncate, with the new
// area made to read as zeros (QEMU's qcow2_co_truncate with
// BDRV_REQ_ZERO_WRITE): zero clusters from the first subcluster boundary
// on, zeros written before it. A version 2 image with a backing file has
// no zero clusters: it is refused, unchanged.
func (img *Image) TruncateZeroed(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc) error {
	return img.truncate(co, size, exact, prealloc, true)
}

func (img *Image) truncate(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc, zero bool) error {
	if err := img.checkIO(); err != nil {
		return err
	}
	if size < 0 || size%512 != 0 {
		return errors.New("The new size must be a multiple of 512")
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.truncateLocked(co, size, exact, prealloc, zero); err != nil {
		return err
	}
	return img.syncMetadataLocked(co)
}

// truncateLocked is Truncate (QEMU's qcow2_co_truncate) with meta held and
// the size checked; zero makes the new area read as zeros.
func (img *Image) truncateLocked(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc, zero bool) error {
	if len(img.snapshots) > 0 && img.hdr.Version < 3 {
		return &refusal{"Can't resize a v2 image which has snapshots", unix.ENOTSUP}
	}
	if err := img.prepareBitmapResizeLocked(co, uint64(size)); err != nil {
		return err
	}
	cs := img.cs
	old, nsize := uint64(img.node.Length()), uint64(size)
	newL1 := img.g.L1EntriesFor(nsize)
	img.waitInflightLocked(co, min(old, nsize), max(old, nsize)-min(old, nsize))
	if nsize < old {
		if prealloc != bdrv.PreallocOff {
			return errors.New("Preallocation can't be used for shrinking an image")
		}
		if start := (nsize + cs - 1) / cs * cs; start < old {
			if err := img.clusterDiscardLocked(co, start, old-start, discardAlways, true); err != nil {
				return fmt.Errorf("Failed to discard cropped clusters: %w", err)
			}
		}
		if err := img.shrinkL1Locked(co, newL1); err != nil {
			return fmt.Errorf("Failed to reduce the number of L2 tables: %w", err)
		}
		if err := img.shrinkReftableLocked(co); err != nil {
			return fmt.Errorf("Failed to discard unused refblocks: %w", err)
		}
		// Give the file's unused tail back; failing that is harmless.
		if err := img.writeCachesLocked(co); err != nil {
			return err
		}
		flen := uint64(img.file.Length())
		if last, err := img.lastClusterLocked(co, flen); err == nil && uint64(last+1)*cs < flen {
			img.file.Truncate(co, int64(uint64(last+1)*cs), true, bdrv.PreallocOff)
		}
	} else if err := img.growL1Locked(co, newL1); err != nil {
		return fmt.Errorf("Failed to grow the L1 table: %w", err)
	}
	img.node.SetLength(int64(max(old, nsize)))
	var err error
	switch {
	case prealloc == bdrv.PreallocOff:
		if img.hdr.HasDataFile() {
			err = img.data.Truncate(co, size, exact, bdrv.PreallocOff)
		}
	case prealloc == bdrv.PreallocMetadata || img.hdr.HasDataFile():
		if img.hdr.HasDataFile() && prealloc != bdrv.PreallocMetadata {
			err = img.data.Truncate(co, size, false, prealloc)
		}
		if err == nil {
			err = img.preallocateLocked(co, old, nsize)
		}
	default:
		err = img.preallocateDataLocked(co, old, nsize, prealloc)
	}
	if err != nil {
		img.node.SetLength(int64(old))
		return fmt.Errorf("Could not preallocate: %w", err)
	}
	if zero && nsize > old {
		if err := img.zeroNewAreaLocked(co, old, nsize); err != nil {
			img.node.SetLength(int64(old))
			return err
		}
	}
	if err := img.writeHeaderU64(co, 24, nsize); err != nil {
		img.node.SetLength(int64(old))
		return fmt.Errorf("Failed to update the image size: %w", err)
	}
	img.hdrMu.Lock()
	img.hdr.Size = nsize
	img.hdrMu.Unlock()
	img.node.SetLength(size)
	img.resizeBitmapsLocked(nsize)
	return nil
}

// zeroNewAreaLocked makes [old, size), the area a resize adds, read as
// zeros before the header takes the new size: zero clusters from the
// first subcluster boundary, then zeros written (with meta released, as a
// guest write) to the part of the subcluster that old ends in.
func (img *Image) zeroNewAreaLocked(co *coroutine.Co, old, size uint64) error {
	sc := img.g.SubclusterSize()
	start := (old + sc - 1) / sc * sc
	if size > start {
		if err := img.subclusterZeroizeLocked(co, start, size-start, false); err != nil {
			return fmt.Errorf("Failed to zero out new clusters: %w", libcErrno(err))
		}
	}
	if start > old {
		buf := bdrv.AlignedBuffer(int(min(start, size)-old), 4096)
		img.meta.Unlock(co)
		err := img.Pwritev(co, int64(old), bdrv.IOVec{buf}, 0)
		img.meta.Lock(co)
		if err != nil {
			return fmt.Errorf("Failed to zero out the new area: %w", libcErrno(err))
		}
	}
	return nil
}

// libcErrno is err, a bare errno worded as the C library words it, as
// QEMU's error_setg_errno prints it.
func libcErrno(err error) error {
	var e unix.Errno
	if errors.As(err, &e) && err.Error() == e.Error() {
		return uring.NewErrno(e, true)
	}
	return err
}

// refusal is a request QEMU refuses with errno: its message is QEMU's
// alone, as qemu-img prints it.
type refusal struct {
	msg   string
	errno unix.Errno
}

func (e *refusal) Error() string { return e.msg }
func (e *refusal) Unwrap() error { return e.errno }

// growL1Locked gives the active L1 table n entries, moving it to new
// clusters: the new table is written and flushed, then the header switched
// to it with one write, then the old table freed (QEMU's
// qcow2_grow_l1_table with exact_size).
func (img *Image) growL1Locked(co *coroutine.Co, n uint64) error {
	if n <= uint64(len(img.l1)) {
		return nil
	}
	if n*8 > MaxL1TableBytes {
		return unix.EFBIG
	}
	cs := img.cs
	off, err := img.allocClustersLocked(co, (n*8+cs-1)/cs)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		img.freeClustersLocked(co, off, (n*8+cs-1)/cs*cs, discardOther)
		return err
	}
	if err := img.rcCache.flushLocked(co); err != nil {
		return fail(err)
	}
	buf := bdrv.AlignedBuffer(int(n*8), 4096)
	for i, e := range img.l1 {
		be.PutUint64(buf[i*8:], e)
	}
	if err := img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
		return fail(err)
	}
	if err := img.file.Flush(co); err != nil {
		return fail(err)
	}
	hb := bdrv.AlignedBuffer(12, 8)
	be.PutUint32(hb, uint32(n))
	be.PutUint64(hb[4:], off)
	if err := img.file.Pwritev(co, 36, bdrv.IOVec{hb}, 0); err != nil {
		return fail(err)
	}
	if err := img.file.Flush(co); err != nil {
		return fail(err)
	}
	oldOff, oldN := img.l1Offset, uint64(len(img.l1))
	l1 := make([]uint64, n)
	copy(l1, img.l1)
	img.l1, img.l1Offset = l1, off
	img.hdrMu.Lock()
	img.hdr.L1Size, img.hdr.L1TableOffset = uint32(n), off
	img.hdrMu.Unlock()
	if oldN > 0 {
		return img.freeClustersLocked(co, oldOff, (oldN*8+cs-1)/cs*cs, discardOther)
	}
	return nil
}

// shrinkL1Locked drops the L2 tables of L1 entries n and beyond (whose
// clusters were discarded already): the entries are zeroed on disk first,
// then the tables freed (QEMU's qcow2_shrink_l1_table). The L1 table keeps
// its size, as in QEMU.
func (img *Image) shrinkL1Locked(co *coroutine.Co, n uint64) error {
	if n >= uint64(len(img.l1)) {
		return nil
	}
	cnt := uint64(len(img.l1)) - n
	if err := img.checkOverlapLocked(co, img.l1Offset+n*8, cnt*8, mkActiveL1); err != nil {
		return err
	}
	if err := img.file.Pwritev(co, int64(img.l1Offset+n*8), bdrv.IOVec{bdrv.AlignedBuffer(int(cnt*8), 4096)}, 0); err != nil {
		return err
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	if err := img.l2Cache.flushLocked(co); err != nil {
		return err
	}
	for i := n; i < uint64(len(img.l1)); i++ {
		off, _, err := img.l2TableLocked(co, i)
		img.l1[i] = 0
		if err != nil || off == 0 {
			continue
		}
		img.dropMeta(off/img.cs, mkActiveL2)
		img.l2Cache.discardLocked(off, img.cs)
		if err := img.freeClustersLocked(co, off, img.cs, discardAlways); err != nil {
			return err
		}
	}
	img.processDiscardsLocked(co)
	return nil
}

// shrinkReftableLocked drops the refcount blocks that count nothing but
// themselves (QEMU's qcow2_shrink_reftable): the refcount table without them
// is written and flushed, then the blocks are freed.
func (img *Image) shrinkReftableLocked(co *coroutine.Co) error {
	cs, E := img.cs, img.g.RefblockEntries()
	newTable := make([]uint64, len(img.reftable))
	for i := range img.reftable {
		rb, err := img.refblockOffsetLocked(co, uint64(i))
		if err != nil {
			return err
		}
		if rb == 0 {
			continue
		}
		e, err := img.rcCache.getLocked(co, rb)
		if err != nil {
			return err
		}
		unused := true
		self := uint64(i) == (rb/cs)>>img.rbBits()
		for j := uint64(0); j < E && unused; j++ {
			if self && j == (rb/cs)&(E-1) {
				continue
			}
			if v, _ := img.g.Refcount(e.buf, j); v != 0 {
				unused = false
			}
		}
		img.rcCache.putLocked(e)
		if !unused {
			newTable[i] = img.reftable[i]
		}
	}
	buf := bdrv.AlignedBuffer(int(uint64(img.rtCluster)*cs), 4096)
	for i, v := range newTable {
		be.PutUint64(buf[i*8:], v)
	}
	if err := img.checkOverlapLocked(co, img.rtOffset, uint64(len(buf)), mkRefTable); err != nil {
		return err
	}
	err := img.file.Pwritev(co, int64(img.rtOffset), bdrv.IOVec{buf}, 0)
	if err == nil {
		err = img.file.Flush(co)
	}
	for i := range img.reftable {
		if img.reftable[i] != 0 && newTable[i] == 0 {
			if err == nil {
				err = img.freeClustersLocked(co, img.reftable[i]&RefTableOffsetMask, cs, discardAlways)
			}
			img.rcCache.discardLocked(img.reftable[i]&RefTableOffsetMask, cs)
			img.dropMeta((img.reftable[i]&RefTableOffsetMask)/cs, mkRefBlock)
			img.reftable[i] = 0
		}
	}
	img.processDiscardsLocked(co)
	return err
}
