package qcow2

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Internal snapshot operations (QEMU's block/qcow2-snapshot.c): create,
// apply (goto), delete and list. Every operation runs under img.meta and
// expects the node to be quiesced by the caller (no guest requests in
// flight), as QEMU drains the node around snapshot operations; allocations
// still in flight are waited for.
//
// Crash safety follows QEMU: refcounts are raised and made durable before
// any table points at what they count; the new snapshot table is written
// and flushed before the header switches to it; references are dropped only
// after nothing on disk uses them any more. A crash in between leaks
// clusters at worst.

// ErrSnapshotNotFound reports a snapshot name or ID that is not in the
// table; it matches unix.ENOENT.
var ErrSnapshotNotFound = fmt.Errorf("snapshot not found: %w", unix.ENOENT)

// ListSnapshots returns the snapshot table as it currently is, as the verbs
// list it (bdrv.Snapshotter).
func (img *Image) ListSnapshots(co *coroutine.Co) ([]bdrv.SnapshotInfo, error) {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	out := make([]bdrv.SnapshotInfo, 0, len(img.snapshots))
	for _, s := range img.snapshots {
		out = append(out, bdrv.SnapshotInfo{ID: s.ID, Name: s.Name, VMStateSize: s.VMStateSize,
			DateSec: int64(s.DateSec), DateNsec: int64(s.DateNsec), VMClockNsec: s.VMClockNsec, Icount: s.Icount})
	}
	return out, nil
}

// snapshotUsableLocked refuses snapshot changes QEMU refuses.
func (img *Image) snapshotUsableLocked() error {
	if err := img.checkIO(); err != nil {
		return err
	}
	if img.readOnly {
		return unix.EACCES
	}
	if img.hdr.HasDataFile() {
		// QEMU: qcow2_snapshot_* return -ENOTSUP with a data file.
		return unix.ENOTSUP
	}
	return nil
}

// quiesceLocked waits for every allocation in flight.
func (img *Image) quiesceLocked(co *coroutine.Co) {
	img.waitInflightLocked(co, 0, uint64(math.MaxInt64)&^(img.cs-1))
}

// syncAllLocked writes both caches back and flushes the file (QEMU's
// bdrv_flush on the qcow2 node).
func (img *Image) syncAllLocked(co *coroutine.Co) error {
	if err := img.writeCachesLocked(co); err != nil {
		return err
	}
	return img.file.Flush(co)
}

// CreateSnapshot takes an internal snapshot named name of the current
// state (QEMU's qcow2_snapshot_create, without VM state): the snapshot gets
// the next free numeric ID, the current date, VM clock 0 and the current
// disk size. Names need not be unique, as in QEMU.
func (img *Image) CreateSnapshot(co *coroutine.Co, name string) error {
	now := time.Now()
	return img.CreateSnapshotAt(co, name, now.Unix(), uint32(now.Nanosecond()/1000*1000))
}

// CreateSnapshotAt is CreateSnapshot with the date given (seconds and
// nanoseconds since the epoch).
func (img *Image) CreateSnapshotAt(co *coroutine.Co, name string, sec int64, nsec uint32) error {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.snapshotUsableLocked(); err != nil {
		return err
	}
	img.quiesceLocked(co)

	// QEMU's find_new_snapshot_id: one more than the largest numeric ID.
	var maxID uint64
	for _, s := range img.snapshots {
		if v, err := strconv.ParseUint(s.ID, 10, 64); err == nil && v > maxID {
			maxID = v
		}
	}
	sn := Snapshot{
		ID:       strconv.FormatUint(maxID+1, 10),
		Name:     name,
		DateSec:  uint32(sec),
		DateNsec: nsec,
		DiskSize: uint64(img.node.Length()),
		L1Size:   uint32(len(img.l1)),
		Icount:   0,
	}
	for _, s := range img.snapshots {
		if s.ID == sn.ID {
			return unix.EEXIST
		}
	}

	// Copy the active L1 table to new clusters, as it is: its COPIED
	// flags mean nothing in a snapshot's table, whose readers ignore
	// them, and QEMU copies them too (applying the snapshot clears them).
	img.processDiscardsLocked(co)
	cs := img.cs
	l1Bytes := uint64(len(img.l1)) * 8
	if l1Bytes > 0 {
		off, err := img.allocClustersLocked(co, (l1Bytes+cs-1)/cs)
		if err != nil {
			return err
		}
		sn.L1TableOffset = off
		buf := bdrv.AlignedBuffer(int((l1Bytes+511)&^511), 4096)
		for i, e := range img.l1 {
			be.PutUint64(buf[i*8:], e)
		}
		err = img.checkOverlapLocked(co, off, uint64(len(buf)), mkNone)
		if err == nil {
			err = img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0)
		}
		if err != nil {
			img.freeClustersLocked(co, off, (l1Bytes+cs-1)/cs*cs, discardAlways)
			return err
		}
	}

	// Every cluster the active table reaches gains a reference, and is
	// durable on disk before the snapshot table names the new L1 table.
	if err := img.snapshotRefsActiveLocked(co, 1); err != nil {
		// Undo: drop the references taken (best effort) and restore the
		// COPIED flags.
		img.snapshotRefsActiveLocked(co, 0)
		if sn.L1TableOffset != 0 {
			img.freeClustersLocked(co, sn.L1TableOffset, (l1Bytes+cs-1)/cs*cs, discardAlways)
		}
		return err
	}
	if err := img.syncAllLocked(co); err != nil {
		return err
	}
	snaps := append(slices.Clone(img.snapshots), sn)
	return img.writeSnapshotsLocked(co, snaps)
}

