package qcow2

import (
	"fmt"
	"math/bits"
)

// Entry bit layouts (spec "Cluster mapping", "Host cluster management";
// masks as in QEMU's block/qcow2.h).
const (
	OflagCopied     uint64 = 1 << 63 // refcount is exactly 1: write in place
	OflagCompressed uint64 = 1 << 62 // L2: compressed cluster descriptor
	OflagZero       uint64 = 1 << 0  // L2 (v3, standard entries): reads as zeros

	L1OffsetMask   uint64 = 0x00fffffffffffe00
	L1ReservedMask uint64 = 0x7f000000000001ff

	L2OffsetMask uint64 = 0x00fffffffffffe00
	// L2StdReservedMask is the reserved bits of a standard L2 entry.
	L2StdReservedMask uint64 = 0x3f000000000001fe
	// L2ExtReservedMask adds bit 0: extended L2 entries have no zero flag.
	L2ExtReservedMask = L2StdReservedMask | OflagZero

	RefTableOffsetMask   uint64 = 0xfffffffffffffe00
	RefTableReservedMask uint64 = 0x00000000000001ff

	// SubclustersPerCluster is the number of subclusters with extended L2.
	SubclustersPerCluster = 32
	// BitmapAllAlloc and BitmapAllZero are the "allocated" and "reads as
	// zero" halves of an extended L2 entry's subcluster bitmap.
	BitmapAllAlloc uint64 = 0x00000000ffffffff
	BitmapAllZero  uint64 = 0xffffffff00000000

	// CompressedSectorSize is the unit of a compressed descriptor's length.
	CompressedSectorSize = 512
)

// Geometry holds the image parameters that the meaning of table entries
// depends on. Obtain it from Header.Geometry (already validated) or fill it
// in and call Validate. Methods never panic, whatever the field values; on
// an invalid Geometry they just return meaningless numbers.
type Geometry struct {
	ClusterBits   uint32
	RefcountOrder uint32
	ExtendedL2    bool // 128-bit L2 entries with 32 subclusters
	DataFile      bool // external data file: host offset == guest offset, no compression
	Version       uint32
}

// Validate checks the ranges Header validation guarantees.
func (g Geometry) Validate() error {
	if g.ClusterBits < MinClusterBits || g.ClusterBits > MaxClusterBits {
		return invalid("cluster_bits", "%d out of range %d..%d", g.ClusterBits, MinClusterBits, MaxClusterBits)
	}
	if g.ExtendedL2 && g.ClusterBits < MinClusterBitsExtendedL2 {
		return invalid("cluster_bits", "%d too small for extended L2 entries", g.ClusterBits)
	}
	if g.RefcountOrder > MaxRefcountOrder {
		return invalid("refcount_order", "%d out of range 0..%d", g.RefcountOrder, MaxRefcountOrder)
	}
	if g.Version != 2 && g.Version != 3 {
		return unsupported("version", "%d not supported (2 or 3)", g.Version)
	}
	if g.Version == 2 && (g.ExtendedL2 || g.DataFile || g.RefcountOrder != 4) {
		return invalid("version", "2 cannot have extended L2, a data file or refcount_order %d", g.RefcountOrder)
	}
	return nil
}

// ClusterSize returns the cluster size in bytes.
func (g Geometry) ClusterSize() uint64 { return 1 << g.ClusterBits }

// OffsetIntoCluster returns off modulo the cluster size.
func (g Geometry) OffsetIntoCluster(off uint64) uint64 { return off & (g.ClusterSize() - 1) }

// StartOfCluster rounds off down to a cluster boundary.
func (g Geometry) StartOfCluster(off uint64) uint64 { return off &^ (g.ClusterSize() - 1) }

// L2EntrySize returns the size of an L2 entry in bytes: 8, or 16 with
// extended L2 entries.
func (g Geometry) L2EntrySize() uint64 {
	if g.ExtendedL2 {
		return 16
	}
	return 8
}

func (g Geometry) l2Bits() uint32 {
	if g.ExtendedL2 {
		return g.ClusterBits - 4
	}
	return g.ClusterBits - 3
}

