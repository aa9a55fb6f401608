package qcow2

import (
	"fmt"
	"math/bits"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Guest-to-host mapping, cluster allocation for writes, and L2 updates
// (QEMU's block/qcow2-cluster.c). Every ...Locked function is called with
// img.meta held.

// invOffset marks "no host offset yet" (QEMU's INV_OFFSET).
const invOffset = ^uint64(0)

// cowRegion is a byte range, relative to l2Meta.offset, whose old content
// must be copied into newly allocated clusters.
type cowRegion struct{ off, n uint64 }

// l2Meta is an allocating write in flight (QEMU's QCowL2Meta): clusters
// have been allocated (refcounts raised) for nbClusters guest clusters from
// offset, their data is being written, and the L2 entries still point at the
// old clusters. Other writes overlapping its copy-on-write range wait on
// deps and then map again. It sits on img.inflight from its creation until
// handleL2MetaLocked links or aborts it.
type l2Meta struct {
	offset      uint64 // guest offset of the first cluster
	allocOffset uint64 // host offset of the first cluster
	nbClusters  uint64
	// keepOld: the clusters are the existing ones (written in place); only
	// subcluster bitmaps (or the zero flag) change.
	keepOld bool
	// prealloc: metadata preallocation, the subcluster bitmap is left alone.
	prealloc bool
	// compressed is the L2 entry of a compressed write (nbClusters 1).
	compressed uint64

	cowStart, cowEnd cowRegion
	// skipCow: the copy-on-write regions were zeroed in the file instead.
	skipCow bool
	// cowDone: copy-on-write data was written; the L2 update must wait for
	// a flush.
	cowDone bool
	// data is the guest data to write together with the COW regions in
	// one vectored write (QEMU's data_qiov), or nil.
	data bdrv.IOVec

	deps coroutine.Queue
	next *l2Meta
}

func (m *l2Meta) cowStartOff() uint64 { return m.offset + m.cowStart.off }
func (m *l2Meta) cowEndOff() uint64   { return m.offset + m.cowEnd.off + m.cowEnd.n }

// sliceOf returns the host offset of the L2 slice that maps guest offset
// off in the table at l2Off, and the entry's index in that slice.
func (img *Image) sliceOf(l2Off, off uint64) (uint64, int) {
	i := img.g.L2Index(off)
	return l2Off + i/img.l2SliceEnts*img.l2SliceSize, int(i % img.l2SliceEnts)
}

// tableOf returns the offset of the L2 table whose slice e holds the entry
// for guest offset off (for error messages).
func (img *Image) tableOf(e *cacheEntry, off uint64) uint64 {
	return e.off - img.g.L2Index(off)/img.l2SliceEnts*img.l2SliceSize
}

// l2TableLocked decodes L1 entry i and checks the L2 table it names.
func (img *Image) l2TableLocked(co *coroutine.Co, i uint64) (off uint64, copied bool, err error) {
	off, copied, err = img.g.DecodeL1(img.l1[i], img.l1Offset, int64(i))
	if err != nil {
		return 0, false, img.asCorruptionLocked(co, err)
	}
	if off == 0 {
		if copied {
			return 0, false, img.signalCorruptionLocked(co, &CorruptError{What: "L1 entry has COPIED set but no L2 table",
				Table: "L1 table", Offset: img.l1Offset, Index: int64(i)})
		}
		return 0, false, nil
	}
	if off >= uint64(img.file.Length()) {
		return 0, false, img.signalCorruptionLocked(co, &CorruptError{
			What:  fmt.Sprintf("L2 table offset %#x beyond end of image file (%#x)", off, img.file.Length()),
			Table: "L1 table", Offset: img.l1Offset, Index: int64(i)})
	}
	return off, copied, nil
}

// hostMapping describes a run of guest bytes (QEMU's qcow2_get_host_offset
// results).
type hostMapping struct {
	typ SubclusterType
	// host is the host offset of the first byte for the allocated types
	// (normal, zero-alloc, unallocated-alloc), or the whole L2 entry for a
	// compressed cluster.
	host uint64
	// n is the number of bytes from the queried offset that share typ
	// and, for allocated types, are contiguous in the host file. A
	// compressed run never leaves its cluster.
	n uint64
}

// getHostOffsetLocked maps up to bytes guest bytes from off (QEMU's
// qcow2_get_host_offset). It never crosses an L2 slice.
func (img *Image) getHostOffsetLocked(co *coroutine.Co, off, bytes uint64) (hostMapping, error) {
	g, cs := img.g, img.cs
	oic := off & (cs - 1)
	need := bytes + oic
	sidx := g.L2Index(off) % img.l2SliceEnts
	need = min(need, (img.l2SliceEnts-sidx)<<g.ClusterBits)
	unalloc := hostMapping{typ: SubclusterUnallocatedPlain, n: need - oic}

	l1i := g.L1Index(off)
	if l1i >= uint64(len(img.l1)) {
		return unalloc, nil
	}
	l2Off, _, err := img.l2TableLocked(co, l1i)
	if err != nil || l2Off == 0 {
		return unalloc, err
	}
	sliceOff, idx := img.sliceOf(l2Off, off)
	e, err := img.l2Cache.getLocked(co, sliceOff)
	if err != nil {
		return hostMapping{}, err
	}
	defer img.l2Cache.putLocked(e)

	nbClusters := (need + cs - 1) / cs
	scIdx := g.SubclusterIndex(off)
	nsc := g.Subclusters()
	var m hostMapping
	var expect uint64
	checkOff := false
	count := 0
	for i := 0; i < int(nbClusters); i++ {
		ent, bm, _ := g.L2EntryAt(e.buf, idx+i)
		l2Index := g.L2Index(off) + uint64(i)
		if err := g.CheckL2(ent, bm, l2Off, int64(l2Index)); err != nil {
			return hostMapping{}, img.asCorruptionLocked(co, err)
		}
		first := 0
		if i == 0 {
			first = scIdx
		}
		t, run := g.SubclusterRun(ent, bm, first)
		if t == SubclusterInvalid {
			return hostMapping{}, img.corruptL2Locked(co, l2Off, l2Index, "invalid cluster entry %#016x bitmap %#016x", ent, bm)
		}
		if i == 0 {
			m.typ = t
			switch t {
			case SubclusterCompressed:
				m.host = ent
				count = run
			case SubclusterNormal, SubclusterZeroAlloc, SubclusterUnallocatedAlloc:
				hc := HostOffset(ent)
				if img.hdr.HasDataFile() && hc != off-oic {
					return hostMapping{}, img.corruptL2Locked(co, l2Off, l2Index,
						"external data file host cluster offset %#x does not match guest cluster offset %#x", hc, off-oic)
				}
				m.host = hc + oic
				expect = hc
				checkOff = true
			}
			if t == SubclusterCompressed {
				break
			}
		} else {
			if t != m.typ {
				break
			}
			if checkOff {
				expect += cs
				if HostOffset(ent) != expect {
					break
				}
			}
		}
		count += run
		if first+run < nsc {
			break
		}
	}
	avail := uint64(count+scIdx) << g.SubclusterBits()
	m.n = min(avail, need) - oic
	return m, nil
}

// getClusterTableLocked returns the L2 slice holding the entry for guest
// offset off, and the entry's index in it, for an update: a missing L2 table
// is allocated and a shared one copied first (QEMU's get_cluster_table).
// The caller must put the slice.
func (img *Image) getClusterTableLocked(co *coroutine.Co, off uint64) (*cacheEntry, int, error) {
	l1i := img.g.L1Index(off)
	if l1i >= uint64(len(img.l1)) {
		return nil, 0, fmt.Errorf("qcow2: guest offset %#x beyond the L1 table (%d entries): %w", off, len(img.l1), unix.EIO)
	}
	l2Off, copied, err := img.l2TableLocked(co, l1i)
	if err != nil {
		return nil, 0, err
	}
	if !copied {
		// No table, or one shared with a snapshot: the active L1
		// gets its own.
		newOff, err := img.l2AllocateLocked(co, l1i, l2Off)
		if err != nil {
			return nil, 0, err
		}
		if l2Off != 0 {
			if err := img.freeClustersLocked(co, l2Off, img.cs, discardOther); err != nil {
				return nil, 0, err
			}
		}
		l2Off = newOff
	}
	sliceOff, idx := img.sliceOf(l2Off, off)
	e, err := img.l2Cache.getLocked(co, sliceOff)
	if err != nil {
		return nil, 0, err
	}
	return e, idx, nil
}

// l2AllocateLocked allocates an L2 table for L1 entry i, copying the table
// at oldOff into it (or zeroing it if oldOff is 0), and makes the L1 entry
// point to it. Order: refcount of the new table on disk, then the table,
// then the L1 entry, each flushed (QEMU's l2_allocate).
func (img *Image) l2AllocateLocked(co *coroutine.Co, i, oldOff uint64) (uint64, error) {
	newOff, err := img.allocClustersLocked(co, 1)
	if err != nil {
		return 0, err
	}
	fail := func(err error) (uint64, error) {
		img.l2Cache.discardLocked(newOff, img.cs)
		img.dropMeta(newOff/img.cs, mkActiveL2)
		img.freeClustersLocked(co, newOff, img.cs, discardAlways)
		return 0, err
	}
	if err := img.rcCache.flushLocked(co); err != nil {
		return fail(err)
	}
	img.addMeta(newOff/img.cs, mkActiveL2)
	for s := uint64(0); s < img.cs/img.l2SliceSize; s++ {
		ne, err := img.l2Cache.getEmptyLocked(co, newOff+s*img.l2SliceSize)
		if err != nil {
			return fail(err)
		}
		if oldOff != 0 {
			oe, err := img.l2Cache.getLocked(co, oldOff+s*img.l2SliceSize)
			if err != nil {
				img.l2Cache.putLocked(ne)
				return fail(err)
			}
			copy(ne.buf, oe.buf)
			img.l2Cache.putLocked(oe)
		}
		img.l2Cache.markDirtyLocked(ne)
		img.l2Cache.putLocked(ne)
	}
	if err := img.l2Cache.flushLocked(co); err != nil {
		return fail(err)
	}
	old := img.l1[i]
	img.l1[i] = newOff | OflagCopied
	if err := img.writeL1EntryLocked(co, i); err != nil {
		img.l1[i] = old
		return fail(err)
	}
	if oldOff != 0 {
		img.dropMeta(oldOff/img.cs, mkActiveL2)
	}
	return newOff, nil
}

// writeL1EntryLocked writes the 512-byte sector of the L1 table holding
// entry i, and flushes (QEMU's qcow2_write_l1_entry).
func (img *Image) writeL1EntryLocked(co *coroutine.Co, i uint64) error {
	const perSector = 512 / 8
	start := i &^ (perSector - 1)
	n := min(perSector, uint64(len(img.l1))-start)
	buf := bdrv.AlignedBuffer(int(n*8), 512)
	for k := uint64(0); k < n; k++ {
		be.PutUint64(buf[k*8:], img.l1[start+k])
	}
	off := img.l1Offset + start*8
	if err := img.checkOverlapLocked(co, off, n*8, mkActiveL1); err != nil {
		return err
	}
	if err := img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
		return err
	}
	return img.file.Flush(co)
}

