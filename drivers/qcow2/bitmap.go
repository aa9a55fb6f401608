package qcow2

import "bytes"

// Bitmap directory limits and flags (spec "Bitmap directory"; limits from
// QEMU's block/qcow2-bitmap.c).
const (
	MaxBitmaps             = 65535    // QCOW2_MAX_BITMAPS
	MaxBitmapDirectorySize = 64 << 20 // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
	MaxBitmapNameSize      = 1023
	MaxBitmapTableEntries  = 0x8000000  // BME_MAX_TABLE_SIZE
	maxBitmapPhysSize      = 0x20000000 // BME_MAX_PHYS_SIZE: bitmap data bytes
	MinBitmapGranularity   = 9          // QEMU's supported granularity_bits
	MaxBitmapGranularity   = 31

	bitmapEntryFixed   = 24
	minBitmapEntrySize = 32 // fixed part + 1-byte name, padded

	BitmapFlagInUse               uint32 = 1 << 0 // not saved correctly; contents unreliable
	BitmapFlagAuto                uint32 = 1 << 1 // tracks all writes (enabled)
	BitmapFlagExtraDataCompatible uint32 = 1 << 2 // usable even if extra data is not understood
	bitmapReservedFlags                  = ^uint32(7)

	BitmapTypeDirtyTracking = 1
)

// Bitmap is one bitmap directory entry, for read-only information (qemu-img
// info, check); bitmap data is not interpreted here.
type Bitmap struct {
	TableOffset     uint64
	TableSize       uint32 // entries in the bitmap table
	Flags           uint32
	Type            uint8
	GranularityBits uint8
	Name            string
	ExtraData       []byte
}

// Granularity returns the guest bytes covered by one bit.
func (b *Bitmap) Granularity() uint64 { return 1 << b.GranularityBits }

// InUse reports the in_use flag: the bitmap was not stored cleanly.
func (b *Bitmap) InUse() bool { return b.Flags&BitmapFlagInUse != 0 }

// Auto reports the auto flag: the bitmap is enabled.
func (b *Bitmap) Auto() bool { return b.Flags&BitmapFlagAuto != 0 }

// Usable reports whether QEMU would use the bitmap: extra data it does not
// understand is only acceptable with the extra_data_compatible flag.
func (b *Bitmap) Usable() bool {
	return len(b.ExtraData) == 0 || b.Flags&BitmapFlagExtraDataCompatible != 0
}

// decodeBitmapEntry decodes the fixed part of the directory entry at the
// start of e (at least bitmapEntryFixed bytes): the bitmap's fields, and the
// sizes of the name and of the extra data that follow them.
func decodeBitmapEntry(e []byte) (b Bitmap, nameSize, extraSize uint64) {
	b = Bitmap{
		TableOffset:     be.Uint64(e[0:]),
		TableSize:       be.Uint32(e[8:]),
		Flags:           be.Uint32(e[12:]),
		Type:            e[16],
		GranularityBits: e[17],
	}
	return b, uint64(be.Uint16(e[18:])), uint64(be.Uint32(e[20:]))
}