// snapshotRefsActiveLocked applies addend to everything the active L1 table
// reaches, and rewrites the active L1 table on disk if its COPIED flags
// changed. On an error with a positive addend the references already taken
// are dropped again.
func (img *Image) snapshotRefsActiveLocked(co *coroutine.Co, addend int) error {
	var taken [][2]uint64
	modified, err := img.updateSnapshotRefcountLocked(co, img.l1, img.l1Offset, addend, &taken)
	if err != nil {
		if addend > 0 {
			for _, r := range taken {
				img.updateRefcountLocked(co, r[0], r[1], 1, true, discardNever)
			}
			img.updateSnapshotRefcountLocked(co, img.l1, img.l1Offset, 0, nil)
			img.writeActiveL1Locked(co)
		}
		return err
	}
	if modified {
		return img.writeActiveL1Locked(co)
	}
	return nil
}

// writeActiveL1Locked writes the whole active L1 table and flushes.
func (img *Image) writeActiveL1Locked(co *coroutine.Co) error {
	if len(img.l1) == 0 {
		return nil
	}
	n := uint64(len(img.l1)) * 8
	buf := bdrv.AlignedBuffer(int(n), 4096)
	for i, e := range img.l1 {
		be.PutUint64(buf[i*8:], e)
	}
	if err := img.checkOverlapLocked(co, img.l1Offset, n, mkActiveL1); err != nil {
		return err
	}
	if err := img.file.Pwritev(co, int64(img.l1Offset), bdrv.IOVec{buf}, 0); err != nil {
		return err
	}
	return img.file.Flush(co)
}