// needsNewAlloc reports whether a write to the cluster of L2 entry e needs a
// new cluster: it is unallocated, compressed, zero without a cluster, or
// shared (no COPIED flag).
func (img *Image) needsNewAlloc(e uint64) bool {
	switch img.g.ClusterType(e) {
	case ClusterNormal, ClusterZeroAlloc:
		return e&OflagCopied == 0
	}
	return true
}

// countSingleWriteClustersLocked counts the clusters from entry idx of a
// slice that one write can handle: needing new allocation (newAlloc), or
// writable in place and contiguous on the host.
func (img *Image) countSingleWriteClustersLocked(e *cacheEntry, idx int, nb uint64, newAlloc bool) uint64 {
	first, _, _ := img.g.L2EntryAt(e.buf, idx)
	expect := HostOffset(first)
	var i uint64
	for i = 0; i < nb; i++ {
		ent, _, _ := img.g.L2EntryAt(e.buf, idx+int(i))
		if img.needsNewAlloc(ent) != newAlloc {
			break
		}
		if !newAlloc {
			if HostOffset(ent) != expect {
				break
			}
			expect += img.cs
		}
	}
	return i
}

// handleDependenciesLocked shortens *bytes so that the write from guestOff
// stops before the first in-flight allocation it overlaps. If the overlap
// starts at guestOff and no allocation was made for this request yet
// (haveMeta false), it waits for that allocation to finish and returns
// waited; the caller must map again from scratch (QEMU's
// handle_dependencies and its -EAGAIN).
func (img *Image) handleDependenciesLocked(co *coroutine.Co, guestOff uint64, bytes *uint64, haveMeta bool) (waited bool) {
	n := *bytes
	for _, m := range img.inflight {
		start, end := guestOff, guestOff+n
		oldStart := m.cowStartOff() &^ (img.cs - 1)
		oldEnd := (m.cowEndOff() + img.cs - 1) &^ (img.cs - 1)
		if end <= oldStart || start >= oldEnd {
			continue
		}
		if m.keepOld && (end <= m.cowStartOff() || start >= m.cowEndOff()) {
			// Same clusters, written in place, but the copied areas
			// do not meet: no conflict.
			continue
		}
		if start < oldStart {
			n = oldStart - start
			continue
		}
		if haveMeta {
			*bytes = 0
			return false
		}
		m.deps.Wait(co, &img.meta)
		return true
	}
	*bytes = n
	return false
}

