package qcow2

import (
	"errors"
	"fmt"
	"math"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
)

// The writing half of the checker: the stored refcounts (read through a
// small write-back cache of refcount blocks, changed like QEMU's
// update_refcount), cluster allocation for the repairs that need new space,
// the refcount structure rebuild, the snapshot table rewrite, the metadata
// overlap check every repair write passes, and the header bits.

// chkCacheBlocks is how many refcount blocks the checker keeps in memory.
const chkCacheBlocks = 16

// chkCachedBlock is a refcount block read from the file.
type chkCachedBlock struct {
	off   uint64
	data  []byte
	dirty bool
}

// errChkAgain asks the allocator to search for free clusters again: a new
// refcount block may have been placed where it meant to allocate (QEMU's
// -EAGAIN from alloc_refcount_block).
var errChkAgain = errors.New("qcow2 check: allocation must restart")

// refblock returns the refcount block at off, from the cache or the file,
// writing back the least recently used block when the cache is full.
func (c *chkState) refblock(off uint64) (*chkCachedBlock, error) {
	for i, b := range c.rbCache {
		if b.off == off {
			copy(c.rbCache[1:i+1], c.rbCache[:i])
			c.rbCache[0] = b
			return b, nil
		}
	}
	var b *chkCachedBlock
	if len(c.rbCache) == chkCacheBlocks {
		b = c.rbCache[len(c.rbCache)-1]
		if err := c.writeRefblock(b); err != nil {
			return nil, err
		}
		c.rbCache = c.rbCache[:len(c.rbCache)-1]
	} else {
		b = &chkCachedBlock{data: make([]byte, c.cs)}
	}
	b.off = off
	if err := c.pread(off, b.data); err != nil {
		return nil, err
	}
	c.rbCache = append(c.rbCache, nil)
	copy(c.rbCache[1:], c.rbCache)
	c.rbCache[0] = b
	return b, nil
}

// writeRefblock writes a cached block back if it changed, after the overlap
// check QEMU's cache flush makes.
func (c *chkState) writeRefblock(b *chkCachedBlock) error {
	if !b.dirty {
		return nil
	}
	if ol := c.metadataOverlap(chkOLRefcountBlock, b.off, c.cs); ol != 0 {
		c.signalOverlap(ol)
		return unix.EIO
	}
	if err := c.pwrite(b.off, b.data); err != nil {
		return err
	}
	b.dirty = false
	return nil
}

// flushRefblocks writes back every changed refcount block, unless a fatal
// corruption made the image unusable.
func (c *chkState) flushRefblocks() error {
	if c.dead {
		return nil
	}
	for _, b := range c.rbCache {
		if err := c.writeRefblock(b); err != nil {
			return err
		}
	}
	return nil
}

// getRefcount returns the stored refcount of a host cluster
// (qcow2_get_refcount): 0 for clusters no refcount block covers.
func (c *chkState) getRefcount(cluster uint64) (uint64, error) {
	ti := cluster >> c.rbBits
	if ti >= uint64(len(c.reftable)) {
		return 0, nil
	}
	off := c.reftable[ti] & RefTableOffsetMask
	if off == 0 {
		return 0, nil
	}
	if off&(c.cs-1) != 0 {
		c.signalCorruption(true, fmt.Sprintf("Refblock offset %s unaligned (reftable index: %s)", chex(off), chex(ti)))
		return 0, unix.EIO
	}
	b, err := c.refblock(off)
	if err != nil {
		return 0, err
	}
	return c.g.Refcount(b.data, cluster&(1<<c.rbBits-1))
}

