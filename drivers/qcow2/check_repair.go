package qcow2

import (
	"math"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/uring"
)

// What only a repair of Check does: zeroing an L2 entry that cannot be
// kept, growing the file for a refcount block past its end, rebuilding the
// refcount structure from the counted references, and rewriting the
// snapshot table. Refcount updates, allocation, L1 writes and the overlap
// check are the driver's (refcount.go, cluster.go, qcow2.go).

// fixL2EntryByZero turns the L2 entry of a preallocated cluster whose offset
// is unaligned into a zero cluster without host cluster (all its allocated
// subclusters into zero ones) and writes it (fix_l2_entry_by_zero).
// overlap reports that the write would have hit other metadata; the check
// of the table must then stop.
func (c *chkState) fixL2EntryByZero(res *chkCounts, l2Offset uint64, table []byte, i int, active bool) (overlap bool, err error) {
	g := c.g
	esz := g.L2EntrySize()
	// Allocated subclusters become zero ones; a standard entry becomes a
	// zero cluster without host cluster.
	e := OflagZero
	_, bm, _ := g.L2EntryAt(table, i)
	if g.ExtendedL2 {
		bm = (bm | bm<<32) & BitmapAllZero
		e = 0
	}
	_ = g.SetL2EntryAt(table, i, e, bm)
	c.l2Stale = true // until written
	off := l2Offset + uint64(i)*esz
	ign := mkActiveL2
	if !active {
		ign = mkNone // inactive L2 tables are not in the overlap check
	}
	if err := c.img.checkOverlapLocked(c.co, off, esz, ign); err != nil {
		c.msg("ERROR: Overlap check failed")
		res.checkErrors++
		return true, unix.EIO
	}
	if err := c.pwriteSync(off, table[uint64(i)*esz:uint64(i+1)*esz]); err != nil {
		c.msg("ERROR: Failed to overwrite L2 table entry: %s", uring.Strerror(errnoOf(err)))
		res.checkErrors++
		return false, err
	}
	c.l2Stale = false
	res.corruptions--
	res.corruptionsFixed++
	return false, nil
}

// growFileTo grows the file to include the cluster at off, for a refcount
// block beyond its end.
func (c *chkState) growFileTo(off uint64) error {
	if off > math.MaxInt64-c.cs {
		return unix.EINVAL
	}
	end := off + c.cs
	if end > chkMaxLength {
		c.msg("offset(%d) exceeds maximum(%d)", end, chkMaxLength)
		return unix.EIO
	}
	err := error(unix.EFBIG)
	if end <= c.fileLen()+chkMaxGrow {
		err = c.file.Truncate(c.co, int64(end), false, bdrv.PreallocOff)
	}
	if err != nil {
		c.msg("Could not resize file: %s", uring.Strerror(errnoOf(err)))
	}
	return err
}

// chkMaxLength is QEMU's BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB,
// the largest size a request may reach.
const chkMaxLength = math.MaxInt64 &^ (1<<30 - 1)

// ---------------------------------------------------------------------------
// Rebuilding the refcount structure

// allocClustersIMRT allocates count contiguous clusters in the in-memory
// refcount table, growing it at the end when no gap is large enough
// (alloc_clusters_imrt). *firstFree is where the search starts; it is moved
// to the first gap found.
func (c *chkState) allocClustersIMRT(refs *chkRefs, count uint64, firstFree *uint64) (uint64, error) {
	cluster := *firstFree
	firstGap := true
	contiguous := uint64(0)
	for ; cluster < refs.n && contiguous < count; cluster++ {
		if refs.get(cluster) == 0 {
			contiguous++
			if firstGap {
				*firstFree = cluster
				firstGap = false
			}
		} else {
			contiguous = 0
		}
	}
	if contiguous < count {
		if err := refs.resize(cluster + count - contiguous); err != nil {
			return 0, err
		}
	}
	cluster -= contiguous
	for i := range count {
		refs.set(cluster+i, 1)
	}
	return cluster << c.g.ClusterBits, nil
}