// L2Entries returns the number of entries in one L2 table (one cluster).
func (g Geometry) L2Entries() uint64 { return 1 << g.l2Bits() }

// BytesPerL2Table returns the guest bytes one L2 table maps.
func (g Geometry) BytesPerL2Table() uint64 { return 1 << (g.ClusterBits + g.l2Bits()) }

// L1Index returns the index of the L1 entry that maps guest offset off.
func (g Geometry) L1Index(off uint64) uint64 { return off >> (g.ClusterBits + g.l2Bits()) }

// L2Index returns the index within its L2 table of the entry that maps
// guest offset off.
func (g Geometry) L2Index(off uint64) uint64 { return (off >> g.ClusterBits) & (g.L2Entries() - 1) }

// L1EntriesFor returns the number of L1 entries needed to map size guest
// bytes (QEMU's size_to_l1).
func (g Geometry) L1EntriesFor(size uint64) uint64 {
	shift := g.ClusterBits + g.l2Bits()
	if shift >= 64 {
		return 0
	}
	n := size >> shift
	if size&(1<<shift-1) != 0 {
		n++
	}
	return n
}

// Subclusters returns the number of subclusters per cluster: 32 with
// extended L2 entries, else 1 (the cluster is its own only subcluster, as in
// QEMU).
func (g Geometry) Subclusters() int {
	if g.ExtendedL2 {
		return SubclustersPerCluster
	}
	return 1
}

// SubclusterBits returns log2 of the subcluster size.
func (g Geometry) SubclusterBits() uint32 {
	if g.ExtendedL2 {
		return g.ClusterBits - 5
	}
	return g.ClusterBits
}

// SubclusterSize returns the subcluster size in bytes.
func (g Geometry) SubclusterSize() uint64 { return 1 << g.SubclusterBits() }

// SubclusterIndex returns the index within its cluster of the subcluster
// containing guest offset off (always 0 without extended L2).
func (g Geometry) SubclusterIndex(off uint64) int {
	return int(g.OffsetIntoCluster(off) >> g.SubclusterBits())
}

// RefcountBits returns the width of a refcount entry in bits.
func (g Geometry) RefcountBits() uint32 { return 1 << g.RefcountOrder }

// RefcountMax returns the largest refcount an entry can hold.
func (g Geometry) RefcountMax() uint64 {
	if g.RefcountOrder >= 6 {
		return ^uint64(0)
	}
	return 1<<g.RefcountBits() - 1
}

func (g Geometry) refblockBits() uint32 { return g.ClusterBits + 3 - g.RefcountOrder }

// RefblockEntries returns the number of refcount entries in one refcount
// block: cluster_size * 8 / refcount_bits.
func (g Geometry) RefblockEntries() uint64 { return 1 << g.refblockBits() }

// RefTableIndex returns the refcount table index covering host offset off.
func (g Geometry) RefTableIndex(off uint64) uint64 {
	return off >> (g.ClusterBits + g.refblockBits())
}

// RefblockIndex returns the index within its refcount block of the entry
// for the host cluster containing off.
func (g Geometry) RefblockIndex(off uint64) uint64 {
	return (off >> g.ClusterBits) & (g.RefblockEntries() - 1)
}

// ---------------------------------------------------------------------------
// L1 and refcount table entries

// DecodeL1 validates an active or snapshot L1 entry and returns the offset
// of its L2 table (0: unallocated, the whole range reads from the backing
// file) and the COPIED flag. l1Offset and index locate the entry for the
// error.
func (g Geometry) DecodeL1(e, l1Offset uint64, index int64) (l2Offset uint64, copied bool, err error) {
	if e&L1ReservedMask != 0 {
		return 0, false, corrupt("L1 table", l1Offset, index, "L1 entry %#016x has reserved bits set", e)
	}
	l2Offset = e & L1OffsetMask
	if g.OffsetIntoCluster(l2Offset) != 0 {
		return 0, false, corrupt("L1 table", l1Offset, index, "L2 table offset %#x unaligned", l2Offset)
	}
	return l2Offset, e&OflagCopied != 0, nil
}