// updateSnapshotRefcountLocked adds addend (-1, 0 or 1) to the refcount of
// every L2 table and cluster that the L1 table l1 (at host offset l1Off, for
// error messages) reaches, and sets the COPIED flags of the L2 entries and of
// l1 from the resulting refcounts (QEMU's qcow2_update_snapshot_refcount).
// It reports whether l1 changed; writing it back is the caller's business.
// Ranges whose refcount was raised are appended to *taken when taken is not
// nil.
func (img *Image) updateSnapshotRefcountLocked(co *coroutine.Co, l1 []uint64, l1Off uint64, addend int, taken *[][2]uint64) (bool, error) {
	// Freed clusters are discarded before anything can reuse them.
	defer img.processDiscardsLocked(co)
	g, cs := img.g, img.cs
	abs, dec := uint64(0), addend < 0
	if addend != 0 {
		abs = 1
	}
	update := func(off, n uint64) error {
		if abs == 0 {
			return nil
		}
		if err := img.updateRefcountLocked(co, off, n, abs, dec, discardSnapshot); err != nil {
			return err
		}
		if !dec && taken != nil {
			*taken = append(*taken, [2]uint64{off, n})
		}
		return nil
	}
	if addend > 0 {
		// The L2 entries that lose COPIED are written after the refcounts
		// that make them shared.
		if err := img.l2Cache.setDependencyLocked(co, img.rcCache); err != nil {
			return false, err
		}
	}
	modified := false
	for i := range l1 {
		l2Off, _, err := g.DecodeL1(l1[i], l1Off, int64(i))
		if err != nil {
			return modified, img.asCorruptionLocked(co, err)
		}
		if l2Off == 0 {
			continue
		}
		if l2Off >= uint64(img.file.Length()) {
			return modified, img.signalCorruptionLocked(co, &CorruptError{
				What:  fmt.Sprintf("L2 table offset %#x beyond end of image file", l2Off),
				Table: "L1 table", Offset: l1Off, Index: int64(i)})
		}
		for s := uint64(0); s < cs/img.l2SliceSize; s++ {
			sliceOff := l2Off + s*img.l2SliceSize
			e, err := img.l2Cache.getLocked(co, sliceOff)
			if err != nil {
				return modified, err
			}
			for j := 0; j < int(img.l2SliceEnts); j++ {
				ent, bm, _ := g.L2EntryAt(e.buf, j)
				old := ent
				ent &^= OflagCopied
				var rc uint64
				switch g.ClusterType(ent) {
				case ClusterCompressed:
					off, n := g.CompressedRange(ent)
					err = update(off, n)
					rc = 2 // compressed clusters are never written in place
				case ClusterNormal, ClusterZeroAlloc:
					hc := HostOffset(ent)
					if hc%cs != 0 {
						err = img.corruptL2Locked(co, l2Off, uint64(s*img.l2SliceEnts)+uint64(j),
							"cluster allocation offset %#x unaligned", hc)
						break
					}
					if err = update(hc, cs); err == nil {
						rc, err = img.getRefcountLocked(co, hc/cs)
					}
				}
				if err != nil {
					img.l2Cache.putLocked(e)
					return modified, err
				}
				if rc == 1 {
					ent |= OflagCopied
				}
				if ent != old {
					g.SetL2EntryAt(e.buf, j, ent, bm)
					img.l2Cache.markDirtyLocked(e)
				}
			}
			img.l2Cache.putLocked(e)
		}
		if err := update(l2Off, cs); err != nil {
			return modified, err
		}
		rc, err := img.getRefcountLocked(co, l2Off/cs)
		if err != nil {
			return modified, err
		}
		ne := l2Off
		if rc == 1 {
			ne |= OflagCopied
		}
		if ne != l1[i] {
			l1[i] = ne
			modified = true
		}
	}
	return modified, nil
}

// writeSnapshotsLocked stores snaps as the new snapshot table (QEMU's
// qcow2_write_snapshots): the table goes to new clusters, is flushed, then
// the header is switched to it with one write, then the old table is freed.
func (img *Image) writeSnapshotsLocked(co *coroutine.Co, snaps []Snapshot) error {
	data, err := MarshalSnapshotTable(snaps)
	if err != nil {
		return err
	}
	cs := img.cs
	var off uint64
	img.processDiscardsLocked(co)
	if len(data) > 0 {
		n := (uint64(len(data)) + cs - 1) / cs
		if off, err = img.allocClustersLocked(co, n); err != nil {
			return err
		}
		fail := func(err error) error {
			img.freeClustersLocked(co, off, n*cs, discardAlways)
			return err
		}
		if err := img.syncAllLocked(co); err != nil {
			return fail(err)
		}
		// The table's own length, as QEMU writes it: the file node pads
		// what its alignment needs, and a table at the end of the file
		// leaves the file as long as qemu-img's.
		buf := bdrv.AlignedBuffer(len(data), 4096)
		copy(buf, data)
		if err := img.checkOverlapLocked(co, off, uint64(len(buf)), mkNone); err != nil {
			return fail(err)
		}
		if err := img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
			return fail(err)
		}
		if err := img.file.Flush(co); err != nil {
			return fail(err)
		}
	}
	hb := bdrv.AlignedBuffer(12, 8)
	be.PutUint32(hb, uint32(len(snaps)))
	be.PutUint64(hb[4:], off)
	if err := img.file.Pwritev(co, 60, bdrv.IOVec{hb}, 0); err != nil {
		return err
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	oldOff, oldSize := img.hdr.SnapshotsOffset, img.snapTableSize
	img.hdrMu.Lock()
	img.hdr.NbSnapshots, img.hdr.SnapshotsOffset = uint32(len(snaps)), off
	img.hdrMu.Unlock()
	img.snapshots, img.snapTableSize = snaps, uint64(len(data))
	if oldSize > 0 && oldOff != 0 {
		if err := img.freeClustersLocked(co, oldOff, (oldSize+cs-1)/cs*cs, discardSnapshot); err != nil {
			return err
		}
		img.processDiscardsLocked(co)
	}
	return nil
}