// refblockFor returns the refcount block covering a host cluster, creating
// it when the refcount table has a free entry for it (QEMU's
// alloc_refcount_block; after creating one it returns errChkAgain). Growing
// the refcount table is not implemented: ENOSPC.
func (c *chkState) refblockFor(cluster uint64) (*chkCachedBlock, error) {
	ti := cluster >> c.rbBits
	if ti < uint64(len(c.reftable)) {
		if off := c.reftable[ti] & RefTableOffsetMask; off != 0 {
			if off&(c.cs-1) != 0 {
				c.signalCorruption(true, fmt.Sprintf("Refblock offset %s unaligned (reftable index: %s)", chex(off), chex(ti)))
				return nil, unix.EIO
			}
			return c.refblock(off)
		}
	}
	if ti >= uint64(len(c.reftable)) {
		return nil, unix.ENOSPC
	}
	nb, err := c.allocClustersNoref(c.cs)
	if err != nil {
		return nil, err
	}
	data := make([]byte, c.cs)
	if nb>>(c.h.ClusterBits+c.rbBits) == ti {
		// The block describes itself.
		_ = c.g.SetRefcount(data, (nb>>c.h.ClusterBits)&(1<<c.rbBits-1), 1)
	} else if err := c.updateRefcount(nb, c.cs, 1, false); err != nil {
		return nil, err
	}
	if err := c.flushRefblocks(); err != nil {
		return nil, err
	}
	if ol := c.metadataOverlap(chkOLRefcountBlock, nb, c.cs); ol != 0 {
		c.signalOverlap(ol)
		return nil, unix.EIO
	}
	if err := c.pwriteSync(nb, data); err != nil {
		return nil, err
	}
	var e [8]byte
	be.PutUint64(e[:], nb)
	if err := c.pwriteSync(c.reftableOffset+ti*8, e[:]); err != nil {
		return nil, err
	}
	c.reftable[ti] = nb
	return nil, errChkAgain
}

// updateRefcount adds addend to (or with decrease, subtracts it from) the
// stored refcount of every cluster of [off, off+length) (update_refcount).
// On failure the clusters already changed are changed back.
func (c *chkState) updateRefcount(off, length, addend uint64, decrease bool) error {
	if length == 0 {
		return nil
	}
	start, last := off&^(c.cs-1), (off+length-1)&^(c.cs-1)
	for cur := start; cur <= last; cur += c.cs {
		idx := cur >> c.h.ClusterBits
		b, err := c.refblockFor(idx)
		if err == nil {
			bi := idx & (1<<c.rbBits - 1)
			rc, _ := c.g.Refcount(b.data, bi)
			if decrease && addend > rc || !decrease && (rc+addend < rc || rc+addend > c.refMax) {
				err = unix.EINVAL
			} else {
				if decrease {
					rc -= addend
				} else {
					rc += addend
				}
				if rc == 0 && idx < c.freeCluster {
					c.freeCluster = idx
				}
				_ = c.g.SetRefcount(b.data, bi, rc)
				b.dirty = true
			}
		}
		if err != nil {
			if cur > off {
				_ = c.updateRefcount(off, cur-off, addend, !decrease)
			}
			return err
		}
		if cur > math.MaxUint64-c.cs {
			break
		}
	}
	return nil
}

// allocClustersNoref finds size bytes of free clusters by the stored
// refcounts, first fit from the last search (alloc_clusters_noref).
func (c *chkState) allocClustersNoref(size uint64) (uint64, error) {
	nb := c.sizeToClusters(size)
	for i := uint64(0); i < nb; i++ {
		next := c.freeCluster
		c.freeCluster++
		rc, err := c.getRefcount(next)
		if err != nil {
			return 0, err
		}
		if rc != 0 {
			i = math.MaxUint64 // restart the run (i++ makes it 0)
		}
	}
	if c.freeCluster > 0 && c.freeCluster-1 > (MaxHostOffset-1)>>c.h.ClusterBits {
		return 0, unix.EFBIG
	}
	return (c.freeCluster - nb) << c.h.ClusterBits, nil
}

// allocClusters allocates size bytes of clusters with refcount 1
// (qcow2_alloc_clusters).
func (c *chkState) allocClusters(size uint64) (uint64, error) {
	for range 64 {
		off, err := c.allocClustersNoref(size)
		if err != nil {
			return 0, err
		}
		err = c.updateRefcount(off, size, 1, false)
		if err == errChkAgain {
			continue
		}
		return off, err
	}
	return 0, unix.ENOSPC
}

// freeClusters drops a reference to every cluster of [off, off+size)
// (qcow2_free_clusters, which only reports failures).
func (c *chkState) freeClusters(off, size uint64) {
	if err := c.updateRefcount(off, size, 1, true); err != nil {
		c.msg("qcow2_free_clusters failed: %s", strerror(errnoOf(err)))
	}
}