// EncodeL1 builds an L1 entry pointing at the L2 table at l2Offset.
func (g Geometry) EncodeL1(l2Offset uint64, copied bool) (uint64, error) {
	if err := g.checkHostOffset("L2 table", l2Offset); err != nil {
		return 0, err
	}
	e := l2Offset
	if copied {
		e |= OflagCopied
	}
	return e, nil
}

// DecodeRefTable validates a refcount table entry and returns the offset of
// the refcount block (0: not allocated, all its refcounts are 0).
func (g Geometry) DecodeRefTable(e, reftableOffset uint64, index int64) (uint64, error) {
	if e&RefTableReservedMask != 0 {
		return 0, corrupt("refcount table", reftableOffset, index, "refcount table entry %#016x has reserved bits set", e)
	}
	off := e & RefTableOffsetMask
	if g.OffsetIntoCluster(off) != 0 {
		return 0, corrupt("refcount table", reftableOffset, index, "refblock offset %#x unaligned", off)
	}
	return off, nil
}

// EncodeRefTable builds a refcount table entry for the block at off.
func (g Geometry) EncodeRefTable(off uint64) (uint64, error) {
	if off == 0 || g.OffsetIntoCluster(off) != 0 {
		return 0, invalidEncode("refcount block offset %#x not a nonzero cluster-aligned offset", off)
	}
	return off, nil
}

func (g Geometry) checkHostOffset(what string, off uint64) error {
	if off == 0 || off >= MaxHostOffset || g.OffsetIntoCluster(off) != 0 {
		return invalidEncode("%s offset %#x not a nonzero cluster-aligned offset below 2^56", what, off)
	}
	return nil
}

// EncodeError reports an attempt to encode an entry that cannot represent
// the value asked for; it is a programming error in the caller, never the
// image's fault.
type EncodeError struct{ Msg string }

// Error implements error.
func (e *EncodeError) Error() string { return "qcow2: cannot encode: " + e.Msg }

func invalidEncode(format string, args ...any) error {
	return &EncodeError{Msg: fmt.Sprintf(format, args...)}
}

// ---------------------------------------------------------------------------
// L2 entries

// ClusterType is the kind of a guest cluster, derived from its L2 entry as
// QEMU's qcow2_get_cluster_type does.
type ClusterType uint8

// Cluster types.
const (
	// ClusterUnallocated reads from the backing file (or zeros).
	ClusterUnallocated ClusterType = iota
	// ClusterZeroPlain reads as zeros; no host cluster.
	ClusterZeroPlain
	// ClusterZeroAlloc reads as zeros; a host cluster is preallocated.
	ClusterZeroAlloc
	// ClusterNormal reads from its host cluster.
	ClusterNormal
	// ClusterCompressed reads by decompressing a descriptor's byte range.
	ClusterCompressed
)

var clusterTypeNames = [...]string{"unallocated", "zero-plain", "zero-alloc", "normal", "compressed"}

// String returns the type's name as qemu-img map would describe it.
func (t ClusterType) String() string {
	if int(t) < len(clusterTypeNames) {
		return clusterTypeNames[t]
	}
	return fmt.Sprintf("ClusterType(%d)", t)
}

// SubclusterType is the kind of one subcluster, as QEMU's
// qcow2_get_subcluster_type derives it. Without extended L2 entries each
// cluster is one subcluster of the corresponding type.
type SubclusterType uint8

// Subcluster types.
const (
	// SubclusterUnallocatedPlain: no host cluster; reads from the backing file.
	SubclusterUnallocatedPlain SubclusterType = iota
	// SubclusterUnallocatedAlloc: the cluster has a host cluster but this
	// subcluster is not allocated in it; reads from the backing file.
	SubclusterUnallocatedAlloc
	// SubclusterZeroPlain reads as zeros; no host cluster.
	SubclusterZeroPlain
	// SubclusterZeroAlloc reads as zeros; the cluster has a host cluster.
	SubclusterZeroAlloc
	// SubclusterNormal reads from the host cluster.
	SubclusterNormal
	// SubclusterCompressed: the whole cluster is compressed.
	SubclusterCompressed
	// SubclusterInvalid: the bitmap is inconsistent (corruption).
	SubclusterInvalid
)

var subclusterTypeNames = [...]string{"unallocated-plain", "unallocated-alloc", "zero-plain",
	"zero-alloc", "normal", "compressed", "invalid"}

