package bdrv

import "ublkimg/coroutine"

// SnapshotInfo describes one snapshot (QEMU's QEMUSnapshotInfo).
type SnapshotInfo struct {
	ID, Name    string
	VMStateSize uint64
	DateSec     int64
	DateNsec    int64
	VMClockNsec uint64
	Icount      int64 // -1: none
}

// Snapshotter is implemented by drivers that take snapshots through the
// generic snapshot calls (QEMU's bdrv_snapshot_*), such as a protocol
// whose storage has snapshots of its own (rbd).
type Snapshotter interface {
	ListSnapshots(co *coroutine.Co) ([]SnapshotInfo, error)
	CreateSnapshot(co *coroutine.Co, name string) error
	// ApplySnapshot reverts the node to the snapshot name.
	ApplySnapshot(co *coroutine.Co, name string) error
	DeleteSnapshot(co *coroutine.Co, name string) error
}

// SnapshotFallback returns the Snapshotter that QEMU's snapshot calls reach
// for n: n's own driver's, or, for a format without snapshots and without a
// backing file (raw), its file's (bdrv_snapshot_fallback). nil when none
// takes snapshots. Formats with snapshots of their own (qcow2) are handled
// by their callers before this fallback.
func SnapshotFallback(n *Node) Snapshotter {
	for n != nil {
		if s, ok := n.drv.(Snapshotter); ok {
			return s
		}
		if n.Backing != nil {
			return nil
		}
		n = n.File
	}
	return nil
}
