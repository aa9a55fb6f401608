package qcow2

import (
	"bytes"
	"math"
)

// Snapshot table limits (QEMU's QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE,
// QCOW_MAX_SNAPSHOT_EXTRA_DATA). They bound what ParseSnapshotTable keeps.
const (
	SnapshotHeaderSize   = 40 // fixed part of a snapshot table entry
	MaxSnapshots         = 65536
	MaxSnapshotTableSize = 64 << 20
	MaxSnapshotExtraData = 1024

	// snapshotExtraKnown is the extra data QEMU knows and writes:
	// vm_state_size_large, disk_size and icount.
	snapshotExtraKnown = 24
	// snapshotExtraV3 is the extra data version 3 requires (through
	// disk_size).
	snapshotExtraV3 = 16
)

// Snapshot is one entry of the snapshot table (spec "Snapshots").
type Snapshot struct {
	L1TableOffset uint64
	L1Size        uint32
	ID            string // unique ID string, not NUL-terminated on disk
	Name          string
	DateSec       uint32
	DateNsec      uint32
	VMClockNsec   uint64

	// VMStateSize is the 64-bit VM state size from the extra data when
	// present, else the 32-bit field of the fixed part.
	VMStateSize uint64
	// DiskSize is the virtual disk size when the snapshot was taken; images
	// with less extra data get the image's current size, as in QEMU.
	DiskSize uint64
	// Icount is the guest instruction count QEMU records (extra data bytes
	// 56-63), or -1 when the entry has no such field.
	Icount int64

	// ExtraDataSize is the size of the extra data as read from the image.
	// Marshal does not use it: it always writes the 24 known bytes followed
	// by UnknownExtra, as QEMU does.
	ExtraDataSize uint32
	// UnknownExtra is extra data beyond the fields known here; the
	// specification says it must be kept (iotest 261).
	UnknownExtra []byte
}

// SnapshotEntrySize returns the unpadded size of the snapshot table entry
// whose 40-byte fixed part is fixed, so a caller can read entries one at a
// time. It fails on a short slice or on too much extra data.
func SnapshotEntrySize(fixed []byte) (int, error) {
	if len(fixed) < SnapshotHeaderSize {
		return 0, invalid("snapshot table", "entry header truncated: %d bytes, need %d", len(fixed), SnapshotHeaderSize)
	}
	extra := be.Uint32(fixed[36:])
	if extra > MaxSnapshotExtraData {
		return 0, invalid("snapshot table", "extra data size %d exceeds the maximum of %d", extra, MaxSnapshotExtraData)
	}
	return SnapshotHeaderSize + int(extra) + int(be.Uint16(fixed[12:])) + int(be.Uint16(fixed[14:])), nil
}

// ParseSnapshotTable parses count entries from b, which holds the snapshot
// table starting at snapshots_offset (as much of it as the file has, at
// most MaxSnapshotTableSize bytes are ever looked at). diskSize is the
// image's virtual size, used for entries without a disk size. It returns
// the entries and the table length in bytes (the end of the last entry, not
// padded, like QEMU's snapshots_size).
//
// The checks are those QEMU makes when it opens an image: the number of
// entries, the extra data limit, the table size limit, and every length
// against the data. L1 table offsets and sizes are checked separately by
// CheckSnapshots, because QEMU only looks at them when a snapshot is used
// or the image checked.
func ParseSnapshotTable(b []byte, count uint32, diskSize uint64) ([]Snapshot, int, error) {
	if count > MaxSnapshots {
		return nil, 0, invalid("nb_snapshots", "%d exceeds the maximum of %d", count, MaxSnapshots)
	}
	if len(b) > MaxSnapshotTableSize+8 {
		b = b[:MaxSnapshotTableSize+8]
	}
	var snaps []Snapshot
	off := 0
	for i := 0; i < int(count); i++ {
		off = (off + 7) &^ 7
		if off > len(b) || len(b)-off < SnapshotHeaderSize {
			return nil, 0, snapTrunc(i, off, len(b))
		}
		e := b[off:]
		if x := be.Uint32(e[36:]); x > MaxSnapshotExtraData {
			// QEMU: "Too much extra metadata in snapshot table entry %d".
			return nil, 0, invalid("snapshot table", "entry %d: extra data size %d exceeds the maximum of %d",
				i, x, MaxSnapshotExtraData)
		}
		size, _ := SnapshotEntrySize(e) // cannot fail after the checks above
		if off+size > MaxSnapshotTableSize {
			return nil, 0, invalid("snapshot table", "entry %d ends at %d, table larger than the maximum of %d bytes",
				i, off+size, MaxSnapshotTableSize)
		}
		if size > len(e) {
			return nil, 0, snapTrunc(i, off, len(b))
		}
		s := Snapshot{
			L1TableOffset: be.Uint64(e[0:]),
			L1Size:        be.Uint32(e[8:]),
			DateSec:       be.Uint32(e[16:]),
			DateNsec:      be.Uint32(e[20:]),
			VMClockNsec:   be.Uint64(e[24:]),
			VMStateSize:   uint64(be.Uint32(e[32:])),
			ExtraDataSize: be.Uint32(e[36:]),
			DiskSize:      diskSize,
			Icount:        -1,
		}
		idLen, nameLen := int(be.Uint16(e[12:])), int(be.Uint16(e[14:]))
		p := SnapshotHeaderSize
		extra := e[p : p+int(s.ExtraDataSize)]
		if len(extra) >= 8 {
			s.VMStateSize = be.Uint64(extra[0:])
		}
		if len(extra) >= 16 {
			s.DiskSize = be.Uint64(extra[8:])
		}
		if len(extra) >= 24 {
			s.Icount = int64(be.Uint64(extra[16:]))
		}
		if len(extra) > snapshotExtraKnown {
			s.UnknownExtra = bytes.Clone(extra[snapshotExtraKnown:])
		}
		p += len(extra)
		s.ID = string(e[p : p+idLen])
		p += idLen
		s.Name = string(e[p : p+nameLen])
		snaps = append(snaps, s)
		off += size
	}
	return snaps, off, nil
}