// pwriteSync writes and flushes (bdrv_pwrite_sync).
func (c *chkState) pwriteSync(off uint64, b []byte) error {
	if err := c.pwrite(off, b); err != nil {
		return err
	}
	return c.file.Flush(c.co)
}

// writeFeatures stores new incompatible and autoclear feature bits in the
// header of a version 3 image. (QEMU rewrites the whole header; only these
// fields change.)
func (c *chkState) writeFeatures(incompat, autoclear uint64) error {
	if c.h.Version < 3 {
		return nil
	}
	var b [24]byte
	be.PutUint64(b[0:], incompat)
	be.PutUint64(b[8:], c.h.CompatibleFeatures)
	be.PutUint64(b[16:], autoclear)
	if err := c.pwriteSync(72, b[:]); err != nil {
		return err
	}
	c.incompat, c.autoclear = incompat, autoclear
	return nil
}

// writeL1Entry stores entry i of the active L1 table (qcow2_write_l1_entry).
func (c *chkState) writeL1Entry(i int, e uint64) error {
	off := c.l1Offset + uint64(i)*8
	if ol := c.metadataOverlap(chkOLActiveL1, off, 8); ol != 0 {
		c.signalOverlap(ol)
		return unix.EIO
	}
	var b [8]byte
	be.PutUint64(b[:], e)
	if err := c.pwriteSync(off, b[:]); err != nil {
		return err
	}
	c.l1[i] = e
	return nil
}

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
	off := l2Offset + uint64(i)*esz
	ign := chkOLInactiveL2
	if active {
		ign = chkOLActiveL2
	}
	if ol := c.metadataOverlap(ign, off, esz); ol != 0 {
		c.signalOverlap(ol)
		c.msg("ERROR: Overlap check failed")
		res.checkErrors++
		return true, unix.EIO
	}
	if err := c.pwriteSync(off, table[uint64(i)*esz:uint64(i+1)*esz]); err != nil {
		c.msg("ERROR: Failed to overwrite L2 table entry: %s", strerror(errnoOf(err)))
		res.checkErrors++
		return false, err
	}
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
		c.wrote = true
		err = c.file.Truncate(c.co, int64(end), false, bdrv.PreallocOff)
	}
	if err != nil {
		c.msg("Could not resize file: %s", strerror(errnoOf(err)))
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
	return cluster << c.h.ClusterBits, nil
}