// waitInflightLocked waits until no in-flight allocation touches the
// clusters of the guest range [off, off+bytes), for operations that rewrite
// L2 entries outside the allocation path (write-zeroes, discard, compressed
// writes).
func (img *Image) waitInflightLocked(co *coroutine.Co, off, bytes uint64) {
	start := off &^ (img.cs - 1)
	end := (off + bytes + img.cs - 1) &^ (img.cs - 1)
again:
	for _, m := range img.inflight {
		os := m.offset
		oe := m.offset + m.nbClusters*img.cs
		if start < oe && os < end {
			m.deps.Wait(co, &img.meta)
			goto again
		}
	}
}

// handleCopiedLocked finds clusters at guestOff that can be written in place
// (QEMU's handle_copied). *hostOff, if not invOffset, is where they must
// start to continue the host range already gathered. Returns 1 with *bytes
// shortened to what can be written in place and *hostOff set; 0 if the first
// cluster needs allocation (*bytes unchanged), or if it is in place but not
// at *hostOff (*bytes set to 0).
func (img *Image) handleCopiedLocked(co *coroutine.Co, guestOff uint64, hostOff, bytes *uint64, metas **l2Meta) (int, error) {
	cs := img.cs
	oic := guestOff & (cs - 1)
	sidx := img.g.L2Index(guestOff) % img.l2SliceEnts
	nb := min((oic+*bytes+cs-1)/cs, img.l2SliceEnts-sidx)

	e, idx, err := img.getClusterTableLocked(co, guestOff)
	if err != nil {
		return 0, err
	}
	defer img.l2Cache.putLocked(e)
	ent, bm, _ := img.g.L2EntryAt(e.buf, idx)
	if img.needsNewAlloc(ent) {
		return 0, nil
	}
	if err := img.g.CheckL2(ent, bm, img.tableOf(e, guestOff), int64(img.g.L2Index(guestOff))); err != nil {
		return 0, img.asCorruptionLocked(co, err)
	}
	hc := HostOffset(ent)
	if img.hdr.HasDataFile() {
		if hc != guestOff-oic {
			return 0, img.corruptL2Locked(co, img.tableOf(e, guestOff), img.g.L2Index(guestOff),
				"external data file host cluster offset %#x does not match guest cluster offset %#x", hc, guestOff-oic)
		}
	} else if hc >= uint64(img.data.Length()) {
		return 0, img.corruptL2Locked(co, img.tableOf(e, guestOff), img.g.L2Index(guestOff),
			"data cluster offset %#x beyond end of image file (%#x)", hc, img.data.Length())
	}
	if *hostOff != invOffset && hc != *hostOff {
		*bytes = 0
		return 0, nil
	}
	keep := img.countSingleWriteClustersLocked(e, idx, nb, false)
	*bytes = min(*bytes, keep*cs-oic)
	m, err := img.calculateL2MetaLocked(co, hc, guestOff, *bytes, e, idx, true)
	if err != nil {
		return 0, err
	}
	if m != nil {
		m.next = *metas
		*metas = m
	}
	*hostOff = hc + oic
	return 1, nil
}

