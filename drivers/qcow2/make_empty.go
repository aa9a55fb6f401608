package qcow2

import (
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Emptying the active layer after a commit (QEMU's qcow2_make_empty and
// make_completely_empty).

// MakeEmpty drops every cluster of the active layer, so that the image
// reads through to its backing file again (bdrv.MakeEmptier, QEMU's
// qcow2_make_empty). A version 3 image without snapshots, bitmaps, a LUKS
// header or an external data file whose L1 table fits in one refcount block's range
// with the header, the refcount table and that block is rewritten to the
// state of a new image; any other image has all its clusters discarded
// (L2 entries cleared, clusters freed), which leaves snapshots intact.
// The node must be quiesced by the caller, as QEMU drains it.
func (img *Image) MakeEmpty(co *coroutine.Co) error {
	if err := img.checkIO(); err != nil {
		return err
	}
	if img.readOnly {
		return unix.EROFS
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	img.quiesceLocked(co)
	l1Clusters := (uint64(len(img.l1))*8 + img.cs - 1) / img.cs
	if img.hdr.Version >= 3 && len(img.snapshots) == 0 && !img.hdr.HasDataFile() &&
		img.hdr.Bitmaps == nil && img.hdr.CryptMethod != CryptLUKS && 3+l1Clusters <= img.g.RefblockEntries() {
		return img.makeCompletelyEmptyLocked(co, l1Clusters)
	}
	// Discards after a commit count as snapshot discards in QEMU, which
	// are passed down by default: the file shrinks where it can.
	return img.clusterDiscardLocked(co, 0, uint64(img.node.Length()), discardSnapshot, true)
}

// makeCompletelyEmptyLocked rewrites the image as a new one with the same
// header: the refcount table in cluster 1, its only refcount block in
// cluster 2, the zeroed L1 table (same size) from cluster 3, and the file
// cut after it (QEMU's make_completely_empty). The dirty bit covers the
// steps in which the refcounts on disk are wrong; a failure among them
// leaves the image unusable until reopened (and repaired by the open).
func (img *Image) makeCompletelyEmptyLocked(co *coroutine.Co, l1Clusters uint64) error {
	cs := img.cs
	if err := img.syncAllLocked(co); err != nil {
		return err
	}
	img.l2Cache.discardLocked(0, maxHostCluster)
	img.rcCache.discardLocked(0, maxHostCluster)
	if err := img.markDirtyLocked(co); err != nil {
		return err
	}
	if err := img.resetToEmptyLocked(co, l1Clusters); err != nil {
		// Memory and disk disagree about the refcounts: refuse
		// everything from here on, as QEMU ejects the node.
		img.corrupt.Store(true)
		return fmt.Errorf("qcow2: emptying the image: %w", err)
	}
	if err := img.markCleanLocked(co); err != nil {
		return err
	}
	// QEMU cuts a regular file to the exact size and leaves a block
	// device as it is; the file driver needs exact for the first and
	// refuses it for the second.
	end := int64((3 + l1Clusters) * cs)
	if err := img.file.Truncate(co, end, true, bdrv.PreallocOff); err != nil {
		if err := img.file.Truncate(co, end, false, bdrv.PreallocOff); err != nil {
			return fmt.Errorf("qcow2: truncating the emptied image: %w", err)
		}
	}
	return nil
}

// resetToEmptyLocked is the part of makeCompletelyEmptyLocked during which
// the refcounts on disk do not describe the image; called with the dirty
// bit set.
func (img *Image) resetToEmptyLocked(co *coroutine.Co, l1Clusters uint64) error {
	cs := img.cs
	if l1Clusters > 0 {
		if err := img.file.PwriteZeroes(co, int64(img.l1Offset), int64(l1Clusters*cs), 0); err != nil {
			return err
		}
	}
	clear(img.l1)
	// Room for the refcount table, one refcount block and the L1 table
	// after the header; old metadata there is overwritten, which the
	// dirty bit allows.
	if err := img.file.PwriteZeroes(co, int64(cs), int64((2+l1Clusters)*cs), 0); err != nil {
		return err
	}
	hb := bdrv.AlignedBuffer(20, 8)
	be.PutUint64(hb, 3*cs)   // l1_table_offset
	be.PutUint64(hb[8:], cs) // refcount_table_offset
	be.PutUint32(hb[16:], 1) // refcount_table_clusters
	if err := img.file.Pwritev(co, 40, bdrv.IOVec{hb}, 0); err != nil {
		return err
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	img.l1Offset = 3 * cs
	img.reftable, img.rtOffset, img.rtCluster = make([]uint64, cs/8), cs, 1
	img.hdrMu.Lock()
	img.hdr.L1TableOffset, img.hdr.RefcountTableOffset, img.hdr.RefcountTableClusters = 3*cs, cs, 1
	img.hdrMu.Unlock()
	clear(img.metaClusters)
	img.discards = img.discards[:0]
	img.freeByteOffset = 0
	img.ccache.invalidate()

	// The first refcount block, still all zeros, goes into the table.
	rt := bdrv.AlignedBuffer(8, 8)
	be.PutUint64(rt, 2*cs)
	if err := img.file.Pwritev(co, int64(cs), bdrv.IOVec{rt}, 0); err != nil {
		return err
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	img.reftable[0] = 2 * cs
	img.addMeta(2, mkRefBlock)

	// Now every structure is counted: the clusters from the header to
	// the end of the L1 table, all described by the new block. (The
	// allocator's overlap check would refuse them: they are metadata.)
	img.freeClusterIndex = 3 + l1Clusters
	if err := img.ensureRefblocksLocked(co, 0, (3+l1Clusters)*cs); err != nil {
		return err
	}
	if err := img.updateRefcountLocked(co, 0, (3+l1Clusters)*cs, 1, false, discardNever); err != nil {
		return err
	}
	return nil
}