// writeRefblocks writes a refcount block for every block-sized range of
// [first, end) that has clusters in use, allocating blocks in refs (so they
// count themselves) and recording them in *reftable, which it grows as
// needed (rebuild_refcounts_write_refblocks). It reports whether the table
// grew.
func (c *chkState) writeRefblocks(refs *chkRefs, first, end uint64, reftable *[]uint64) (bool, error) {
	grown := false
	firstFree := uint64(0)
	rbEntries := uint64(1) << c.rbBits
	for cluster := first; cluster < end; cluster++ {
		if refs.get(cluster) == 0 {
			continue
		}
		idx := cluster >> c.rbBits
		start := idx << c.rbBits
		var off uint64
		if uint64(len(*reftable)) > idx && (*reftable)[idx] != 0 {
			off = (*reftable)[idx]
		} else {
			firstFree = max(firstFree, start)
			var err error
			if off, err = c.allocClustersIMRT(refs, 1, &firstFree); err != nil {
				c.msg("ERROR allocating refblock: %s", strerror(errnoOf(err)))
				return false, err
			}
			if oc := off >> c.h.ClusterBits; oc >= end {
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
		if ol := c.metadataOverlap(0, off, c.cs); ol != 0 {
			c.signalOverlap(ol)
			c.msg("ERROR writing refblock: %s", strerror(unix.EIO))
			return false, unix.EIO
		}
		if err := c.pwrite(off, refs.buf[idx*c.cs:(idx+1)*c.cs]); err != nil {
			c.msg("ERROR writing refblock: %s", strerror(errnoOf(err)))
			return false, err
		}
		cluster = start + rbEntries - 1
	}
	return grown, nil
}

// rebuildRefcountStructure writes a new refcount structure made only from
// refs, the counted references, and switches the header to it
// (rebuild_refcount_structure). The old structure is left behind, leaked;
// the caller's next comparison frees it.
func (c *chkState) rebuildRefcountStructure(res *chkCounts, refs *chkRefs) error {
	if err := c.flushRefblocks(); err != nil {
		return err
	}
	c.rbCache = nil

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
			c.msg("ERROR allocating reftable: %s", strerror(errnoOf(err)))
			res.checkErrors++
			return err
		}
		start := rtOff >> c.h.ClusterBits
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
	if ol := c.metadataOverlap(0, rtOff, uint64(len(buf))); ol != 0 {
		c.signalOverlap(ol)
		c.msg("ERROR writing reftable: %s", strerror(unix.EIO))
		return unix.EIO
	}
	if err := c.pwrite(rtOff, buf); err != nil {
		c.msg("ERROR writing reftable: %s", strerror(errnoOf(err)))
		return err
	}
	if err := c.file.Flush(c.co); err != nil {
		c.msg("ERROR writing reftable: %s", strerror(errnoOf(err)))
		return err
	}
	var hdr [12]byte
	be.PutUint64(hdr[0:], rtOff)
	be.PutUint32(hdr[8:], uint32(rtClusters))
	if err := c.pwriteSync(48, hdr[:]); err != nil {
		c.msg("ERROR setting reftable: %s", strerror(errnoOf(err)))
		return err
	}
	c.reftable, c.reftableOffset = rt, rtOff
	return nil
}

// ---------------------------------------------------------------------------
// Snapshot table rewrite

// checkFixSnapshotTable rewrites the snapshot table when reading it found
// corruptions and errors are being fixed (qcow2_check_fix_snapshot_table).
// It runs after the refcounts were repaired, because it allocates.
func (c *chkState) checkFixSnapshotTable(res *chkCounts) error {
	if res.corruptions == 0 || c.fix&FixErrors == 0 {
		return nil
	}
	if err := c.writeSnapshots(); err != nil {
		res.checkErrors++
		c.msg("ERROR failed to update snapshot table: %s", strerror(errnoOf(err)))
		return err
	}
	res.corruptionsFixed += res.corruptions
	res.corruptions = 0
	return nil
}

// writeSnapshots writes the snapshot table to new clusters, points the
// header at it and frees the old one (qcow2_write_snapshots).
func (c *chkState) writeSnapshots() error {
	data, err := MarshalSnapshotTable(c.snaps)
	if err != nil {
		return unix.EFBIG
	}
	size := uint64(len(data))
	off := uint64(0)
	if size > 0 {
		if off, err = c.allocClusters(size); err != nil {
			return err
		}
	}
	fail := func(err error) error {
		if size > 0 {
			c.freeClusters(off, size)
		}
		return err
	}
	if err := c.flushRefblocks(); err != nil {
		return fail(err)
	}
	if ol := c.metadataOverlap(0, off, size); ol != 0 {
		c.signalOverlap(ol)
		return fail(unix.EIO)
	}
	if size > 0 {
		if err := c.pwriteSync(off, data); err != nil {
			return fail(err)
		}
	}
	var hdr [12]byte
	be.PutUint32(hdr[0:], uint32(len(c.snaps)))
	be.PutUint64(hdr[4:], off)
	if err := c.pwriteSync(60, hdr[:]); err != nil {
		return fail(err)
	}
	if c.snapshotsSize > 0 {
		c.freeClusters(c.snapshotsOffset, c.snapshotsSize)
	}
	c.snapshotsOffset, c.snapshotsSize = off, size
	return c.flushRefblocks()
}

// ---------------------------------------------------------------------------
// Metadata overlap check and corruption signalling

// Metadata kinds of the overlap check (QEMU's QCow2MetadataOverlap), in the
// order QEMU tests them.
const (
	chkOLMainHeader = 1 << iota
	chkOLActiveL1
	chkOLActiveL2
	chkOLRefcountTable
	chkOLRefcountBlock
	chkOLSnapshotTable
	chkOLInactiveL1
	chkOLInactiveL2
	chkOLBitmapDirectory

	// chkOLCached is QEMU's default overlap-check template "cached":
	// everything but inactive L2 tables, which would have to be read.
	chkOLCached = chkOLMainHeader | chkOLActiveL1 | chkOLActiveL2 | chkOLRefcountTable |
		chkOLRefcountBlock | chkOLSnapshotTable | chkOLInactiveL1 | chkOLBitmapDirectory
)

var chkOLNames = map[int]string{
	chkOLMainHeader:      "qcow2_header",
	chkOLActiveL1:        "active L1 table",
	chkOLActiveL2:        "active L2 table",
	chkOLRefcountTable:   "refcount table",
	chkOLRefcountBlock:   "refcount block",
	chkOLSnapshotTable:   "snapshot table",
	chkOLInactiveL1:      "inactive L1 table",
	chkOLInactiveL2:      "inactive L2 table",
	chkOLBitmapDirectory: "bitmap directory",
}

// metadataOverlap returns the kind of metadata (other than the kinds in ign)
// that a write of size bytes at off would overwrite, or 0
// (qcow2_check_metadata_overlap).
func (c *chkState) metadataOverlap(ign int, off, size uint64) int {
	chk := chkOLCached &^ ign
	if size == 0 {
		return 0
	}
	if chk&chkOLMainHeader != 0 && off < c.cs {
		return chkOLMainHeader
	}
	size = (off&(c.cs-1) + size + c.cs - 1) &^ (c.cs - 1)
	off &^= c.cs - 1
	end := satAdd(off, size)
	overlaps := func(o, n uint64) bool { return n != 0 && off < satAdd(o, n) && o < end }

	if chk&chkOLActiveL1 != 0 && overlaps(c.l1Offset, uint64(c.l1Size)*8) {
		return chkOLActiveL1
	}
	if chk&chkOLRefcountTable != 0 && overlaps(c.reftableOffset, uint64(len(c.reftable))*8) {
		return chkOLRefcountTable
	}
	if chk&chkOLSnapshotTable != 0 && overlaps(c.snapshotsOffset, c.snapshotsSize) {
		return chkOLSnapshotTable
	}
	if chk&chkOLInactiveL1 != 0 {
		for _, s := range c.snaps {
			if overlaps(s.L1TableOffset, uint64(s.L1Size)*8) {
				return chkOLInactiveL1
			}
		}
	}
	if chk&chkOLActiveL2 != 0 {
		for _, e := range c.l1 {
			if o := e & L1OffsetMask; o != 0 && overlaps(o, c.cs) {
				return chkOLActiveL2
			}
		}
	}
	if chk&chkOLRefcountBlock != 0 {
		for _, e := range c.reftable {
			if o := e & RefTableOffsetMask; o != 0 && overlaps(o, c.cs) {
				return chkOLRefcountBlock
			}
		}
	}
	if chk&chkOLBitmapDirectory != 0 && c.nbBitmaps != 0 && c.autoclear&AutoclearBitmaps != 0 &&
		overlaps(c.bitmapDirOffset, c.bitmapDirSize) {
		return chkOLBitmapDirectory
	}
	return 0
}

func satAdd(a, b uint64) uint64 {
	if a > math.MaxUint64-b {
		return math.MaxUint64
	}
	return a + b
}

// signalOverlap reports a write the overlap check refused
// (qcow2_pre_write_overlap_check).
func (c *chkState) signalOverlap(ol int) {
	c.signalCorruption(true, "Preventing invalid write on metadata (overlaps with "+chkOLNames[ol]+")")
}

// signalCorruption reports corrupt metadata the way qcow2_signal_corruption
// does: once, and when repairing (the image is writable) as a fatal event
// that sets the corrupt bit.
func (c *chkState) signalCorruption(fatal bool, what string) {
	fatal = fatal && c.fix != 0
	if c.signaled && (!fatal || c.incompat&IncompatCorrupt != 0) {
		return
	}
	if fatal {
		c.msg("qcow2: Marking image as corrupt: %s; further corruption events will be suppressed", what)
		// A version 2 header cannot store the bit; QEMU keeps it in memory.
		_ = c.writeFeatures(c.incompat|IncompatCorrupt, c.autoclear)
		c.incompat |= IncompatCorrupt
		c.dead = true
	} else {
		c.msg("qcow2: Image is corrupt: %s; further non-fatal corruption events will be suppressed", what)
	}
	c.signaled = true
}