// handleAllocLocked allocates new clusters for guestOff (QEMU's
// handle_alloc). With *hostOff set they must start there (to extend the
// host range); returns 0 with *bytes 0 if that is not possible. Returns 1
// with *hostOff and a possibly shortened *bytes otherwise.
func (img *Image) handleAllocLocked(co *coroutine.Co, guestOff uint64, hostOff, bytes *uint64, metas **l2Meta) (int, error) {
	cs := img.cs
	oic := guestOff & (cs - 1)
	sidx := img.g.L2Index(guestOff) % img.l2SliceEnts
	nb := min((oic+*bytes+cs-1)/cs, img.l2SliceEnts-sidx)

	e, idx, err := img.getClusterTableLocked(co, guestOff)
	if err != nil {
		return 0, err
	}
	defer img.l2Cache.putLocked(e)
	nb = img.countSingleWriteClustersLocked(e, idx, nb, true)
	if nb == 0 {
		return 0, fmt.Errorf("qcow2: internal error: nothing to allocate at %#x: %w", guestOff, unix.EIO)
	}
	var alloc uint64
	fresh := false
	switch {
	case img.hdr.HasDataFile():
		alloc = guestOff - oic
	case *hostOff == invOffset:
		if alloc, err = img.allocClustersLocked(co, nb); err != nil {
			return 0, err
		}
		fresh = true
	default:
		alloc = *hostOff - oic
		got, err := img.allocClustersAtLocked(co, alloc, nb)
		if err != nil {
			return 0, err
		}
		if got == 0 {
			*bytes = 0
			return 0, nil
		}
		nb, fresh = got, true
	}
	nbBytes := min(*bytes+oic, nb*cs)
	*bytes = min(*bytes, nbBytes-oic)
	m, err := img.calculateL2MetaLocked(co, alloc, guestOff, *bytes, e, idx, false)
	if err != nil {
		if fresh {
			img.freeClustersLocked(co, alloc, nb*cs, discardNever)
		}
		return 0, err
	}
	if m == nil {
		return 0, fmt.Errorf("qcow2: internal error: allocation without metadata update at %#x: %w", guestOff, unix.EIO)
	}
	// Clusters allocated beyond what the request needs are returned.
	if used := m.nbClusters; fresh && used < nb {
		img.freeClustersLocked(co, alloc+used*cs, (nb-used)*cs, discardNever)
	}
	img.counters.clustersAllocated.Add(m.nbClusters)
	m.next = *metas
	*metas = m
	*hostOff = alloc + oic
	return 1, nil
}

