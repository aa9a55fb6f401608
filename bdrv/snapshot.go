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

// Snapshotter is implemented by drivers that take snapshots (QEMU's
// bdrv_snapshot_*; qemu-img snapshot and info's list): formats with
// internal snapshots (qcow2), and protocols whose storage has snapshots of
// its own (rbd). Errors carry an errno where QEMU returns one (ENOTSUP for
// an image that cannot take snapshots, ENOENT for a snapshot not found,
// EACCES for a read-only image), which qemu-img words with strerror.
type Snapshotter interface {
	// ListSnapshots returns the snapshots in the image's order.
	ListSnapshots(co *coroutine.Co) ([]SnapshotInfo, error)
	// CreateSnapshot takes a snapshot named name of the current state.
	CreateSnapshot(co *coroutine.Co, name string) error
	// ApplySnapshot reverts the node to the snapshot whose ID, or else
	// whose name, is name (formats without IDs: its name).
	ApplySnapshot(co *coroutine.Co, name string) error
	// DeleteSnapshot deletes the first snapshot named name.
	DeleteSnapshot(co *coroutine.Co, name string) error
}

// SnapshotFallback returns the Snapshotter that QEMU's snapshot calls reach
// for n (bdrv_snapshot_fallback): n's own driver's, or, for a format
// without snapshots and without a backing file (raw), its file's. nil when
// none takes snapshots.
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