// findSnapshotLocked returns the index of the snapshot with the given ID
// and name ("" matches any), or -1.
func (img *Image) findSnapshotLocked(id, name string) int {
	for i, s := range img.snapshots {
		if (id == "" || s.ID == id) && (name == "" || s.Name == name) {
			return i
		}
	}
	return -1
}

// readSnapshotL1Locked validates the L1 table of s and reads it, padded
// with zeros to n entries.
func (img *Image) readSnapshotL1Locked(co *coroutine.Co, s Snapshot, n int) ([]uint64, error) {
	if err := CheckSnapshots([]Snapshot{s}, img.g, img.hdr.SnapshotsOffset, img.file.Length()); err != nil {
		return nil, img.asCorruptionLocked(co, err)
	}
	l1 := make([]uint64, max(n, int(s.L1Size)))
	if s.L1Size == 0 {
		return l1, nil
	}
	b, err := img.readFile(co, s.L1TableOffset, uint64(s.L1Size)*8)
	if err != nil {
		return nil, err
	}
	for i := range s.L1Size {
		l1[i] = be.Uint64(b[i*8:])
	}
	return l1, nil
}

// writeL1CopyLocked writes l1 as the L1 table of a snapshot at off.
func (img *Image) writeL1CopyLocked(co *coroutine.Co, off uint64, l1 []uint64) error {
	buf := bdrv.AlignedBuffer(len(l1)*8, 4096)
	for i, e := range l1 {
		be.PutUint64(buf[i*8:], e)
	}
	if err := img.checkOverlapLocked(co, off, uint64(len(buf)), mkInactiveL1); err != nil {
		return err
	}
	if err := img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
		return err
	}
	return img.file.Flush(co)
}

// ApplySnapshot reverts the image to the snapshot whose ID, or else name,
// is idOrName (QEMU's qcow2_snapshot_goto): the active L1 table becomes a
// copy of the snapshot's, and the image takes the snapshot's disk size.
// It fails with ErrSnapshotNotFound when there is no such snapshot.
func (img *Image) ApplySnapshot(co *coroutine.Co, idOrName string) error {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.snapshotUsableLocked(); err != nil {
		return err
	}
	i := img.findSnapshotLocked(idOrName, "")
	if i < 0 {
		i = img.findSnapshotLocked("", idOrName)
	}
	if i < 0 {
		return ErrSnapshotNotFound
	}
	img.quiesceLocked(co)
	img.processDiscardsLocked(co)
	sn := img.snapshots[i]
	if sn.DiskSize != uint64(img.node.Length()) {
		// The image was resized after the snapshot: it takes the
		// snapshot's size again, by a resize of the active layer.
		if sn.DiskSize%512 != 0 || sn.DiskSize > math.MaxInt64 {
			return fmt.Errorf("qcow2: snapshot %s: invalid disk size %d: %w", sn.ID, sn.DiskSize, unix.EINVAL)
		}
		if err := img.truncateLocked(co, int64(sn.DiskSize), true, bdrv.PreallocOff, false); err != nil {
			return err
		}
	}
	if err := img.growL1Locked(co, uint64(sn.L1Size)); err != nil {
		return err
	}
	newL1, err := img.readSnapshotL1Locked(co, sn, len(img.l1))
	if err != nil {
		return err
	}
	onDisk := slices.Clone(newL1[:sn.L1Size])
	for k := range newL1 {
		newL1[k] &^= OflagCopied
	}
	// References for the new active tree first, durable before the
	// active L1 table points at it.
	var taken [][2]uint64
	if _, err := img.updateSnapshotRefcountLocked(co, newL1, sn.L1TableOffset, 1, &taken); err != nil {
		for _, r := range taken {
			img.updateRefcountLocked(co, r[0], r[1], 1, true, discardNever)
		}
		img.snapshotRefsActiveLocked(co, 0)
		return err
	}
	if err := img.syncAllLocked(co); err != nil {
		return err
	}
	// The snapshot's table gets the flags just computed (none: every
	// table it names is now shared), as QEMU's qcow2_update_snapshot_refcount
	// writes back a table it changed; only the COPIED flags differ, which
	// readers of a snapshot's table ignore.
	if !slices.Equal(onDisk, newL1[:sn.L1Size]) {
		if err := img.writeL1CopyLocked(co, sn.L1TableOffset, newL1[:sn.L1Size]); err != nil {
			return err
		}
	}
	old := img.l1
	img.l1 = newL1
	if err := img.writeActiveL1Locked(co); err != nil {
		img.l1 = old
		return err
	}
	// The old tree loses the active table's reference. A failure here
	// only leaks clusters.
	var errs []error
	if _, err := img.updateSnapshotRefcountLocked(co, old, img.l1Offset, -1, nil); err != nil {
		errs = append(errs, err)
	}
	if err := img.snapshotRefsActiveLocked(co, 0); err != nil {
		errs = append(errs, err)
	}
	img.rebuildActiveL2MapLocked()
	img.ccache.invalidate()
	errs = append(errs, img.syncAllLocked(co))
	return errors.Join(errs...)
}

