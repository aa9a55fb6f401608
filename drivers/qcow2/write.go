package qcow2

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Pwritev implements bdrv.Driver (QEMU's qcow2_co_pwritev_part): under the
// metadata lock, map (allocating as needed) one host-contiguous run of the
// request; without the lock, write the data and the copy-on-write areas;
// under the lock again, link the new clusters into the L2 table.
func (img *Image) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	if err := img.checkIO(); err != nil {
		return err
	}
	var err error
	if flags&bdrv.ReqWriteCompressed != 0 {
		err = img.writeCompressed(co, uint64(off), iov)
	} else {
		err = img.writeGuest(co, uint64(off), iov)
	}
	if err != nil {
		return err
	}
	return img.syncMetadata(co)
}

// syncMetadata is OptCrashSafeMetadata: before a request that changed
// cached metadata (allocation, copy-on-write, zero or discarded clusters,
// compressed clusters, subcluster bitmaps) completes, write both caches
// back to the image file, so that the request survives the death of this
// process. The cache write-back keeps its dependency order (refcounts
// before the L2 entries that use them, copied data before the L2 entries
// that map it) with the flushes that order takes, so the file also stays
// consistent at every power-loss point. A request that dirtied nothing —
// a rewrite of allocated clusters — costs one atomic load.
//
// The rest of the state a restarted server needs is on disk already: L1
// entries, the refcount table and the header (with the dirty bit of lazy
// refcounts) are written through when they change; queued discards of
// freed clusters are only lost space in the file; persistent dirty bitmaps
// stay in_use on disk while the image is open, so a crash leaves them
// inconsistent, as QEMU's does.
//
// Called unlocked, once per request, at the request entry points; the
// dirty flag is image-wide, so a request also writes back metadata that a
// concurrent request dirtied and has not yet written itself.
func (img *Image) syncMetadata(co *coroutine.Co) error {
	if !img.crashSafe || !img.metaDirty.Load() {
		return nil
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	return img.syncMetadataLocked(co)
}

// syncMetadataLocked is syncMetadata with meta held.
func (img *Image) syncMetadataLocked(co *coroutine.Co) error {
	if !img.crashSafe || !img.metaDirty.Load() {
		return nil
	}
	if img.corrupt.Load() {
		return errImageCorrupt
	}
	if err := img.writeCachesLocked(co); err != nil {
		return fmt.Errorf("qcow2: writing metadata back: %w", err)
	}
	return nil
}

// writeGuest writes guest data. Called unlocked.
func (img *Image) writeGuest(co *coroutine.Co, off uint64, iov bdrv.IOVec) error {
	total := uint64(iov.Len())
	for done := uint64(0); done < total; {
		img.meta.Lock(co)
		host, n, metas, err := img.allocHostOffsetLocked(co, off+done, total-done)
		if err == nil {
			err = img.checkWriteOverlapLocked(co, host, n, metas)
		}
		if err != nil {
			img.handleL2MetaLocked(co, metas, false)
			img.meta.Unlock(co)
			return err
		}
		img.meta.Unlock(co)
		// consumes metas
		if err := img.writeTask(co, host, off+done, iov.Slice(int64(done), int64(n)), metas); err != nil {
			return err
		}
		done += n
	}
	return nil
}

// checkWriteOverlapLocked checks that the data and copy-on-write writes of a
// mapped run stay clear of metadata. Newly allocated clusters were checked
// when they were allocated; this covers clusters written in place.
func (img *Image) checkWriteOverlapLocked(co *coroutine.Co, host, n uint64, metas *l2Meta) error {
	if img.hdr.HasDataFile() {
		return nil
	}
	if err := img.checkOverlapLocked(co, host, n, mkNone); err != nil {
		return err
	}
	for m := metas; m != nil; m = m.next {
		if m.keepOld {
			start := m.allocOffset + m.cowStart.off
			if err := img.checkOverlapLocked(co, start, m.allocOffset+m.cowEnd.off+m.cowEnd.n-start, mkNone); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeTask writes one mapped run and links its allocations (QEMU's
// qcow2_co_pwritev_task). Called unlocked; consumes metas: the caller must
// not touch them afterwards.
func (img *Image) writeTask(co *coroutine.Co, host, guestOff uint64, iov bdrv.IOVec, metas *l2Meta) error {
	var err error
	if img.encrypted() {
		if iov, err = img.encryptCopy(host, guestOff, iov); err != nil {
			img.meta.Lock(co)
			img.handleL2MetaLocked(co, metas, false)
			img.meta.Unlock(co)
			return err
		}
	} else {
		img.handleAllocSpace(co, metas)
	}
	if !mergeCow(guestOff, uint64(iov.Len()), iov, metas) {
		err = img.data.Pwritev(co, int64(host), iov, 0)
	}
	for m := metas; m != nil && err == nil; m = m.next {
		err = img.performCow(co, m)
	}
	img.meta.Lock(co)
	lerr := img.handleL2MetaLocked(co, metas, err == nil)
	img.meta.Unlock(co)
	if err != nil {
		return err
	}
	return lerr
}

// mergeCow arranges for the guest data to be written together with the
// copy-on-write areas of the allocation it sits exactly between, in one
// vectored write (QEMU's merge_cow).
func mergeCow(off, bytes uint64, iov bdrv.IOVec, metas *l2Meta) bool {
	for m := metas; m != nil; m = m.next {
		if m.cowStart.n == 0 && m.cowEnd.n == 0 || m.skipCow {
			continue
		}
		if m.cowStartOff()+m.cowStart.n != off || m.offset+m.cowEnd.off != off+bytes {
			continue
		}
		m.data = iov
		return true
	}
	return false
}

// handleAllocSpace zeroes newly allocated clusters in the file instead of
// copying zeros into them, when the copy-on-write areas read as zeros and
// the file can zero efficiently (QEMU's handle_alloc_space). Errors only
// mean the normal copy happens. Called unlocked.
func (img *Image) handleAllocSpace(co *coroutine.Co, metas *l2Meta) {
	for m := metas; m != nil; m = m.next {
		if m.cowStart.n == 0 && m.cowEnd.n == 0 || m.keepOld || m.compressed != 0 {
			continue
		}
		if !img.isZero(co, m.offset+m.cowStart.off, m.cowStart.n) ||
			!img.isZero(co, m.offset+m.cowEnd.off, m.cowEnd.n) {
			continue
		}
		start := m.allocOffset + m.cowStart.off
		n := m.cowEnd.off + m.cowEnd.n - m.cowStart.off
		if img.data.PwriteZeroes(co, int64(start), int64(n), bdrv.ReqNoFallback) == nil {
			m.skipCow = true
		}
	}
}

// isZero reports whether guest range [off, off+n) is known to read as
// zeros through the whole backing chain (QEMU's is_zero). Called unlocked.
func (img *Image) isZero(co *coroutine.Co, off, n uint64) bool {
	for n > 0 {
		st, err := img.node.BlockStatusAbove(co, nil, true, int64(off), int64(n))
		if err != nil || st.Flags&bdrv.StatusZero == 0 || st.Pnum <= 0 {
			return false
		}
		off += uint64(st.Pnum)
		n -= min(n, uint64(st.Pnum))
	}
	return true
}

// performCow copies the old content of an allocation's copy-on-write areas
// into its new clusters, together with the guest data if merged (QEMU's
// perform_cow). The old content is read through the image's own mapping,
// which still points at the old clusters, the backing file or zeros.
// Called unlocked.
func (img *Image) performCow(co *coroutine.Co, m *l2Meta) error {
	start, end := m.cowStart, m.cowEnd
	if start.n == 0 && end.n == 0 || m.skipCow {
		if m.data != nil {
			return fmt.Errorf("qcow2: internal error: merged data without copy-on-write: %w", unix.EIO)
		}
		return nil
	}
	mid := end.off - (start.off + start.n)
	var startBuf, endBuf []byte
	if start.n > 0 && end.n > 0 && mid <= 16384 {
		buf := bdrv.AlignedBuffer(int(start.n+mid+end.n), 4096)
		if err := img.readGuest(co, m.offset+start.off, bdrv.IOVec{buf}); err != nil {
			return err
		}
		startBuf, endBuf = buf[:start.n], buf[start.n+mid:]
	} else {
		if start.n > 0 {
			startBuf = bdrv.AlignedBuffer(int(start.n), 4096)
			if err := img.readGuest(co, m.offset+start.off, bdrv.IOVec{startBuf}); err != nil {
				return err
			}
		}
		if end.n > 0 {
			endBuf = bdrv.AlignedBuffer(int(end.n), 4096)
			if err := img.readGuest(co, m.offset+end.off, bdrv.IOVec{endBuf}); err != nil {
				return err
			}
		}
	}
	if img.encrypted() {
		// The old content was read decrypted; store it encrypted for its
		// new place.
		if err := img.encryptCow(m, startBuf, endBuf); err != nil {
			return err
		}
	}
	if m.data != nil {
		v := make(bdrv.IOVec, 0, len(m.data)+2)
		if start.n > 0 {
			v = append(v, startBuf)
		}
		v = append(v, m.data...)
		if end.n > 0 {
			v = append(v, endBuf)
		}
		if err := img.data.Pwritev(co, int64(m.allocOffset+start.off), v, 0); err != nil {
			return err
		}
	} else {
		if start.n > 0 {
			if err := img.data.Pwritev(co, int64(m.allocOffset+start.off), bdrv.IOVec{startBuf}, 0); err != nil {
				return err
			}
		}
		if end.n > 0 {
			if err := img.data.Pwritev(co, int64(m.allocOffset+end.off), bdrv.IOVec{endBuf}, 0); err != nil {
				return err
			}
		}
	}
	m.cowDone = true
	img.counters.cowBytes.Add(start.n + end.n)
	return nil
}

// writeCompressed implements bdrv.ReqWriteCompressed (QEMU's
// qcow2_co_pwritev_compressed_part): whole clusters (the last one may end
// at the image end), each compressed on a worker goroutine and stored
// uncompressed when it does not shrink.
func (img *Image) writeCompressed(co *coroutine.Co, off uint64, iov bdrv.IOVec) error {
	if img.hdr.HasDataFile() {
		return bdrv.ErrNotSupported
	}
	if img.encrypted() {
		return fmt.Errorf("qcow2: Compression and encryption not supported at the same time: %w", unix.ENOTSUP)
	}
	cs := img.cs
	total := uint64(iov.Len())
	size := uint64(img.node.Length())
	if off%cs != 0 {
		return unix.EINVAL
	}
	for done := uint64(0); done < total; {
		n := min(cs, total-done)
		if n < cs && off+done+n != size {
			return unix.EINVAL
		}
		buf := make([]byte, cs)
		iov.CopyTo(buf[:n], int64(done))
		out, err := img.compress(co, buf, int(cs)-1)
		switch {
		case errors.Is(err, errNoFit):
			err = img.writeGuest(co, off+done, iov.Slice(int64(done), int64(n)))
		case err == nil:
			err = img.writeCompressedCluster(co, off+done, out)
		}
		if err != nil {
			return err
		}
		done += n
	}
	return nil
}

// writeCompressedCluster stores compressed data for the cluster at guest
// offset off, replacing whatever the cluster held. Called unlocked.
func (img *Image) writeCompressedCluster(co *coroutine.Co, off uint64, data []byte) error {
	img.meta.Lock(co)
	img.waitInflightLocked(co, off, img.cs)
	// The L2 table is made ours now, so linking cannot fail on it later.
	e, _, err := img.getClusterTableLocked(co, off)
	if err != nil {
		img.meta.Unlock(co)
		return err
	}
	img.l2Cache.putLocked(e)
	host, err := img.allocBytesLocked(co, uint64(len(data)))
	if err != nil {
		img.meta.Unlock(co)
		return err
	}
	desc, err := img.g.EncodeCompressed(host, uint64(len(data)))
	if err != nil {
		img.freeClustersLocked(co, host, uint64(len(data)), discardNever)
		img.meta.Unlock(co)
		return fmt.Errorf("qcow2: %w: %w", err, unix.EIO)
	}
	m := &l2Meta{offset: off, allocOffset: host, nbClusters: 1, compressed: desc,
		cowEnd: cowRegion{off: img.cs}}
	img.inflight = append(img.inflight, m)
	img.meta.Unlock(co)

	err = img.file.Pwritev(co, int64(host), bdrv.IOVec{data}, 0)

	img.meta.Lock(co)
	lerr := img.handleL2MetaLocked(co, m, err == nil)
	img.meta.Unlock(co)
	if err != nil {
		return err
	}
	return lerr
}

// PwriteZeroes implements bdrv.ZeroWriter (QEMU's qcow2_co_pwrite_zeroes):
// whole subclusters become zero clusters (or zero subclusters). A partial
// subcluster is accepted only if the rest of it already reads as zeros;
// otherwise ErrNotSupported makes the generic layer write zeros.
func (img *Image) PwriteZeroes(co *coroutine.Co, off, bytes int64, flags bdrv.ReqFlags) error {
	if err := img.checkIO(); err != nil {
		return err
	}
	uoff, ubytes := uint64(off), uint64(bytes)
	size := uint64(img.node.Length())
	scSize := img.g.SubclusterSize()
	if img.g.Version < 3 && img.node.Backing != nil {
		return bdrv.ErrNotSupported
	}
	head := uoff % scSize
	tail := (uoff+ubytes+scSize-1)/scSize*scSize - (uoff + ubytes)
	if uoff+ubytes == size {
		tail = 0
	}
	partial := head != 0 || tail != 0
	if partial {
		if head+ubytes+tail > scSize {
			return bdrv.ErrNotSupported
		}
		if !img.isZero(co, uoff-head, head) || !img.isZero(co, uoff+ubytes, tail) {
			return bdrv.ErrNotSupported
		}
		uoff -= head
		ubytes = min(scSize, size-uoff)
	}
	if img.hdr.DataFileRaw() {
		// The raw data file must read as the guest does.
		if err := img.data.PwriteZeroes(co, int64(uoff), int64(ubytes), flags&bdrv.ReqMayUnmap); err != nil {
			return err
		}
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	img.waitInflightLocked(co, uoff, ubytes)
	if partial {
		// A write may have come in since the check above.
		m, err := img.getHostOffsetLocked(co, uoff, ubytes)
		if err != nil {
			return err
		}
		switch m.typ {
		case SubclusterUnallocatedPlain, SubclusterUnallocatedAlloc, SubclusterZeroPlain, SubclusterZeroAlloc:
		default:
			return bdrv.ErrNotSupported
		}
	}
	if err := img.subclusterZeroizeLocked(co, uoff, ubytes, flags&bdrv.ReqMayUnmap != 0); err != nil {
		return err
	}
	return img.syncMetadataLocked(co)
}

// Pdiscard implements bdrv.Discarder (QEMU's qcow2_co_pdiscard): whole
// clusters only (and the partial last cluster of the image). In version 3
// discarded clusters read as zeros; in version 2 they fall back to the
// backing file, so with one discard does nothing.
func (img *Image) Pdiscard(co *coroutine.Co, off, bytes int64) error {
	if err := img.checkIO(); err != nil {
		return err
	}
	uoff, ubytes, cs := uint64(off), uint64(bytes), img.cs
	if (uoff|ubytes)%cs != 0 && (uoff%cs != 0 || uoff+ubytes != uint64(img.node.Length())) {
		return bdrv.ErrNotSupported
	}
	if img.g.Version < 3 && img.node.Backing != nil {
		return nil
	}
	if img.hdr.DataFileRaw() {
		// The discarded clusters will read as zeros; the raw data file
		// must too.
		if err := img.data.PwriteZeroes(co, off, bytes, bdrv.ReqMayUnmap); err != nil {
			return err
		}
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	img.waitInflightLocked(co, uoff, ubytes)
	if err := img.clusterDiscardLocked(co, uoff, ubytes, discardRequest, false); err != nil {
		return err
	}
	return img.syncMetadataLocked(co)
}
