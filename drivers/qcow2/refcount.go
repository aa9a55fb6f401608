package qcow2

import (
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Refcount handling and host cluster allocation (QEMU's
// block/qcow2-refcount.c). Every function here is called with img.meta
// held.
//
// Allocation finds free clusters (refcount 0) from a cursor, makes sure
// refcount blocks exist for them, then raises their refcounts in the
// refcount cache. Creating a refcount block (or growing the refcount table)
// may itself take clusters the search had picked, so it reports that and the
// search starts over, as QEMU's -EAGAIN does. New refcount structures are
// placed where they describe themselves and are made durable before anything
// points at them:
//
//   - a missing refcount block for reftable index i goes to the first cluster
//     of the range it covers (all of that range is free, since no block
//     describes it), counts itself, is written and flushed, and only then
//     is the reftable entry written (and flushed);
//   - a refcount table too small for index i is replaced: new refcount
//     blocks for the start of range i, then the new table, are written to
//     that range (which no refcount covers yet), flushed, and the header
//     switched to the new table with one write and flush; the old table is
//     freed afterwards (a crash in between only leaks it).

// maxHostCluster bounds every allocated host offset (QEMU's
// QCOW_MAX_CLUSTER_OFFSET).
const maxHostCluster = MaxHostOffset - 1

// errAgain reports that refcount structures were allocated and the caller
// must restart its search for free clusters.
var errAgain = fmt.Errorf("qcow2: refcount structures allocated, retry")

func (img *Image) rbBits() uint32 { return img.g.ClusterBits + 3 - img.g.RefcountOrder }

// refblockOffsetLocked returns the refcount block for reftable index i, or
// 0 when none is allocated (all its refcounts are 0).
//
// For Check it reads the table as QEMU's qcow2_get_refcount does: reserved
// bits are ignored and a block past the end of the file reads as zeros
// (the check reports both), only an unaligned block is a corruption.
func (img *Image) refblockOffsetLocked(co *coroutine.Co, i uint64) (uint64, error) {
	if i >= uint64(len(img.reftable)) {
		return 0, nil
	}
	if img.chk != nil {
		off := img.reftable[i] & RefTableOffsetMask
		if off%img.cs != 0 {
			return 0, img.signalCorruptionLocked(co, &CorruptError{
				What:  fmt.Sprintf("Refblock offset %s unaligned (reftable index: %s)", chex(off), chex(i)),
				Table: "refcount table", Offset: img.rtOffset, Index: int64(i)})
		}
		return off, nil
	}
	off, err := img.g.DecodeRefTable(img.reftable[i], img.rtOffset, int64(i))
	if err != nil {
		return 0, img.asCorruptionLocked(co, err)
	}
	if off != 0 && off >= uint64(img.file.Length()) {
		return 0, img.signalCorruptionLocked(co, &CorruptError{
			What:  fmt.Sprintf("refcount block offset %#x beyond end of image file (%#x)", off, img.file.Length()),
			Table: "refcount table", Offset: img.rtOffset, Index: int64(i)})
	}
	return off, nil
}

// getRefcountLocked returns the refcount of host cluster c.
func (img *Image) getRefcountLocked(co *coroutine.Co, c uint64) (uint64, error) {
	rb, err := img.refblockOffsetLocked(co, c>>img.rbBits())
	if err != nil || rb == 0 {
		return 0, err
	}
	e, err := img.rcCache.getLocked(co, rb)
	if err != nil {
		return 0, err
	}
	defer img.rcCache.putLocked(e)
	return img.g.Refcount(e.buf, c&(img.g.RefblockEntries()-1))
}

// ensureRefblocksLocked makes sure refcount blocks exist for every cluster of
// the host range [off, off+length). When one is missing it creates it (and
// grows the refcount table if needed) and returns errAgain: the new metadata
// may sit where the caller meant to allocate, so the caller searches again,
// from the start of its range (QEMU's -EAGAIN from alloc_refcount_block).
func (img *Image) ensureRefblocksLocked(co *coroutine.Co, off, length uint64) error {
	if length == 0 {
		return nil
	}
	bits := img.rbBits()
	first, last := off/img.cs, (off+length-1)/img.cs
	for i := first >> bits; i <= last>>bits; i++ {
		rb, err := img.refblockOffsetLocked(co, i)
		if err != nil {
			return err
		}
		if rb != 0 {
			continue
		}
		if err := img.allocRefblockLocked(co, max(first, i<<bits)); err != nil {
			return err
		}
		return errAgain
	}
	return nil
}

// allocRefblockLocked creates the missing refcount block for host cluster c
// (QEMU's alloc_refcount_block). The block goes to the first free cluster;
// if that lies in the range the block covers, the block counts itself,
// else its refcount is recorded in the block that covers it. When the
// refcount table has no entry for the block, a new table is built
// (refcountAreaLocked). Returns nil once the block is hooked up.
func (img *Image) allocRefblockLocked(co *coroutine.Co, c uint64) error {
	bits, cs := img.rbBits(), img.cs
	i := c >> bits
	// The refcount table is written directly; L2 tables that depend on
	// refcounts go first.
	if err := img.l2Cache.flushLocked(co); err != nil {
		return err
	}
	nb, err := img.allocClustersNorefLocked(co, 1, maxHostCluster)
	if err != nil {
		return err
	}
	if nb == 0 {
		return img.signalCorruptionLocked(co, &CorruptError{What: "Preventing invalid allocation of refcount block at offset 0", Index: -1})
	}
	if err := img.checkOverlapLocked(co, nb, cs, mkNone); err != nil {
		return err
	}
	if (nb/cs)>>bits == i {
		e, err := img.rcCache.getEmptyLocked(co, nb)
		if err != nil {
			return err
		}
		img.g.SetRefcount(e.buf, (nb/cs)&(img.g.RefblockEntries()-1), 1) // it counts itself
		img.rcCache.markDirtyLocked(e)
		img.rcCache.putLocked(e)
	} else {
		// Counted elsewhere; that block may be missing too, then it is
		// made first and the caller retries.
		if err := img.ensureRefblocksLocked(co, nb, cs); err != nil {
			return err
		}
		if err := img.updateRefcountLocked(co, nb, cs, 1, false, discardNever); err != nil {
			return err
		}
		if err := img.rcCache.flushLocked(co); err != nil {
			return err
		}
		e, err := img.rcCache.getEmptyLocked(co, nb)
		if err != nil {
			return err
		}
		img.rcCache.markDirtyLocked(e)
		img.rcCache.putLocked(e)
	}
	img.addMeta(nb/cs, mkRefBlock)
	if err := img.rcCache.flushLocked(co); err != nil {
		return err
	}
	if i < uint64(len(img.reftable)) {
		buf := bdrv.AlignedBuffer(8, 8)
		be.PutUint64(buf, nb)
		if err := img.checkOverlapLocked(co, img.rtOffset+i*8, 8, mkRefTable); err != nil {
			return err
		}
		err := img.file.Pwritev(co, int64(img.rtOffset+i*8), bdrv.IOVec{buf}, 0)
		if err == nil {
			err = img.file.Flush(co)
		}
		if err != nil {
			return err
		}
		img.reftable[i] = nb
		return nil
	}
	// The table is too small: new refcount structures after everything
	// the new block and cluster c need.
	E := img.g.RefblockEntries()
	blocksUsed := (max(c+1, nb/cs+1) + E - 1) / E
	_, err = img.refcountAreaLocked(co, blocksUsed*E*cs, 0, false, i, nb)
	return err
}

// refcountMetadataSize returns the refcount blocks and table clusters
// needed to count clusters clusters plus themselves (QEMU's
// qcow2_refcount_metadata_size); generous allows the table to grow by half.
func refcountMetadataSize(clusters, cs uint64, order uint32, generous bool) (blocks, table uint64) {
	perTable := cs / 8
	perBlock := cs * 8 >> order
	var n, last uint64
	for {
		last = n
		blocks = (clusters + table + blocks + perBlock - 1) / perBlock
		table = (blocks + perTable - 1) / perTable
		n = clusters + blocks + table
		if n == last && generous {
			clusters += (table + 1) / 2
			n = 0
			generous = false
		}
		if n == last {
			return blocks, table
		}
	}
}

// maxReftableIndexLocked is the index of the last used refcount table
// entry.
func (img *Image) maxReftableIndexLocked() uint64 {
	for i := len(img.reftable) - 1; i > 0; i-- {
		if img.reftable[i] != 0 {
			return uint64(i)
		}
	}
	return 0
}

// refcountAreaLocked builds a new refcount table, and the refcount blocks
// the image lacks, at host offset start, where everything must be free:
// blocks first, then the table, all counting themselves; they are written
// and flushed, the header switched to the new table in one write, and the
// old table freed (QEMU's qcow2_refcount_area). The table is sized for the
// image up to start plus additional clusters (with room to grow unless
// exact), and may take over a block at newBlockOff for index newBlockIdx.
// Returns the end of the new structures.
func (img *Image) refcountAreaLocked(co *coroutine.Co, start, additional uint64, exact bool, newBlockIdx, newBlockOff uint64) (uint64, error) {
	cs, E := img.cs, img.g.RefblockEntries()
	totalBlocks, _ := refcountMetadataSize(start/cs+additional, cs, img.g.RefcountOrder, !exact)
	tableSize := totalBlocks
	if tableSize > MaxRefcountTableBytes/8 {
		return 0, unix.EFBIG
	}
	tableSize = (tableSize + cs/8 - 1) / (cs / 8) * (cs / 8)
	tableClusters := tableSize * 8 / cs
	areaIdx := start / cs / E
	if areaIdx >= tableSize {
		return 0, fmt.Errorf("qcow2: internal error: refcount area index %d beyond table of %d: %w", areaIdx, tableSize, unix.EIO)
	}
	newTable := make([]uint64, tableSize)
	if maxIdx := img.maxReftableIndexLocked(); tableSize > maxIdx {
		copy(newTable, img.reftable[:maxIdx+1])
	} else {
		copy(newTable, img.reftable[:tableSize])
	}
	if newBlockOff != 0 {
		newTable[newBlockIdx] = newBlockOff
	}
	var added uint64
	for i := areaIdx; i < totalBlocks; i++ {
		if newTable[i] == 0 {
			added++
		}
	}
	tableOff := start + added*cs
	end := tableOff + tableClusters*cs
	if end > maxHostCluster {
		return 0, unix.EFBIG
	}
	if err := img.checkOverlapLocked(co, start, end-start, mkNone); err != nil {
		return 0, err
	}
	blockOff := start
	for i := areaIdx; i < totalBlocks; i++ {
		var e *cacheEntry
		var err error
		if newTable[i] != 0 {
			e, err = img.rcCache.getLocked(co, newTable[i])
		} else {
			e, err = img.rcCache.getEmptyLocked(co, blockOff)
			if err == nil {
				img.rcCache.markDirtyLocked(e)
				newTable[i] = blockOff
				img.addMeta(blockOff/cs, mkRefBlock)
				blockOff += cs
			}
		}
		if err != nil {
			return 0, err
		}
		first := i * E * cs // first host offset the block covers
		if first < end {
			j := uint64(0)
			if first < start {
				j = (start - first) / cs
			}
			for endIdx := min((end-first)/cs, E); j < endIdx; j++ {
				img.g.SetRefcount(e.buf, j, 1)
			}
			img.rcCache.markDirtyLocked(e)
		}
		img.rcCache.putLocked(e)
	}
	if err := img.rcCache.flushLocked(co); err != nil {
		return 0, err
	}
	tb := bdrv.AlignedBuffer(int(tableSize*8), 4096)
	for k, v := range newTable {
		be.PutUint64(tb[k*8:], v)
	}
	if err := img.file.Pwritev(co, int64(tableOff), bdrv.IOVec{tb}, 0); err != nil {
		return 0, err
	}
	if err := img.file.Flush(co); err != nil {
		return 0, err
	}
	hb := bdrv.AlignedBuffer(12, 8)
	be.PutUint64(hb, tableOff)
	be.PutUint32(hb[8:], uint32(tableClusters))
	if err := img.file.Pwritev(co, 48, bdrv.IOVec{hb}, 0); err != nil {
		return 0, err
	}
	if err := img.file.Flush(co); err != nil {
		return 0, err
	}
	oldOff, oldClusters := img.rtOffset, uint64(img.rtCluster)
	img.reftable, img.rtOffset, img.rtCluster = newTable, tableOff, uint32(tableClusters)
	img.hdrMu.Lock()
	img.hdr.RefcountTableOffset, img.hdr.RefcountTableClusters = tableOff, uint32(tableClusters)
	img.hdrMu.Unlock()
	if err := img.freeClustersLocked(co, oldOff, oldClusters*cs, discardOther); err != nil {
		return 0, err
	}
	return end, nil
}

// lastClusterLocked returns the last cluster below size bytes of file with
// a nonzero refcount, or -1 (QEMU's qcow2_get_last_cluster).
func (img *Image) lastClusterLocked(co *coroutine.Co, size uint64) (int64, error) {
	E := img.g.RefblockEntries()
	for c := (size + img.cs - 1) / img.cs; c > 0; {
		c--
		rb, err := img.refblockOffsetLocked(co, c>>img.rbBits())
		if err != nil {
			return 0, err
		}
		if rb == 0 {
			c -= c % E
			continue
		}
		rc, err := img.getRefcountLocked(co, c)
		if err != nil {
			return 0, err
		}
		if rc > 0 {
			return int64(c), nil
		}
	}
	return -1, nil
}

// updateRefcountLocked adds addend to (or, with decrease, subtracts it from)
// the refcount of every cluster of the host range [off, off+length). The
// refcount blocks must exist (ensureRefblocksLocked) for increases. On error
// the refcounts already changed are changed back.
func (img *Image) updateRefcountLocked(co *coroutine.Co, off, length, addend uint64, decrease bool, dt discardType) error {
	if length == 0 || addend == 0 {
		return nil
	}
	if decrease {
		// A cluster may only look free on disk once no L2 entry
		// references it there.
		if err := img.rcCache.setDependencyLocked(co, img.l2Cache); err != nil {
			return err
		}
	}
	first, last := off/img.cs, (off+length-1)/img.cs
	c, err := img.doUpdateRefcountLocked(co, first, last, addend, decrease, dt)
	if err != nil && c > first {
		// Best effort: restore what was changed.
		img.doUpdateRefcountLocked(co, first, c-1, addend, !decrease, discardNever)
	}
	return err
}

// doUpdateRefcountLocked updates clusters first..last and returns the first
// cluster it did not update.
func (img *Image) doUpdateRefcountLocked(co *coroutine.Co, first, last, addend uint64, decrease bool, dt discardType) (uint64, error) {
	bits, E, max := img.rbBits(), img.g.RefblockEntries(), img.g.RefcountMax()
	c := first
	for c <= last {
		i := c >> bits
		rb, err := img.refblockOffsetLocked(co, i)
		if err != nil {
			return c, err
		}
		if rb == 0 {
			if decrease && img.chk != nil {
				return c, unix.EINVAL // as below
			}
			if decrease {
				return c, img.signalCorruptionLocked(co, &CorruptError{
					What:  fmt.Sprintf("refcount of cluster %#x underflows (no refcount block)", c*img.cs),
					Table: "refcount table", Offset: img.rtOffset, Index: int64(i)})
			}
			return c, fmt.Errorf("qcow2: internal error: no refcount block for cluster %#x", c*img.cs)
		}
		e, err := img.rcCache.getLocked(co, rb)
		if err != nil {
			return c, err
		}
		for ; c <= last && c>>bits == i; c++ {
			old, _ := img.g.Refcount(e.buf, c&(E-1))
			var nw uint64
			if decrease {
				if addend > old && img.chk != nil {
					// QEMU's update_refcount: an error, not a
					// corruption (the check reports it).
					img.rcCache.putLocked(e)
					return c, unix.EINVAL
				}
				if addend > old {
					img.rcCache.putLocked(e)
					return c, img.signalCorruptionLocked(co, &CorruptError{
						What:  fmt.Sprintf("refcount of cluster %#x underflows (%d - %d)", c*img.cs, old, addend),
						Table: "refcount block", Offset: rb, Index: int64(c & (E - 1))})
				}
				nw = old - addend
			} else {
				if addend > max-old {
					img.rcCache.putLocked(e)
					return c, unix.ERANGE
				}
				nw = old + addend
			}
			img.g.SetRefcount(e.buf, c&(E-1), nw)
			img.rcCache.markDirtyLocked(e)
			if nw == 0 {
				img.clusterFreedLocked(c, dt)
			}
		}
		img.rcCache.putLocked(e)
	}
	return c, nil
}

// clusterFreedLocked forgets everything about host cluster c, whose
// refcount dropped to 0.
func (img *Image) clusterFreedLocked(c uint64, dt discardType) {
	off := c * img.cs
	if c < img.freeClusterIndex {
		img.freeClusterIndex = c
	}
	img.l2Cache.discardLocked(off, img.cs)
	img.rcCache.discardLocked(off, img.cs)
	delete(img.metaClusters, c)
	if img.freeByteOffset != 0 && img.freeByteOffset/img.cs == c {
		img.freeByteOffset = 0
	}
	img.ccache.invalidate()
	if img.passDiscard[dt] {
		img.queueDiscardLocked(off, img.cs, false)
	}
}

// pendingDiscard is a freed host range to discard, in the image file or
// (inData) the external data file.
type pendingDiscard struct {
	off, n uint64
	inData bool
}

func (img *Image) queueDiscardLocked(off, n uint64, inData bool) {
	if k := len(img.discards); k > 0 {
		if d := &img.discards[k-1]; d.inData == inData && d.off+d.n == off {
			d.n += n
			return
		}
	}
	img.discards = append(img.discards, pendingDiscard{off, n, inData})
}

// processDiscardsLocked discards the queued ranges (QEMU's
// qcow2_process_discards). Discard is advisory: errors are ignored.
func (img *Image) processDiscardsLocked(co *coroutine.Co) {
	for _, d := range img.discards {
		f := img.file
		if d.inData {
			f = img.data
		}
		f.Pdiscard(co, int64(d.off), int64(d.n))
	}
	img.discards = img.discards[:0]
}

// settleDiscardsLocked sends the queued discards before any cluster is
// handed out: a freed cluster may be reallocated at once, and a discard of it
// sent after the new data was written would punch a hole in that data.
func (img *Image) settleDiscardsLocked(co *coroutine.Co) {
	if len(img.discards) > 0 {
		img.processDiscardsLocked(co)
	}
}

// freeClustersLocked drops one reference to every cluster of the host range
// (QEMU's qcow2_free_clusters).
func (img *Image) freeClustersLocked(co *coroutine.Co, off, size uint64, dt discardType) error {
	return img.updateRefcountLocked(co, off, size, 1, true, dt)
}

// allocClustersNorefLocked finds n contiguous free clusters from the cursor
// without taking them (QEMU's alloc_clusters_noref). All of them lie below
// limit.
func (img *Image) allocClustersNorefLocked(co *coroutine.Co, n uint64, limit uint64) (uint64, error) {
	img.settleDiscardsLocked(co)
	E := img.g.RefblockEntries()
	c := img.freeClusterIndex
	start, run := c, uint64(0)
	for run < n {
		if (start+n)*img.cs > limit {
			return 0, unix.EFBIG
		}
		rb, err := img.refblockOffsetLocked(co, c>>img.rbBits())
		if err != nil {
			return 0, err
		}
		if rb == 0 {
			// No refcount block: the rest of its range is free.
			if run == 0 {
				start = c
			}
			take := min(E-c%E, n-run)
			run += take
			c += take
			continue
		}
		rc, err := img.getRefcountLocked(co, c)
		if err != nil {
			return 0, err
		}
		if rc != 0 {
			run = 0
			start = c + 1
		} else {
			if run == 0 {
				start = c
			}
			run++
		}
		c++
	}
	img.freeClusterIndex = start + n
	return start * img.cs, nil
}

// allocTries bounds the searches for n clusters: each search that fails
// made a refcount block (or a new refcount area), and a run of n clusters
// needs at most n/E+1 blocks; beyond that, something is wrong.
func (img *Image) allocTries(n uint64) uint64 { return 64 + n/img.g.RefblockEntries() }

// allocClustersLocked allocates n contiguous clusters and returns the host
// offset of the first (QEMU's qcow2_alloc_clusters).
func (img *Image) allocClustersLocked(co *coroutine.Co, n uint64) (uint64, error) {
	for try := uint64(0); ; try++ {
		if try > img.allocTries(n) {
			return 0, fmt.Errorf("qcow2: cluster allocation does not converge: %w", unix.EIO)
		}
		off, err := img.allocClustersNorefLocked(co, n, maxHostCluster)
		if err != nil {
			return 0, err
		}
		if err := img.ensureRefblocksLocked(co, off, n*img.cs); err == errAgain {
			// Try the same clusters first (QEMU's update_refcount).
			img.freeClusterIndex = min(img.freeClusterIndex, off/img.cs)
			continue
		} else if err != nil {
			return 0, err
		}
		if err := img.checkOverlapLocked(co, off, n*img.cs, mkNone); err != nil {
			return 0, err
		}
		if err := img.updateRefcountLocked(co, off, n*img.cs, 1, false, discardNever); err != nil {
			return 0, err
		}
		return off, nil
	}
}

// allocClustersAtLocked allocates up to n clusters starting exactly at host
// offset off, stopping at the first one in use, and returns how many it got
// (QEMU's qcow2_alloc_clusters_at).
func (img *Image) allocClustersAtLocked(co *coroutine.Co, off, n uint64) (uint64, error) {
	img.settleDiscardsLocked(co)
	if off+n*img.cs > maxHostCluster {
		return 0, nil
	}
	for try := uint64(0); ; try++ {
		if try > img.allocTries(n) {
			return 0, fmt.Errorf("qcow2: cluster allocation does not converge: %w", unix.EIO)
		}
		var i uint64
		for i = 0; i < n; i++ {
			rc, err := img.getRefcountLocked(co, off/img.cs+i)
			if err != nil {
				return 0, err
			}
			if rc != 0 {
				break
			}
		}
		if i == 0 {
			return 0, nil
		}
		if err := img.ensureRefblocksLocked(co, off, i*img.cs); err == errAgain {
			img.freeClusterIndex = min(img.freeClusterIndex, off/img.cs)
			continue
		} else if err != nil {
			return 0, err
		}
		if err := img.checkOverlapLocked(co, off, i*img.cs, mkNone); err != nil {
			return 0, err
		}
		if err := img.updateRefcountLocked(co, off, i*img.cs, 1, false, discardNever); err != nil {
			return 0, err
		}
		return i, nil
	}
}

// allocBytesLocked allocates size bytes (at most a cluster) for compressed
// data, packing them after the previous compressed cluster when they fit
// (QEMU's qcow2_alloc_bytes). Every host cluster the bytes touch gains a
// reference.
func (img *Image) allocBytesLocked(co *coroutine.Co, size uint64) (uint64, error) {
	if size == 0 || size > img.cs {
		return 0, fmt.Errorf("qcow2: internal error: compressed allocation of %d bytes", size)
	}
	limit := min(uint64(1)<<(62-(img.g.ClusterBits-8)), maxHostCluster)
	for try := 0; ; try++ {
		if try > 64 {
			return 0, fmt.Errorf("qcow2: cluster allocation does not converge: %w", unix.EIO)
		}
		off := img.freeByteOffset
		if off != 0 {
			rc, err := img.getRefcountLocked(co, off/img.cs)
			if err != nil {
				return 0, err
			}
			if rc == img.g.RefcountMax() {
				off = 0
			}
		}
		free := img.cs - off%img.cs
		if off == 0 || free < size {
			nc, err := img.allocClustersNorefLocked(co, 1, limit)
			if err != nil {
				return 0, err
			}
			if nc == 0 {
				return 0, img.signalCorruptionLocked(co, &CorruptError{What: "preventing invalid allocation of compressed cluster at offset 0", Index: -1})
			}
			if off == 0 || (off+img.cs-1)/img.cs*img.cs != nc {
				off = nc
			}
		}
		if err := img.ensureRefblocksLocked(co, off, size); err == errAgain {
			// The new metadata may have taken our clusters.
			img.freeClusterIndex = min(img.freeClusterIndex, off/img.cs)
			img.freeByteOffset = 0
			continue
		} else if err != nil {
			return 0, err
		}
		if err := img.checkOverlapLocked(co, off, size, mkNone); err != nil {
			return 0, err
		}
		if err := img.updateRefcountLocked(co, off, size, 1, false, discardNever); err != nil {
			return 0, err
		}
		img.freeByteOffset = off + size
		if img.freeByteOffset%img.cs == 0 {
			img.freeByteOffset = 0
		}
		return off, nil
	}
}