// rebuildActiveL2MapLocked records the active L2 tables anew in the
// metadata map for the overlap check, after the active L1 table changed.
func (img *Image) rebuildActiveL2MapLocked() {
	for c := range img.metaClusters {
		img.dropMeta(c, mkActiveL2)
	}
	img.addMetaTables(img.l1, L1OffsetMask, mkActiveL2)
}

// DeleteSnapshot deletes the first snapshot named name (bdrv.Snapshotter;
// qemu-img snapshot -d looks snapshots up by name).
func (img *Image) DeleteSnapshot(co *coroutine.Co, name string) error {
	return img.deleteSnapshot(co, "", name)
}

// deleteSnapshot deletes the first snapshot matching id and name ("" matches
// any) (QEMU's qcow2_snapshot_delete): the snapshot table without it is
// written first, then the references its L1 table held are dropped, its L1
// table freed and the active COPIED flags brought up to date. It fails with
// ErrSnapshotNotFound when no snapshot matches.
func (img *Image) deleteSnapshot(co *coroutine.Co, id, name string) error {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.snapshotUsableLocked(); err != nil {
		return err
	}
	i := img.findSnapshotLocked(id, name)
	if i < 0 {
		return ErrSnapshotNotFound
	}
	img.quiesceLocked(co)
	sn := img.snapshots[i]
	l1, err := img.readSnapshotL1Locked(co, sn, 0)
	if err != nil {
		return err
	}
	if err := img.writeSnapshotsLocked(co, slices.Delete(slices.Clone(img.snapshots), i, i+1)); err != nil {
		return fmt.Errorf("Failed to remove snapshot from snapshot list: %w", err)
	}
	if _, err := img.updateSnapshotRefcountLocked(co, l1, sn.L1TableOffset, -1, nil); err != nil {
		return fmt.Errorf("Failed to free the cluster and L1 table: %w", err)
	}
	if sn.L1Size > 0 {
		n := (uint64(sn.L1Size)*8 + img.cs - 1) / img.cs * img.cs
		if err := img.freeClustersLocked(co, sn.L1TableOffset, n, discardSnapshot); err != nil {
			return fmt.Errorf("Failed to free the cluster and L1 table: %w", err)
		}
		img.processDiscardsLocked(co)
	}
	if err := img.snapshotRefsActiveLocked(co, 0); err != nil {
		return fmt.Errorf("Failed to update snapshot status in disk: %w", err)
	}
	img.processDiscardsLocked(co)
	return img.syncAllLocked(co)
}