// String returns the type's name, after QEMU's QCOW2_SUBCLUSTER_* names.
func (t SubclusterType) String() string {
	if int(t) < len(subclusterTypeNames) {
		return subclusterTypeNames[t]
	}
	return fmt.Sprintf("SubclusterType(%d)", t)
}

// ClusterType classifies the first word of an L2 entry. It does not
// validate; call CheckL2 for that. With extended L2 entries the zero flag
// does not exist (zeroes are in the bitmap), so bit 0 is ignored here. With
// an external data file, offset 0 is a valid host offset and COPIED (always
// set on allocated clusters there) tells it apart from unallocated.
func (g Geometry) ClusterType(e uint64) ClusterType {
	switch {
	case e&OflagCompressed != 0:
		return ClusterCompressed
	case e&OflagZero != 0 && !g.ExtendedL2:
		if e&L2OffsetMask != 0 {
			return ClusterZeroAlloc
		}
		return ClusterZeroPlain
	case e&L2OffsetMask == 0:
		if g.DataFile && e&OflagCopied != 0 {
			return ClusterNormal
		}
		return ClusterUnallocated
	default:
		return ClusterNormal
	}
}

// SubclusterType classifies subcluster sc (0..31; 0 without extended L2) of
// the cluster described by L2 entry e and, with extended L2 entries, its
// bitmap word. An out-of-range sc gives SubclusterInvalid.
func (g Geometry) SubclusterType(e, bitmap uint64, sc int) SubclusterType {
	if sc < 0 || sc >= g.Subclusters() {
		return SubclusterInvalid
	}
	t := g.ClusterType(e)
	if !g.ExtendedL2 {
		switch t {
		case ClusterCompressed:
			return SubclusterCompressed
		case ClusterZeroPlain:
			return SubclusterZeroPlain
		case ClusterZeroAlloc:
			return SubclusterZeroAlloc
		case ClusterNormal:
			return SubclusterNormal
		default:
			return SubclusterUnallocatedPlain
		}
	}
	alloc := uint64(1) << sc
	zero := alloc << 32
	switch t {
	case ClusterCompressed:
		return SubclusterCompressed
	case ClusterNormal:
		switch {
		case (bitmap>>32)&bitmap != 0:
			return SubclusterInvalid
		case bitmap&zero != 0:
			return SubclusterZeroAlloc
		case bitmap&alloc != 0:
			return SubclusterNormal
		default:
			return SubclusterUnallocatedAlloc
		}
	default: // ClusterUnallocated; zero types do not exist with extended L2
		switch {
		case bitmap&BitmapAllAlloc != 0:
			return SubclusterInvalid
		case bitmap&zero != 0:
			return SubclusterZeroPlain
		default:
			return SubclusterUnallocatedPlain
		}
	}
}

// SubclusterRun returns the type of subcluster sc and the number of
// consecutive subclusters, starting at sc and staying within the cluster,
// that have the same type, so a caller can map a whole run at once (QEMU's
// qcow2_get_subcluster_range_type). On an out-of-range sc it returns
// SubclusterInvalid and 0.
func (g Geometry) SubclusterRun(e, bitmap uint64, sc int) (SubclusterType, int) {
	n := g.Subclusters()
	t := g.SubclusterType(e, bitmap, sc)
	if sc < 0 || sc >= n {
		return SubclusterInvalid, 0
	}
	if !g.ExtendedL2 || t == SubclusterCompressed || t == SubclusterInvalid {
		return t, n - sc
	}
	// Build a word whose bit i is set when subcluster i has a different
	// type than sc, then count the trailing zeros above sc.
	var other uint32
	alloc, zero := uint32(bitmap), uint32(bitmap>>32)
	switch t {
	case SubclusterNormal:
		other = ^alloc
	case SubclusterZeroPlain, SubclusterZeroAlloc:
		other = ^zero
	default: // unallocated: neither bit
		other = alloc | zero
	}
	run := bits.TrailingZeros32(other >> sc) // 32 if none differs
	return t, min(run, n-sc)
}