// ParseBitmapDirectory parses the bitmap directory held in dir (read from
// ext.DirectoryOffset, ext.DirectorySize bytes), checking every entry as
// QEMU's check_dir_entry does: table offset and size, reserved flags, type,
// granularity, name size and uniqueness, zero padding, that the table covers
// diskSize bytes (for bitmaps not in use), and that the directory holds
// exactly ext.Count entries filling ext.DirectorySize bytes.
func ParseBitmapDirectory(dir []byte, ext BitmapsExt, clusterBits uint32, diskSize uint64) ([]Bitmap, error) {
	bad := func(i int, format string, args ...any) error {
		return corrupt("bitmap directory", ext.DirectoryOffset, int64(i), format, args...)
	}
	if ext.Count == 0 || ext.Count > MaxBitmaps || ext.DirectorySize > MaxBitmapDirectorySize {
		return nil, bad(-1, "%d bitmaps in %d bytes out of range", ext.Count, ext.DirectorySize)
	}
	if clusterBits < MinClusterBits || clusterBits > MaxClusterBits {
		return nil, invalid("cluster_bits", "%d out of range %d..%d", clusterBits, MinClusterBits, MaxClusterBits)
	}
	if uint64(len(dir)) < ext.DirectorySize {
		return nil, bad(-1, "directory truncated: %d bytes, need %d", len(dir), ext.DirectorySize)
	}
	dir = dir[:ext.DirectorySize]
	cs := uint64(1) << clusterBits
	var out []Bitmap
	// Up to 65535 names: a set, not a comparison of every pair.
	names := make(map[string]struct{})
	off := 0
	for i := 0; off < len(dir); i++ {
		if i >= int(ext.Count) {
			return nil, bad(i, "more entries than nb_bitmaps %d", ext.Count)
		}
		e := dir[off:]
		if len(e) < bitmapEntryFixed {
			return nil, bad(i, "entry truncated")
		}
		b, nameSize, extraSize := decodeBitmapEntry(e)
		if nameSize == 0 || nameSize > MaxBitmapNameSize {
			return nil, bad(i, "name size %d out of range 1..%d", nameSize, MaxBitmapNameSize)
		}
		body := bitmapEntryFixed + extraSize + nameSize
		size := roundUp8(body)
		if size > uint64(len(e)) {
			return nil, bad(i, "entry of %d bytes exceeds the directory", size)
		}
		b.ExtraData = bytes.Clone(e[bitmapEntryFixed : bitmapEntryFixed+extraSize])
		b.Name = string(e[bitmapEntryFixed+extraSize : body])
		if !allZero(e[body:size]) {
			return nil, bad(i, "bitmap %q: padding not zero", b.Name)
		}
		switch {
		case b.Type != BitmapTypeDirtyTracking:
			return nil, bad(i, "bitmap %q: type %d unsupported", b.Name, b.Type)
		case b.Flags&bitmapReservedFlags != 0:
			return nil, bad(i, "bitmap %q: reserved flags %#x set", b.Name, b.Flags&bitmapReservedFlags)
		case b.GranularityBits < MinBitmapGranularity || b.GranularityBits > MaxBitmapGranularity:
			return nil, bad(i, "bitmap %q: granularity_bits %d out of range %d..%d",
				b.Name, b.GranularityBits, MinBitmapGranularity, MaxBitmapGranularity)
		case b.TableSize == 0 || b.TableSize > MaxBitmapTableEntries:
			return nil, bad(i, "bitmap %q: table size %d out of range 1..%d", b.Name, b.TableSize, MaxBitmapTableEntries)
		case uint64(b.TableSize)*cs > maxBitmapPhysSize:
			return nil, bad(i, "bitmap %q: %d table entries of %d bytes exceed %d bytes of bitmap data",
				b.Name, b.TableSize, cs, maxBitmapPhysSize)
		case b.TableOffset == 0 || b.TableOffset&(cs-1) != 0 || b.TableOffset >= MaxHostOffset:
			return nil, bad(i, "bitmap %q: table offset %#x invalid", b.Name, b.TableOffset)
		}
		// The table must cover the disk: each table entry maps one cluster
		// of bitmap data, each bit of which covers one granule. The
		// product is below 2^29 * 8 * 2^31 = 2^63, so it cannot overflow.
		if covered := uint64(b.TableSize) * cs * 8 << b.GranularityBits; b.Flags&BitmapFlagInUse == 0 && covered < diskSize {
			return nil, bad(i, "bitmap %q: table of %d entries covers %d bytes, disk is %d", b.Name, b.TableSize, covered, diskSize)
		}
		if _, dup := names[b.Name]; dup {
			return nil, bad(i, "bitmap name %q used twice", b.Name)
		}
		names[b.Name] = struct{}{}
		out = append(out, b)
		off += int(size)
	}
	if len(out) != int(ext.Count) {
		return nil, bad(-1, "directory holds %d bitmaps, nb_bitmaps is %d", len(out), ext.Count)
	}
	return out, nil
}