// scIndexOf returns the subcluster index of byte x within its cluster.
func (img *Image) scIndexOf(x uint64) int {
	return int((x & (img.cs - 1)) >> img.g.SubclusterBits())
}

// calculateL2MetaLocked creates the in-flight allocation record for a write
// of bytes at guestOff into the clusters at hostCl, with its copy-on-write
// regions, and puts it on img.inflight (QEMU's calculate_l2_meta). It
// returns nil when keepOld is set and nothing but the data changes (every
// touched subcluster is already a normal one).
func (img *Image) calculateL2MetaLocked(co *coroutine.Co, hostCl, guestOff, bytes uint64, e *cacheEntry, idx int, keepOld bool) (*l2Meta, error) {
	g, cs := img.g, img.cs
	scBits := g.SubclusterBits()
	scSize := g.SubclusterSize()
	cowStartTo := guestOff & (cs - 1)
	cowEndFrom := cowStartTo + bytes
	nb := (cowEndFrom + cs - 1) / cs
	skipCow := keepOld
	l2Index := g.L2Index(guestOff)
	for i := uint64(0); i < nb; i++ {
		ent, bm, _ := g.L2EntryAt(e.buf, idx+int(i))
		var t SubclusterType
		if skipCow {
			from := max(cowStartTo, i*cs)
			to := min(cowEndFrom, (i+1)*cs)
			firstSc, lastSc := img.scIndexOf(from), img.scIndexOf(to-1)
			var cnt int
			t, cnt = g.SubclusterRun(ent, bm, firstSc)
			if t != SubclusterNormal || firstSc+cnt <= lastSc {
				skipCow = false
			}
		} else {
			t = g.SubclusterType(ent, bm, 0)
		}
		if t == SubclusterInvalid {
			return nil, img.corruptL2Locked(co, img.tableOf(e, guestOff), l2Index+i, "invalid cluster entry %#016x bitmap %#016x", ent, bm)
		}
	}
	if skipCow {
		return nil, nil
	}

	ent, bm, _ := g.L2EntryAt(e.buf, idx)
	sc := img.scIndexOf(guestOff)
	t := g.SubclusterType(ent, bm, sc)
	var cowStartFrom uint64
	bad := func() (*l2Meta, error) {
		return nil, img.corruptL2Locked(co, img.tableOf(e, guestOff), l2Index, "unexpected %s subcluster in a write (entry %#016x bitmap %#016x)", t, ent, bm)
	}
	switch {
	case !keepOld && t == SubclusterCompressed:
		cowStartFrom = 0
	case !keepOld && (t == SubclusterNormal || t == SubclusterZeroAlloc || t == SubclusterUnallocatedAlloc):
		if g.ExtendedL2 {
			cowStartFrom = uint64(min(sc, bits.TrailingZeros32(uint32(bm)))) << scBits
		}
	case !keepOld && (t == SubclusterZeroPlain || t == SubclusterUnallocatedPlain):
		cowStartFrom = uint64(sc) << scBits
	case keepOld && t == SubclusterNormal:
		cowStartFrom = cowStartTo
	case keepOld && (t == SubclusterZeroAlloc || t == SubclusterUnallocatedAlloc):
		cowStartFrom = uint64(sc) << scBits
	default:
		return bad()
	}

	ent, bm, _ = g.L2EntryAt(e.buf, idx+int(nb-1))
	sc = img.scIndexOf(guestOff + bytes - 1)
	t = g.SubclusterType(ent, bm, sc)
	roundCluster := (cowEndFrom + cs - 1) / cs * cs
	var cowEndTo uint64
	switch {
	case !keepOld && t == SubclusterCompressed:
		cowEndTo = roundCluster
	case !keepOld && (t == SubclusterNormal || t == SubclusterZeroAlloc || t == SubclusterUnallocatedAlloc):
		cowEndTo = roundCluster
		if g.ExtendedL2 {
			cowEndTo -= uint64(min(SubclustersPerCluster-sc-1, bits.LeadingZeros32(uint32(bm)))) << scBits
		}
	case !keepOld && (t == SubclusterZeroPlain || t == SubclusterUnallocatedPlain):
		cowEndTo = (cowEndFrom + scSize - 1) / scSize * scSize
	case keepOld && t == SubclusterNormal:
		cowEndTo = cowEndFrom
	case keepOld && (t == SubclusterZeroAlloc || t == SubclusterUnallocatedAlloc):
		cowEndTo = (cowEndFrom + scSize - 1) / scSize * scSize
	default:
		return bad()
	}

	m := &l2Meta{
		offset:      guestOff &^ (cs - 1),
		allocOffset: hostCl,
		nbClusters:  nb,
		keepOld:     keepOld,
		cowStart:    cowRegion{cowStartFrom, cowStartTo - cowStartFrom},
		cowEnd:      cowRegion{cowEndFrom, cowEndTo - cowEndFrom},
	}
	img.inflight = append(img.inflight, m)
	return m, nil
}