// writeRefblocks writes a refcount block for every block-sized range of
// [first, end) that has clusters in use, allocating blocks in refs (so they
// count themselves) and recording them in *reftable, which it grows as
// needed (rebuild_refcounts_write_refblocks). It reports whether the table
// grew.
func (c *chkState) writeRefblocks(refs *chkRefs, first, end uint64, reftable *[]uint64) (bool, error) {
	grown := false
	firstFree := uint64(0)
	rbBits := c.img.rbBits()
	for cluster := first; cluster < end; cluster++ {
		if refs.get(cluster) == 0 {
			continue
		}
		idx := cluster >> rbBits
		start := idx << rbBits
		var off uint64
		if uint64(len(*reftable)) > idx && (*reftable)[idx] != 0 {
			off = (*reftable)[idx]
		} else {
			firstFree = max(firstFree, start)
			var err error
			if off, err = c.allocClustersIMRT(refs, 1, &firstFree); err != nil {
				c.msg("ERROR allocating refblock: %s", uring.Strerror(errnoOf(err)))
				return false, err
			}
			if oc := off >> c.g.ClusterBits; oc >= end {
				end = oc + 1 // the block holding this block's refcount
			}
			if uint64(len(*reftable)) <= idx {
				n := ((idx+1)*8 + c.cs - 1) / c.cs * c.cs / 8
				t := make([]uint64, n)
				copy(t, *reftable)
				*reftable = t
				grown = true
			}
			(*reftable)[idx] = off
		}
		if err := c.img.checkOverlapLocked(c.co, off, c.cs, mkNone); err != nil {
			c.msg("ERROR writing refblock: %s", uring.Strerror(unix.EIO))
			return false, unix.EIO
		}
		if err := c.file.Pwritev(c.co, int64(off), bdrv.IOVec{refs.buf[idx*c.cs : (idx+1)*c.cs]}, 0); err != nil {
			c.msg("ERROR writing refblock: %s", uring.Strerror(errnoOf(err)))
			return false, err
		}
		cluster = start + uint64(1)<<rbBits - 1
	}
	return grown, nil
}

// rebuildRefcountStructure writes a new refcount structure made only from
// refs, the counted references, and switches the header and the image to it
// (rebuild_refcount_structure). The old structure is left behind, leaked;
// the caller's next comparison frees it.
func (c *chkState) rebuildRefcountStructure(res *chkCounts, refs *chkRefs) error {
	img := c.img
	if err := c.writeBack(); err != nil {
		return err
	}
	img.rcCache.discardLocked(0, math.MaxUint64)

	var rt []uint64
	if _, err := c.writeRefblocks(refs, 0, refs.n, &rt); err != nil {
		res.checkErrors++
		return err
	}
	var rtOff, rtClusters uint64
	for {
		rtClusters = c.sizeToClusters(uint64(len(rt)) * 8)
		firstFree := uint64(0)
		var err error
		if rtOff, err = c.allocClustersIMRT(refs, rtClusters, &firstFree); err != nil {
			c.msg("ERROR allocating reftable: %s", uring.Strerror(errnoOf(err)))
			res.checkErrors++
			return err
		}
		start := rtOff >> c.g.ClusterBits
		grown, err := c.writeRefblocks(refs, start, start+rtClusters, &rt)
		if err != nil {
			res.checkErrors++
			return err
		}
		if !grown {
			break
		}
	}

	buf := make([]byte, len(rt)*8)
	for i, e := range rt {
		be.PutUint64(buf[i*8:], e)
	}
	if err := img.checkOverlapLocked(c.co, rtOff, uint64(len(buf)), mkNone); err != nil {
		c.msg("ERROR writing reftable: %s", uring.Strerror(unix.EIO))
		return unix.EIO
	}
	if err := c.file.Pwritev(c.co, int64(rtOff), bdrv.IOVec{buf}, 0); err != nil {
		c.msg("ERROR writing reftable: %s", uring.Strerror(errnoOf(err)))
		return err
	}
	if err := c.file.Flush(c.co); err != nil {
		c.msg("ERROR writing reftable: %s", uring.Strerror(errnoOf(err)))
		return err
	}
	var hdr [12]byte
	be.PutUint64(hdr[0:], rtOff)
	be.PutUint32(hdr[8:], uint32(rtClusters))
	if err := c.pwriteSync(48, hdr[:]); err != nil {
		c.msg("ERROR setting reftable: %s", uring.Strerror(errnoOf(err)))
		return err
	}
	for cl := range img.metaClusters {
		img.dropMeta(cl, mkRefBlock)
	}
	img.reftable, img.rtOffset, img.rtCluster = rt, rtOff, uint32(rtClusters)
	c.h.RefcountTableOffset, c.h.RefcountTableClusters = rtOff, uint32(rtClusters)
	img.addMetaTables(rt, RefTableOffsetMask, mkRefBlock)
	return nil
}

// checkFixSnapshotTable rewrites the snapshot table when reading it found
// corruptions and errors are being fixed (qcow2_check_fix_snapshot_table),
// with the driver's qcow2_write_snapshots. It runs after the refcounts were
// repaired, because it allocates.
func (c *chkState) checkFixSnapshotTable(res *chkCounts) error {
	if res.corruptions == 0 || c.fix&FixErrors == 0 {
		return nil
	}
	if err := c.img.writeSnapshotsLocked(c.co, c.img.snapshots); err != nil {
		res.checkErrors++
		c.msg("ERROR failed to update snapshot table: %s", uring.Strerror(errnoOf(err)))
		return err
	}
	res.corruptionsFixed += res.corruptions
	res.corruptions = 0
	return nil
}