// CheckL2 validates an L2 entry (and its bitmap word with extended L2) the
// way QEMU reacts to it on the read path plus the reserved-bit rules of the
// specification, returning a *CorruptError located by l2Offset and index.
// It checks: reserved bits; cluster alignment of the host offset; zero flag
// in a version 2 image; subcluster bitmap consistency; for compressed
// entries: no COPIED flag, no external data file, a zero bitmap word and a
// host offset below 2^56. It cannot check that a data-file cluster's host
// offset equals its guest offset; the caller knows the guest offset.
func (g Geometry) CheckL2(e, bitmap, l2Offset uint64, index int64) error {
	bad := func(format string, args ...any) error {
		return corrupt("L2 table", l2Offset, index, format, args...)
	}
	if e&OflagCompressed != 0 {
		if g.DataFile {
			return bad("compressed cluster entry %#016x in image with external data file", e)
		}
		if e&OflagCopied != 0 {
			return bad("compressed cluster entry %#016x has COPIED set", e)
		}
		if g.ExtendedL2 && bitmap != 0 {
			return bad("compressed cluster has subcluster bitmap %#016x, must be zero", bitmap)
		}
		if off, _ := g.CompressedRange(e); off >= MaxHostOffset {
			return bad("compressed cluster offset %#x beyond the 2^56 limit", off)
		}
		return nil
	}
	reserved := L2StdReservedMask
	if g.ExtendedL2 {
		reserved = L2ExtReservedMask
	}
	if e&reserved != 0 {
		return bad("L2 entry %#016x has reserved bits set", e)
	}
	if e&OflagZero != 0 && g.Version < 3 {
		return bad("zero cluster entry %#016x in pre-v3 image", e)
	}
	if off := e & L2OffsetMask; g.OffsetIntoCluster(off) != 0 {
		return bad("cluster allocation offset %#x unaligned", off)
	}
	if g.ExtendedL2 {
		if (bitmap>>32)&bitmap != 0 {
			return bad("subcluster bitmap %#016x marks subclusters both allocated and zero", bitmap)
		}
		if g.ClusterType(e) == ClusterUnallocated && bitmap&BitmapAllAlloc != 0 {
			return bad("subcluster bitmap %#016x allocates subclusters of an unallocated cluster", bitmap)
		}
	} else if bitmap != 0 {
		return bad("standard L2 entry given a bitmap word %#016x", bitmap)
	}
	return nil
}

// CheckDataFileOffset validates the one rule CheckL2 cannot: in an image
// with an external data file, a cluster that has a host offset must map to
// the same offset in the data file as its guest offset (QEMU: "External data
// file host cluster offset ... does not match guest cluster offset").
// guestOffset is any offset inside the guest cluster e maps.
func (g Geometry) CheckDataFileOffset(e, guestOffset, l2Offset uint64, index int64) error {
	if !g.DataFile {
		return nil
	}
	switch g.ClusterType(e) {
	case ClusterNormal, ClusterZeroAlloc:
		if host, want := HostOffset(e), g.StartOfCluster(guestOffset); host != want {
			return corrupt("L2 table", l2Offset, index,
				"external data file host cluster offset %#x does not match guest cluster offset %#x", host, want)
		}
	}
	return nil
}

// HostOffset returns the host cluster offset of a standard (non-compressed)
// L2 entry; 0 means none, except for allocated clusters of an external data
// file (see ClusterType).
func HostOffset(e uint64) uint64 { return e & L2OffsetMask }

// csizeShift is QEMU's csize_shift: the first bit of a compressed
// descriptor's sector count, x = 62 - (cluster_bits - 8).
func (g Geometry) csizeShift() uint32 { return 62 - (g.ClusterBits - 8) }

// csizeMask is QEMU's csize_mask: the sector count field's width is
// cluster_bits - 8 bits.
func (g Geometry) csizeMask() uint64 { return 1<<(g.ClusterBits-8) - 1 }