// allocHostOffsetLocked maps, allocating where needed, as much as possible of
// the write of bytes at guest offset off into one contiguous host range
// (QEMU's qcow2_alloc_host_offset). It returns the host offset of off, the
// number of bytes the range covers, and the in-flight allocations the caller
// must link (or abort, even on error) with handleL2MetaLocked.
func (img *Image) allocHostOffsetLocked(co *coroutine.Co, off, bytes uint64) (host, n uint64, metas *l2Meta, err error) {
again:
	start, remaining := off, bytes
	clusterOff, hostOff := invOffset, invOffset
	cur := uint64(0)
	metas = nil
	for {
		if hostOff == invOffset && clusterOff != invOffset {
			hostOff = clusterOff
		}
		start += cur
		remaining -= cur
		if clusterOff != invOffset {
			clusterOff += cur
		}
		if remaining == 0 {
			break
		}
		cur = remaining
		// 1. Stop before, or wait for, overlapping allocations in flight.
		if img.handleDependenciesLocked(co, start, &cur, metas != nil) {
			goto again
		}
		if cur == 0 {
			break
		}
		// 2. Clusters writable in place.
		r, err := img.handleCopiedLocked(co, start, &clusterOff, &cur, &metas)
		if err != nil {
			return 0, 0, metas, err
		}
		if r == 1 {
			continue
		}
		if cur == 0 {
			break
		}
		// 3. New clusters.
		r, err = img.handleAllocLocked(co, start, &clusterOff, &cur, &metas)
		if err != nil {
			return 0, 0, metas, err
		}
		if r == 1 {
			continue
		}
		break
	}
	n = bytes - remaining
	if n == 0 || hostOff == invOffset {
		return 0, 0, metas, fmt.Errorf("qcow2: internal error: no progress mapping %#x: %w", off, unix.EIO)
	}
	return hostOff, n, metas, nil
}

// linkL2Locked points the L2 entries of an in-flight allocation at its
// clusters, after its data (and copy-on-write) was written, and drops the
// references to the clusters it replaced (QEMU's
// qcow2_alloc_cluster_link_l2).
func (img *Image) linkL2Locked(co *coroutine.Co, m *l2Meta) error {
	g, cs := img.g, img.cs
	if img.lazy {
		if err := img.markDirtyLocked(co); err != nil {
			return err
		}
	}
	if img.needAccurateRefcountsLocked() {
		if err := img.l2Cache.setDependencyLocked(co, img.rcCache); err != nil {
			return err
		}
	}
	e, idx, err := img.getClusterTableLocked(co, m.offset)
	if err != nil {
		return err
	}
	img.l2Cache.markDirtyLocked(e)
	var old []uint64
	writtenFrom := m.cowStart.off
	writtenTo := m.cowEnd.off + m.cowEnd.n
	for i := uint64(0); i < m.nbClusters; i++ {
		ent, bm, _ := g.L2EntryAt(e.buf, idx+int(i))
		if ent != 0 {
			old = append(old, ent)
		}
		var ne, nbm uint64
		if m.compressed != 0 {
			ne = m.compressed
		} else {
			ne, err = g.EncodeL2Normal(m.allocOffset+i*cs, true)
			if err != nil {
				img.l2Cache.putLocked(e)
				return fmt.Errorf("qcow2: %w: %w", err, unix.EIO)
			}
			nbm = bm
			if g.ExtendedL2 && !m.prealloc {
				from, to := max(writtenFrom, i*cs), min(writtenTo, (i+1)*cs)
				if from < to {
					fsc, lsc := img.scIndexOf(from), img.scIndexOf(to-1)
					nbm |= SubAllocRange(fsc, lsc+1)
					nbm &^= SubZeroRange(fsc, lsc+1)
				}
			}
		}
		g.SetL2EntryAt(e.buf, idx+int(i), ne, nbm)
	}
	img.l2Cache.putLocked(e)
	if !m.keepOld {
		for _, o := range old {
			// Not discarded: the next write is likely to reuse it.
			if err := img.freeAnyClusterLocked(co, o, discardNever); err != nil {
				return err
			}
		}
	}
	return nil
}