func snapTrunc(i, off, n int) error {
	return invalid("snapshot table", "entry %d at table offset %d truncated (%d bytes available)", i, off, n)
}

// MarshalSnapshotTable encodes snapshot table entries, each padded to 8
// bytes except the last (the returned length is the table size to store).
// Like QEMU it writes the 24 known bytes of extra data, then UnknownExtra,
// and stores 0 in the 32-bit VM state size when the size does not fit, so
// that older readers see a disk-only snapshot rather than a truncated one.
func MarshalSnapshotTable(snaps []Snapshot) ([]byte, error) {
	if len(snaps) > MaxSnapshots {
		return nil, invalid("nb_snapshots", "%d exceeds the maximum of %d", len(snaps), MaxSnapshots)
	}
	var out []byte
	for i, s := range snaps {
		extra := snapshotExtraKnown + len(s.UnknownExtra)
		if extra > MaxSnapshotExtraData {
			return nil, invalid("snapshot table", "entry %d: extra data size %d exceeds the maximum of %d", i, extra, MaxSnapshotExtraData)
		}
		if len(s.ID) > math.MaxUint16 || len(s.Name) > math.MaxUint16 {
			return nil, invalid("snapshot table", "entry %d: id or name longer than %d bytes", i, math.MaxUint16)
		}
		for len(out)%8 != 0 {
			out = append(out, 0)
		}
		var h [SnapshotHeaderSize + snapshotExtraKnown]byte
		be.PutUint64(h[0:], s.L1TableOffset)
		be.PutUint32(h[8:], s.L1Size)
		be.PutUint16(h[12:], uint16(len(s.ID)))
		be.PutUint16(h[14:], uint16(len(s.Name)))
		be.PutUint32(h[16:], s.DateSec)
		be.PutUint32(h[20:], s.DateNsec)
		be.PutUint64(h[24:], s.VMClockNsec)
		if s.VMStateSize <= math.MaxUint32 {
			be.PutUint32(h[32:], uint32(s.VMStateSize))
		}
		be.PutUint32(h[36:], uint32(extra))
		be.PutUint64(h[40:], s.VMStateSize)
		be.PutUint64(h[48:], s.DiskSize)
		be.PutUint64(h[56:], uint64(s.Icount))
		out = append(out, h[:]...)
		out = append(out, s.UnknownExtra...)
		out = append(out, s.ID...)
		out = append(out, s.Name...)
		if len(out) > MaxSnapshotTableSize {
			return nil, invalid("snapshot table", "size %d exceeds the maximum of %d", len(out), MaxSnapshotTableSize)
		}
	}
	return out, nil
}

// CheckSnapshots validates what ParseSnapshotTable leaves alone, the checks
// QEMU makes before using a snapshot or in qemu-img check: each snapshot's
// L1 table must be cluster aligned, below 2^56, within QEMU's L1 size limit
// and (when fileSize >= 0) inside the file; version 3 entries must carry
// extra data through the disk size; IDs must be unique. Problems are
// reported as *CorruptError located in the snapshot table at tableOffset.
func CheckSnapshots(snaps []Snapshot, g Geometry, tableOffset uint64, fileSize int64) error {
	ids := make(map[string]int, len(snaps))
	for i, s := range snaps {
		bad := func(format string, args ...any) error {
			return corrupt("snapshot table", tableOffset, int64(i), format, args...)
		}
		if uint64(s.L1Size) > MaxL1TableBytes/8 {
			return bad("snapshot %q L1 table too large (%d entries)", s.ID, s.L1Size)
		}
		if g.OffsetIntoCluster(s.L1TableOffset) != 0 || s.L1TableOffset >= MaxHostOffset {
			return bad("snapshot %q L1 table offset %#x invalid", s.ID, s.L1TableOffset)
		}
		if s.L1Size > 0 {
			end := s.L1TableOffset + uint64(s.L1Size)*8
			if s.L1TableOffset == 0 {
				return bad("snapshot %q L1 table at offset 0 overlaps the header", s.ID)
			}
			if fileSize >= 0 && end > uint64(fileSize) {
				return bad("snapshot %q L1 table %#x..%#x beyond end of file (%d bytes)", s.ID, s.L1TableOffset, end, fileSize)
			}
		}
		if g.Version >= 3 && s.ExtraDataSize < snapshotExtraV3 {
			return bad("snapshot %q has insufficient extra data (%d bytes, version 3 requires %d)", s.ID, s.ExtraDataSize, snapshotExtraV3)
		}
		if j, dup := ids[s.ID]; dup {
			return bad("snapshot ID %q also used by entry %d", s.ID, j)
		}
		ids[s.ID] = i
	}
	return nil
}
