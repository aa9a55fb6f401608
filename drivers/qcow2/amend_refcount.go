package qcow2

import (
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Changing the refcount width (QEMU's qcow2_change_refcount_order).
//
// New refcount blocks and a new refcount table of the new width are built
// beside the old ones, which stay intact and in use until the header
// switches to the new ones:
//
//  1. A walk over the old refcounts finds the new blocks that will hold a
//     nonzero refcount and allocates a cluster for each (in the old
//     structures), then the new table is allocated. Both allocations change
//     refcounts, possibly in ranges whose new block was empty, so the walk
//     is repeated until one allocates nothing.
//  2. A last walk converts every refcount, including those of the new
//     blocks and table, and writes the new blocks; then the new table is
//     written and everything flushed.
//  3. One header write (and flush) switches refcount_order,
//     refcount_table_offset and refcount_table_clusters together.
//  4. The old blocks and table are freed in the new structures.
//
// A crash before step 3 leaves the old structures describing the image
// (the new clusters are leaks); after it the new ones do (the old clusters
// are leaks until step 4 frees them). A refcount the new width cannot hold
// is refused by a read-only walk before anything is written.

// amendStatus spreads the progress of an amend's operations over one
// range, as QEMU's qcow2_amend_helper_cb does: every operation reports
// (offset, work) in its own units, and work not yet seen is projected from
// the operations done so far.
type amendStatus struct {
	cb    func(offset, total int64) // nil: no progress wanted
	total int                       // operations this amend performs

	current, last int // operation ids (0: none yet)
	completed     int
	offsetDone    int64
	lastWork      int64
}

// start makes op (any nonzero id) the operation that reports next.
func (s *amendStatus) start(op int) { s.current = op }

// report is one progress call of the current operation.
func (s *amendStatus) report(offset, work int64) {
	if s == nil || s.cb == nil || s.total == 0 {
		return
	}
	if s.current != s.last {
		if s.last != 0 {
			s.offsetDone += s.lastWork
			s.completed++
		}
		s.last = s.current
	}
	s.lastWork = work
	cur := s.offsetDone + work
	projected := cur * int64(s.total-s.completed-1) / int64(s.completed+1)
	s.cb(s.offsetDone+offset, cur+projected)
}

// refblockOp is called by walkRefcountsLocked for every completed block of
// the new width: index idx in the new refcount table, its contents (nil
// when the walk does not fill blocks) and whether all its refcounts are 0.
type refblockOp func(idx uint64, block []byte, empty bool) error

// walkRefcountsLocked reads every refcount the refcount table covers, in
// cluster order, and regroups them into blocks of geometry ng, calling op
// for each (QEMU's walk_over_reftable). With fill the blocks are built in
// ng's width; a refcount that does not fit fails the walk. progress, if
// not nil, is called with each old table index and finally with the table
// size. The old refcount table may grow while op allocates; the walk
// follows it. Called with img.meta held.
func (img *Image) walkRefcountsLocked(co *coroutine.Co, ng Geometry, fill bool, op refblockOp, progress func(i, n uint64)) error {
	newE, oldE := ng.RefblockEntries(), img.g.RefblockEntries()
	var block []byte
	if fill {
		block = make([]byte, img.cs)
	}
	var idx, pos uint64 // new table index, next entry in its block
	empty := true
	complete := func() error {
		if err := op(idx, block, empty); err != nil {
			return err
		}
		if !empty {
			clear(block) // an empty block holds only zeros already
		}
		idx, pos, empty = idx+1, 0, true
		return nil
	}
	// A block listed twice is corrupt, and would make the walk's work
	// grow with the table instead of the file.
	seen := map[uint64]bool{}
	i := uint64(0)
	for ; i < uint64(len(img.reftable)); i++ {
		if progress != nil {
			progress(i, uint64(len(img.reftable)))
		}
		rb, err := img.refblockOffsetLocked(co, i)
		if err != nil {
			return err
		}
		if rb != 0 && seen[rb] {
			return img.signalCorruptionLocked(co, &CorruptError{
				What:  fmt.Sprintf("refcount block %#x listed twice", rb),
				Table: "refcount table", Offset: img.rtOffset, Index: int64(i)})
		}
		seen[rb] = true
		if rb == 0 {
			// No block: oldE refcounts of 0.
			for n := oldE; n > 0; {
				if pos == newE {
					if err := complete(); err != nil {
						return err
					}
				}
				take := min(n, newE-pos)
				pos, n = pos+take, n-take
			}
			continue
		}
		e, err := img.rcCache.getLocked(co, rb)
		if err != nil {
			return err
		}
		for j := uint64(0); j < oldE; j++ {
			if pos == newE {
				if err := complete(); err != nil {
					img.rcCache.putLocked(e)
					return err
				}
			}
			rc, err := img.g.Refcount(e.buf, j)
			if err == nil && rc > ng.RefcountMax() {
				err = fmt.Errorf("Cannot decrease refcount entry width to %d bits: Cluster at offset %#x has a refcount of %d",
					ng.RefcountBits(), (i*oldE+j)*img.cs, rc)
			}
			if err == nil && fill {
				err = ng.SetRefcount(block, pos, rc)
			}
			if err != nil {
				img.rcCache.putLocked(e)
				return err
			}
			pos++
			empty = empty && rc == 0
		}
		img.rcCache.putLocked(e)
	}
	if pos > 0 {
		if err := complete(); err != nil {
			return err
		}
	}
	if progress != nil {
		progress(i, i)
	}
	return nil
}

// changeRefcountOrderLocked rebuilds the refcount structures with
// 2^order-bit entries (see the top of this file). On failure before the
// header switch the new structures are freed again; if the header write
// itself fails they are left allocated (leaked), since the header may or
// may not have reached the disk. Called with img.meta held, nothing in
// flight, on a version 3 image.
func (img *Image) changeRefcountOrderLocked(co *coroutine.Co, order uint32, st *amendStatus) error {
	cs := img.cs
	ng := img.g
	ng.RefcountOrder = order
	noop := func(uint64, []byte, bool) error { return nil }
	if err := img.walkRefcountsLocked(co, ng, false, noop, nil); err != nil {
		return err
	}

	var newTable []uint64
	var tableOff, tableEntries uint64 // allocated new table
	switched := false
	defer func() {
		if switched {
			return
		}
		for _, off := range newTable {
			if off != 0 {
				img.freeClustersLocked(co, off, cs, discardNever)
			}
		}
		if tableOff != 0 {
			img.freeClustersLocked(co, tableOff, tableEntries*8, discardNever)
		}
	}()

	allocated := false
	alloc := func(idx uint64, _ []byte, empty bool) error {
		if empty {
			return nil
		}
		if idx >= uint64(len(newTable)) {
			n := (idx + 1 + cs/8 - 1) / (cs / 8) * (cs / 8)
			if n > MaxRefcountTableBytes/8 {
				return fmt.Errorf("This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting")
			}
			newTable = append(newTable, make([]uint64, n-uint64(len(newTable)))...)
		}
		if newTable[idx] == 0 {
			off, err := img.allocClustersLocked(co, 1)
			if err != nil {
				return fmt.Errorf("Failed to allocate refblock: %w", err)
			}
			newTable[idx] = off
			allocated = true
		}
		return nil
	}
	walk := 0
	for {
		allocated = false
		w, total := int64(walk), int64(max(walk+2, 3))
		progress := func(i, n uint64) { st.report(w*int64(n)+int64(i), total*int64(n)) }
		if err := img.walkRefcountsLocked(co, ng, false, alloc, progress); err != nil {
			return err
		}
		walk++
		if !allocated {
			break
		}
		if tableOff != 0 {
			if err := img.freeClustersLocked(co, tableOff, tableEntries*8, discardNever); err != nil {
				tableOff = 0
				return err
			}
			tableOff = 0
		}
		off, err := img.allocClustersLocked(co, uint64(len(newTable))*8/cs)
		if err != nil {
			return fmt.Errorf("Failed to allocate the new reftable: %w", err)
		}
		tableOff, tableEntries = off, uint64(len(newTable))
	}

	write := func(idx uint64, block []byte, empty bool) error {
		if idx >= uint64(len(newTable)) || newTable[idx] == 0 {
			if !empty {
				return fmt.Errorf("qcow2: internal error: refcount block %d of the new width has no cluster", idx)
			}
			return nil
		}
		off := newTable[idx]
		if err := img.checkOverlapLocked(co, off, cs, mkNone); err != nil {
			return err
		}
		buf := bdrv.AlignedBuffer(int(cs), 4096)
		copy(buf, block)
		if err := img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
			return fmt.Errorf("Failed to write refblock: %w", err)
		}
		return nil
	}
	w := int64(walk)
	progress := func(i, n uint64) { st.report(w*int64(n)+int64(i), (w+1)*int64(n)) }
	if err := img.walkRefcountsLocked(co, ng, true, write, progress); err != nil {
		return err
	}
	if uint64(len(newTable)) != tableEntries {
		return fmt.Errorf("qcow2: internal error: new refcount table of %d entries, %d allocated", len(newTable), tableEntries)
	}
	if err := img.checkOverlapLocked(co, tableOff, tableEntries*8, mkNone); err != nil {
		return err
	}
	tb := bdrv.AlignedBuffer(int(tableEntries*8), 4096)
	for k, v := range newTable {
		be.PutUint64(tb[k*8:], v)
	}
	if err := img.file.Pwritev(co, int64(tableOff), bdrv.IOVec{tb}, 0); err != nil {
		return fmt.Errorf("Failed to write the new reftable: %w", err)
	}
	// The old structures are complete on disk, and so are the new ones.
	if err := img.rcCache.flushLocked(co); err != nil {
		return fmt.Errorf("Failed to flush the refblock cache: %w", err)
	}

	h := img.Header()
	h.RefcountOrder = order
	h.RefcountTableOffset, h.RefcountTableClusters = tableOff, uint32(tableEntries*8/cs)
	switched = true // from here on, never free the new structures
	if err := img.rewriteHeaderLocked(co, &h); err != nil {
		return fmt.Errorf("Failed to update the qcow2 header: %w", err)
	}

	// The cached blocks are in the old width: drop them (they are clean).
	img.rcCache.discardLocked(0, ^uint64(0))
	oldTable, oldOff, oldClusters := img.reftable, img.rtOffset, uint64(img.rtCluster)
	img.reftable, img.rtOffset, img.rtCluster = newTable, tableOff, uint32(tableEntries*8/cs)
	for _, off := range newTable {
		if off != 0 {
			img.addMeta(off/cs, mkRefBlock)
		}
	}
	for i := range oldTable {
		off, err := img.g.DecodeRefTable(oldTable[i], oldOff, int64(i))
		if err != nil || off == 0 {
			continue // it was read and used above; a bad entry only leaks
		}
		if err := img.freeClustersLocked(co, off, cs, discardOther); err != nil {
			return err
		}
	}
	return img.freeClustersLocked(co, oldOff, oldClusters*cs, discardOther)
}