// abortLocked frees the clusters of an allocation that will not be linked
// (QEMU's qcow2_alloc_cluster_abort).
func (img *Image) abortLocked(co *coroutine.Co, m *l2Meta) {
	switch {
	case m.compressed != 0:
		off, n := img.g.CompressedRange(m.compressed)
		img.freeClustersLocked(co, off, n, discardNever)
	case !m.keepOld && !img.hdr.HasDataFile():
		img.freeClustersLocked(co, m.allocOffset, m.nbClusters*img.cs, discardNever)
	}
}

// handleL2MetaLocked links (link true) or aborts every allocation of a
// request, removes them from the in-flight list and wakes the requests
// waiting for them (QEMU's qcow2_handle_l2meta).
func (img *Image) handleL2MetaLocked(co *coroutine.Co, metas *l2Meta, link bool) error {
	var first error
	for m := metas; m != nil; m = m.next {
		if link && first == nil {
			var err error
			if m.cowDone {
				img.l2Cache.setDependsOnFlushLocked()
			}
			if err = img.linkL2Locked(co, m); err != nil {
				first = err
				img.abortLocked(co, m)
			}
		} else {
			img.abortLocked(co, m)
		}
		img.removeInflightLocked(m)
		m.deps.RestartAll(co)
	}
	img.processDiscardsLocked(co)
	return first
}

// removeInflightLocked takes m off the in-flight list.
func (img *Image) removeInflightLocked(m *l2Meta) {
	for i, x := range img.inflight {
		if x == m {
			img.inflight = append(img.inflight[:i], img.inflight[i+1:]...)
			return
		}
	}
}

// freeAnyClusterLocked drops the reference an L2 entry holds (QEMU's
// qcow2_free_any_cluster).
func (img *Image) freeAnyClusterLocked(co *coroutine.Co, ent uint64, dt discardType) error {
	switch img.g.ClusterType(ent) {
	case ClusterCompressed:
		off, n := img.g.CompressedRange(ent)
		return img.freeClustersLocked(co, off, n, dt)
	case ClusterNormal, ClusterZeroAlloc:
		hc := HostOffset(ent)
		if hc%img.cs != 0 {
			return img.signalCorruptionLocked(co, &CorruptError{
				What: fmt.Sprintf("cannot free unaligned cluster %#x", hc), Index: -1})
		}
		if img.hdr.HasDataFile() {
			// Not refcounted; a raw data file was zeroed already by
			// whoever dropped the cluster, and must keep its blocks.
			if img.passDiscard[dt] && !img.hdr.DataFileRaw() {
				img.queueDiscardLocked(hc, img.cs, true)
			}
			return nil
		}
		return img.freeClustersLocked(co, hc, img.cs, dt)
	}
	return nil
}

// discardInL2SliceLocked discards up to nb clusters from guest offset off,
// within one L2 slice, and returns how many it handled (QEMU's
// discard_in_l2_slice). Without full, discarded clusters read as zeros in
// version 3 (the zero flag) and fall back to the backing file in version 2.
func (img *Image) discardInL2SliceLocked(co *coroutine.Co, off, nb uint64, dt discardType, full bool) (uint64, error) {
	g := img.g
	sidx := g.L2Index(off) % img.l2SliceEnts
	nb = min(nb, img.l2SliceEnts-sidx)
	backing := img.node.Backing != nil
	if l1i := g.L1Index(off); l1i < uint64(len(img.l1)) && img.l1[l1i] == 0 && !full && !backing {
		// No table: nothing to drop, and nothing below shows through
		// that should not. (A full discard, from a shrink or an
		// emptying, gets a table as QEMU's get_cluster_table gives it
		// one: the image then has the tables QEMU's would have.)
		return nb, nil
	}
	e, idx, err := img.getClusterTableLocked(co, off)
	if err != nil {
		return 0, err
	}
	defer img.l2Cache.putLocked(e)
	for i := 0; i < int(nb); i++ {
		ent, bm, _ := g.L2EntryAt(e.buf, idx+i)
		t := g.ClusterType(ent)
		allocated := t == ClusterNormal || t == ClusterZeroAlloc || t == ClusterCompressed
		ne, nbm := ent, bm
		switch {
		case full:
			ne, nbm = 0, 0
		case backing || allocated:
			if g.ExtendedL2 {
				ne, nbm = 0, BitmapAllZero
			} else if g.Version >= 3 {
				ne = OflagZero
			} else {
				ne = 0
			}
		}
		if ne == ent && nbm == bm {
			continue
		}
		img.l2Cache.markDirtyLocked(e)
		g.SetL2EntryAt(e.buf, idx+i, ne, nbm)
		if err := img.freeAnyClusterLocked(co, ent, dt); err != nil {
			return 0, err
		}
	}
	return nb, nil
}

