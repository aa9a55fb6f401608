package bdrv

// The data the image capabilities of driver.go exchange with the verbs.

// Snapshot is one internal snapshot as the verbs list it (QEMU's
// QEMUSnapshotInfo).
type Snapshot struct {
	ID, Name    string
	VMStateSize uint64
	DateSec     int64
	DateNsec    int64
	VMClockNsec uint64
	Icount      int64 // -1: none recorded
}