// CompressedRange decodes a compressed cluster descriptor: the host byte
// offset of the compressed data (usually not aligned) and the number of
// bytes to read, (sectors+1)*512 - offset%512. The length is between 1 and
// twice the cluster size, so a buffer of 2 clusters always suffices; the
// data may cross into the next host cluster and end before the last byte.
// The flag bits are ignored; CheckL2 validates the entry.
func (g Geometry) CompressedRange(e uint64) (hostOffset, length uint64) {
	if g.ClusterBits < MinClusterBits || g.ClusterBits > MaxClusterBits {
		return 0, 0
	}
	x := g.csizeShift()
	hostOffset = e & (1<<x - 1)
	sectors := (e>>x)&g.csizeMask() + 1
	return hostOffset, sectors*CompressedSectorSize - hostOffset%CompressedSectorSize
}

// EncodeCompressed builds a compressed cluster descriptor for size bytes of
// compressed data at hostOffset (QEMU's qcow2_alloc_compressed_cluster_offset
// encoding). It fails if the data does not fit the sector count field (more
// than a cluster's worth of sectors) or the offset the offset field.
func (g Geometry) EncodeCompressed(hostOffset, size uint64) (uint64, error) {
	if g.ClusterBits < MinClusterBits || g.ClusterBits > MaxClusterBits {
		return 0, invalidEncode("cluster_bits %d out of range", g.ClusterBits)
	}
	if g.DataFile {
		return 0, invalidEncode("compressed clusters are not allowed with an external data file")
	}
	x := g.csizeShift()
	if hostOffset >= MaxHostOffset || hostOffset >= 1<<x {
		return 0, invalidEncode("compressed cluster offset %#x too large", hostOffset)
	}
	if size == 0 || size > 2*g.ClusterSize() {
		return 0, invalidEncode("compressed size %d out of range 1..%d", size, 2*g.ClusterSize())
	}
	extra := (hostOffset+size-1)/CompressedSectorSize - hostOffset/CompressedSectorSize
	if extra > g.csizeMask() {
		return 0, invalidEncode("compressed size %d at %#x needs %d extra sectors, maximum %d",
			size, hostOffset, extra, g.csizeMask())
	}
	return OflagCompressed | extra<<x | hostOffset, nil
}

// EncodeL2Normal builds the first word of an L2 entry for a data cluster at
// hostOffset. Offset 0 is only valid with an external data file, where it
// must carry COPIED (QEMU tells it from unallocated that way).
func (g Geometry) EncodeL2Normal(hostOffset uint64, copied bool) (uint64, error) {
	if hostOffset == 0 && g.DataFile && copied {
		return OflagCopied, nil
	}
	if err := g.checkHostOffset("data cluster", hostOffset); err != nil {
		return 0, err
	}
	e := hostOffset
	if copied {
		e |= OflagCopied
	}
	return e, nil
}

// EncodeL2Zero builds a standard L2 entry that reads as zeros: zero-plain
// when hostOffset is 0, else zero-alloc keeping the preallocated cluster.
// Only version 3 images without extended L2 have the zero flag; with
// extended L2 set the "reads as zero" bits of the bitmap (SubZeroRange).
func (g Geometry) EncodeL2Zero(hostOffset uint64, copied bool) (uint64, error) {
	if g.Version < 3 || g.ExtendedL2 {
		return 0, invalidEncode("zero flag not available (version %d, extended L2 %v)", g.Version, g.ExtendedL2)
	}
	if hostOffset == 0 {
		if copied {
			return 0, invalidEncode("zero-plain entry cannot be COPIED")
		}
		return OflagZero, nil
	}
	e, err := g.EncodeL2Normal(hostOffset, copied)
	return e | OflagZero, err
}

// SubAllocRange returns the bitmap bits marking subclusters [from, to) as
// allocated (QCOW_OFLAG_SUB_ALLOC_RANGE). Arguments are clamped to 0..32.
func SubAllocRange(from, to int) uint64 {
	from, to = max(0, min(from, 32)), max(0, min(to, 32))
	if from >= to {
		return 0
	}
	return (uint64(1)<<to - 1) &^ (uint64(1)<<from - 1)
}

// SubZeroRange returns the bitmap bits marking subclusters [from, to) as
// reading zeros (QCOW_OFLAG_SUB_ZERO_RANGE).
func SubZeroRange(from, to int) uint64 { return SubAllocRange(from, to) << 32 }