// clusterDiscardLocked discards whole clusters of [off, off+bytes) (QEMU's
// qcow2_cluster_discard); the end may be the unaligned image end.
func (img *Image) clusterDiscardLocked(co *coroutine.Co, off, bytes uint64, dt discardType, full bool) error {
	nb := (bytes + img.cs - 1) / img.cs
	var err error
	for nb > 0 {
		var done uint64
		if done, err = img.discardInL2SliceLocked(co, off, nb, dt, full); err != nil {
			break
		}
		nb -= done
		off += done * img.cs
	}
	img.processDiscardsLocked(co)
	return err
}

// zeroInL2SliceLocked makes up to nb whole clusters from off, within one L2
// slice, read as zeros and returns how many it handled (QEMU's
// zero_in_l2_slice): the zero flag (or an all-zero subcluster bitmap),
// keeping the host cluster unless unmap allows freeing it. Compressed
// clusters are always freed.
func (img *Image) zeroInL2SliceLocked(co *coroutine.Co, off, nb uint64, unmap bool) (uint64, error) {
	g := img.g
	sidx := g.L2Index(off) % img.l2SliceEnts
	nb = min(nb, img.l2SliceEnts-sidx)
	e, idx, err := img.getClusterTableLocked(co, off)
	if err != nil {
		return 0, err
	}
	defer img.l2Cache.putLocked(e)
	for i := 0; i < int(nb); i++ {
		ent, bm, _ := g.L2EntryAt(e.buf, idx+i)
		t := g.ClusterType(ent)
		free := t == ClusterCompressed || (unmap && (t == ClusterNormal || t == ClusterZeroAlloc))
		ne, nbm := ent, bm
		if free {
			ne = 0
		}
		if g.ExtendedL2 {
			nbm = BitmapAllZero
		} else {
			ne |= OflagZero
		}
		if ne == ent && nbm == bm {
			continue
		}
		img.l2Cache.markDirtyLocked(e)
		g.SetL2EntryAt(e.buf, idx+i, ne, nbm)
		if free {
			if err := img.freeAnyClusterLocked(co, ent, discardRequest); err != nil {
				return 0, err
			}
		}
	}
	return nb, nil
}

// zeroL2SubclustersLocked makes nsc subclusters from off (inside one
// cluster, not all of it) read as zeros (QEMU's zero_l2_subclusters).
// Compressed clusters cannot be partly zeroed: ErrNotSupported.
func (img *Image) zeroL2SubclustersLocked(co *coroutine.Co, off uint64, nsc int) error {
	g := img.g
	if !g.ExtendedL2 {
		return bdrv.ErrNotSupported
	}
	e, idx, err := img.getClusterTableLocked(co, off)
	if err != nil {
		return err
	}
	defer img.l2Cache.putLocked(e)
	ent, bm, _ := g.L2EntryAt(e.buf, idx)
	switch g.ClusterType(ent) {
	case ClusterCompressed:
		return bdrv.ErrNotSupported
	case ClusterNormal, ClusterUnallocated:
	default:
		return img.corruptL2Locked(co, img.tableOf(e, off), g.L2Index(off), "zero cluster entry %#016x with extended L2 entries", ent)
	}
	sc := img.scIndexOf(off)
	nbm := bm | SubZeroRange(sc, sc+nsc)
	nbm &^= SubAllocRange(sc, sc+nsc)
	if nbm != bm {
		g.SetL2EntryAt(e.buf, idx, ent, nbm)
		img.l2Cache.markDirtyLocked(e)
	}
	return nil
}

// subclusterZeroizeLocked makes [off, off+bytes), aligned to subclusters
// (the end may be the unaligned image end), read as zeros (QEMU's
// qcow2_subcluster_zeroize).
func (img *Image) subclusterZeroizeLocked(co *coroutine.Co, off, bytes uint64, unmap bool) error {
	cs := img.cs
	end := off + bytes
	size := uint64(img.node.Length())
	if img.g.Version < 3 {
		if img.node.Backing == nil {
			return img.clusterDiscardLocked(co, off, bytes, discardRequest, false)
		}
		return bdrv.ErrNotSupported
	}
	head := min(end, (off+cs-1)&^(cs-1)) - off
	off += head
	var tail uint64
	if end < size {
		tail = end - max(off, end&^(cs-1))
	}
	end -= tail
	scSize := img.g.SubclusterSize()
	var err error
	if head > 0 {
		if err = img.zeroL2SubclustersLocked(co, off-head, int((head+scSize-1)/scSize)); err != nil {
			goto out
		}
	}
	for nb := (end - min(end, off) + cs - 1) / cs; nb > 0; {
		var done uint64
		if done, err = img.zeroInL2SliceLocked(co, off, nb, unmap); err != nil {
			goto out
		}
		nb -= done
		off += done * cs
	}
	if tail > 0 {
		err = img.zeroL2SubclustersLocked(co, end, int((tail+scSize-1)/scSize))
	}
out:
	img.processDiscardsLocked(co)
	return err
}