// L2EntryAt reads entry i of an L2 table (or L2 slice) held in table: the
// first word, and with extended L2 the bitmap word (else 0).
func (g Geometry) L2EntryAt(table []byte, i int) (e, bitmap uint64, err error) {
	sz := int(g.L2EntrySize())
	if i < 0 || i >= len(table)/sz {
		return 0, 0, fmt.Errorf("qcow2: L2 index %d out of range (table holds %d entries)", i, len(table)/sz)
	}
	e = be.Uint64(table[i*sz:])
	if g.ExtendedL2 {
		bitmap = be.Uint64(table[i*sz+8:])
	}
	return e, bitmap, nil
}

// SetL2EntryAt writes entry i of an L2 table. bitmap is ignored without
// extended L2.
func (g Geometry) SetL2EntryAt(table []byte, i int, e, bitmap uint64) error {
	sz := int(g.L2EntrySize())
	if i < 0 || i >= len(table)/sz {
		return fmt.Errorf("qcow2: L2 index %d out of range (table holds %d entries)", i, len(table)/sz)
	}
	be.PutUint64(table[i*sz:], e)
	if g.ExtendedL2 {
		be.PutUint64(table[i*sz+8:], bitmap)
	}
	return nil
}

// TableEntry reads 64-bit entry i of an L1 or refcount table held in table.
func TableEntry(table []byte, i int) (uint64, error) {
	if i < 0 || i >= len(table)/8 {
		return 0, fmt.Errorf("qcow2: table index %d out of range (table holds %d entries)", i, len(table)/8)
	}
	return be.Uint64(table[i*8:]), nil
}

// SetTableEntry writes 64-bit entry i of an L1 or refcount table.
func SetTableEntry(table []byte, i int, v uint64) error {
	if i < 0 || i >= len(table)/8 {
		return fmt.Errorf("qcow2: table index %d out of range (table holds %d entries)", i, len(table)/8)
	}
	be.PutUint64(table[i*8:], v)
	return nil
}

// ---------------------------------------------------------------------------
// Refcount block entries

// Refcount returns entry i of a refcount block held in block. Entries are
// RefcountBits wide; widths of 8 bits and more are big-endian, narrower ones
// are packed with entry 0 in the least significant bits of byte 0 (the
// specification's "bit 0 means the least significant bit").
func (g Geometry) Refcount(block []byte, i uint64) (uint64, error) {
	w := uint64(g.RefcountBits())
	if g.RefcountOrder > MaxRefcountOrder || i >= uint64(len(block))*8/w {
		return 0, fmt.Errorf("qcow2: refcount index %d out of range (block of %d bytes, %d-bit entries)", i, len(block), w)
	}
	switch w {
	case 64:
		return be.Uint64(block[i*8:]), nil
	case 32:
		return uint64(be.Uint32(block[i*4:])), nil
	case 16:
		return uint64(be.Uint16(block[i*2:])), nil
	case 8:
		return uint64(block[i]), nil
	default: // 1, 2, 4
		bit := i * w
		return uint64(block[bit/8]>>(bit%8)) & (1<<w - 1), nil
	}
}

// SetRefcount stores v as entry i of a refcount block. It fails if v does
// not fit the entry width (QEMU reports that as -ERANGE, "refcount
// overflow").
func (g Geometry) SetRefcount(block []byte, i, v uint64) error {
	w := uint64(g.RefcountBits())
	if g.RefcountOrder > MaxRefcountOrder || i >= uint64(len(block))*8/w {
		return fmt.Errorf("qcow2: refcount index %d out of range (block of %d bytes, %d-bit entries)", i, len(block), w)
	}
	if v > g.RefcountMax() {
		return fmt.Errorf("qcow2: refcount %d overflows %d-bit entry", v, w)
	}
	switch w {
	case 64:
		be.PutUint64(block[i*8:], v)
	case 32:
		be.PutUint32(block[i*4:], uint32(v))
	case 16:
		be.PutUint16(block[i*2:], uint16(v))
	case 8:
		block[i] = byte(v)
	default:
		bit := i * w
		mask := byte(1<<w-1) << (bit % 8)
		block[bit/8] = block[bit/8]&^mask | byte(v)<<(bit%8)
	}
	return nil
}
