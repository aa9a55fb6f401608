package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
)

// Magic is the qcow2 magic number, "QFI\xfb" read as a big-endian uint32.
const Magic uint32 = 0x514649fb

// Header lengths (spec "Header").
const (
	// HeaderLengthV2 is the fixed header length of version 2 images.
	HeaderLengthV2 = 72
	// MinHeaderLengthV3 is the shortest version 3 header: every field
	// through header_length.
	MinHeaderLengthV3 = 104
	// HeaderLengthV3 is the length QEMU writes for version 3: the fields
	// through compression_type plus 7 bytes of padding.
	HeaderLengthV3 = 112
)

// Limits. The cluster size and table limits are QEMU's implementation limits
// (block/qcow2.h); images beyond them cannot be opened by QEMU either, so
// enforcing them keeps every allocation bounded by a small constant.
const (
	MinClusterBits = 9  // 512-byte clusters (spec minimum)
	MaxClusterBits = 21 // 2 MiB clusters (QEMU limit)
	// MinClusterBitsExtendedL2 keeps subclusters (cluster/32) at 512 bytes or more.
	MinClusterBitsExtendedL2 = 14

	MaxL1TableBytes       = 32 << 20 // QCOW_MAX_L1_SIZE
	MaxRefcountTableBytes = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	MaxRefcountOrder      = 6        // 64-bit refcounts

	// MaxHostOffset bounds every host offset stored in L1/L2 entries: the
	// offset field ends at bit 55. Header table offsets are held to the same
	// bound because the tables must be reachable by the same metadata.
	MaxHostOffset = 1 << 56

	MaxBackingFileSize   = 1023 // spec and QEMU
	MaxBackingFormatSize = 15   // QEMU's backing_format[16] holds a NUL too
)

// Feature bits (spec "incompatible_features", "compatible_features",
// "autoclear_features").
const (
	IncompatDirty       uint64 = 1 << 0 // refcounts may be stale; repair before trusting them
	IncompatCorrupt     uint64 = 1 << 1 // metadata may be corrupt; open read-only
	IncompatDataFile    uint64 = 1 << 2 // guest data lives in an external data file
	IncompatCompression uint64 = 1 << 3 // compression_type is not deflate
	IncompatExtendedL2  uint64 = 1 << 4 // 128-bit L2 entries with 32 subclusters

	// IncompatKnown is every incompatible bit this package understands;
	// images with any other bit set are refused.
	IncompatKnown = IncompatDirty | IncompatCorrupt | IncompatDataFile |
		IncompatCompression | IncompatExtendedL2

	CompatLazyRefcounts uint64 = 1 << 0 // refcount updates may be deferred
	// CompatKnown is every compatible bit this package understands. Unknown
	// compatible bits are ignored and preserved.
	CompatKnown = CompatLazyRefcounts

	AutoclearBitmaps     uint64 = 1 << 0 // the bitmaps extension is consistent
	AutoclearDataFileRaw uint64 = 1 << 1 // the data file is a valid raw image
	// AutoclearKnown is every autoclear bit this package understands. Before
	// writing to an image, clear the others: an implementation that does not
	// know an autoclear feature cannot keep its data consistent.
	AutoclearKnown = AutoclearBitmaps | AutoclearDataFileRaw
)

// Values of crypt_method.
const (
	CryptNone = 0
	CryptAES  = 1 // legacy AES-CBC, key from a passphrase
	CryptLUKS = 2 // LUKS header in the area named by the FDE extension
)

// Values of compression_type.
const (
	CompressionDeflate = 0 // raw deflate, no zlib header ("zlib" in QEMU)
	CompressionZstd    = 1
)

// Header extension types (spec "Header extensions").
const (
	ExtEnd           uint32 = 0x00000000
	ExtBackingFormat uint32 = 0xe2792aca
	ExtFeatureTable  uint32 = 0x6803f857
	ExtBitmaps       uint32 = 0x23852875
	ExtCryptoHeader  uint32 = 0x0537be77
	ExtDataFile      uint32 = 0x44415441
)

// Sizes of fixed-size extension payloads.
const (
	featureEntrySize = 48
	featureNameSize  = 46
	bitmapsExtSize   = 24
	cryptoExtSize    = 16
)

// FeatureType selects the feature bitmap a feature name table entry refers to.
type FeatureType uint8

// Feature bitmaps named by a feature name table entry.
const (
	FeatureIncompatible FeatureType = 0
	FeatureCompatible   FeatureType = 1
	FeatureAutoclear    FeatureType = 2
)

// FeatureName is one entry of the feature name table extension: it lets a
// program that does not know a feature still print its name.
type FeatureName struct {
	Type FeatureType
	Bit  uint8 // 0..63
	Name string
}

// DefaultFeatureTable returns the feature name table QEMU 7.2 writes into
// version 3 headers with clusters larger than 4 KiB, in QEMU's order.
func DefaultFeatureTable() []FeatureName {
	return []FeatureName{
		{FeatureIncompatible, 0, "dirty bit"},
		{FeatureIncompatible, 1, "corrupt bit"},
		{FeatureIncompatible, 2, "external data file"},
		{FeatureIncompatible, 3, "compression type"},
		{FeatureIncompatible, 4, "extended L2 entries"},
		{FeatureCompatible, 0, "lazy refcounts"},
		{FeatureAutoclear, 0, "bitmaps"},
		{FeatureAutoclear, 1, "raw external data"},
	}
}

// BitmapsExt is the payload of the bitmaps extension: where the bitmap
// directory lives (see ParseBitmapDirectory).
type BitmapsExt struct {
	Count           uint32 // nb_bitmaps, 1..65535
	DirectorySize   uint64 // bytes, at most MaxBitmapDirectorySize
	DirectoryOffset uint64 // cluster aligned
}

// CryptoHeaderExt is the payload of the full disk encryption header pointer:
// the host area holding the LUKS header and key material.
type CryptoHeaderExt struct {
	Offset uint64 // cluster aligned
	Length uint64 // bytes actually used; the area is rounded up to clusters
}

// Extension is a header extension this package does not know. The
// specification requires such extensions to survive header rewrites, so
// ParseHeader keeps them verbatim and Marshal writes them back in order.
type Extension struct {
	Type uint32
	Data []byte
}

// Header is a parsed qcow2 header: the fixed fields of the first cluster
// (spec "Header"), the header extensions that follow them, and the backing
// file name. Field names follow the specification. For version 2 images the
// version 3 fields hold the values the specification implies (no features,
// refcount_order 4, header_length 72).
type Header struct {
	Version               uint32
	BackingFileOffset     uint64 // 0: no backing file
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64 // virtual disk size in bytes
	CryptMethod           uint32
	L1Size                uint32 // entries of the active L1 table
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64

	IncompatibleFeatures uint64
	CompatibleFeatures   uint64
	AutoclearFeatures    uint64
	RefcountOrder        uint32
	HeaderLength         uint32
	CompressionType      uint8 // 0 if the field is absent (header_length 104)

	// HeaderTail holds the bytes from offset 105 up to header_length: the
	// padding after compression_type and any additional fields defined by a
	// later version of the specification. Unknown additional fields must be
	// preserved when the header is rewritten (spec rule 2), so they are kept
	// verbatim rather than checked to be zero.
	HeaderTail []byte

	// BackingFile is the backing file name (not NUL-terminated on disk).
	BackingFile string
	// BackingFormat is the backing file format extension ("" if absent).
	BackingFormat string
	// DataFile is the external data file name extension ("" if absent).
	DataFile string
	// FeatureTable is the feature name table extension as read.
	FeatureTable []FeatureName
	// Bitmaps is the bitmaps extension, nil if absent or ignored.
	Bitmaps *BitmapsExt
	// BitmapsIgnored is set when a bitmaps extension was present but the
	// autoclear bitmaps bit was clear: a program without bitmap support
	// modified the image, so the bitmaps are inconsistent. Like QEMU, the
	// extension is then dropped (Bitmaps stays nil).
	BitmapsIgnored bool
	// Crypto is the full disk encryption header pointer, nil if absent.
	Crypto *CryptoHeaderExt
	// Unknown holds unknown extensions in on-disk order.
	Unknown []Extension
}

// ClusterSize returns the cluster size in bytes.
func (h *Header) ClusterSize() uint64 { return 1 << h.ClusterBits }

// RefcountBits returns the width of a refcount block entry in bits.
func (h *Header) RefcountBits() uint32 { return 1 << h.RefcountOrder }

// ExtendedL2 reports whether L2 entries are 128-bit with subclusters.
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }

// HasDataFile reports whether guest data lives in an external data file.
func (h *Header) HasDataFile() bool { return h.IncompatibleFeatures&IncompatDataFile != 0 }

// DataFileRaw reports whether the external data file is a valid raw image.
func (h *Header) DataFileRaw() bool { return h.AutoclearFeatures&AutoclearDataFileRaw != 0 }

// Dirty reports the dirty bit: refcounts must be rebuilt before use.
func (h *Header) Dirty() bool { return h.IncompatibleFeatures&IncompatDirty != 0 }

// Corrupt reports the corrupt bit: the image may only be opened read-only.
func (h *Header) Corrupt() bool { return h.IncompatibleFeatures&IncompatCorrupt != 0 }

// LazyRefcounts reports the lazy refcounts compatible bit.
func (h *Header) LazyRefcounts() bool { return h.CompatibleFeatures&CompatLazyRefcounts != 0 }

// Geometry returns the entry geometry of the image.
func (h *Header) Geometry() Geometry {
	return Geometry{
		ClusterBits:   h.ClusterBits,
		RefcountOrder: h.RefcountOrder,
		ExtendedL2:    h.ExtendedL2(),
		DataFile:      h.HasDataFile(),
		Version:       h.Version,
	}
}

// FeatureNameFor returns the name of a feature bit: from the image's
// feature name table if it has one, else from DefaultFeatureTable, else "".
func (h *Header) FeatureNameFor(t FeatureType, bit uint8) string {
	for _, f := range h.FeatureTable {
		if f.Type == t && f.Bit == bit {
			return f.Name
		}
	}
	for _, f := range DefaultFeatureTable() {
		if f.Type == t && f.Bit == bit {
			return f.Name
		}
	}
	return ""
}

var be = binary.BigEndian

func roundUp8(n uint64) uint64 { return (n + 7) &^ 7 }

// ParseHeader parses and validates the header of a qcow2 image.
//
// b holds the start of the image file and must cover the whole header
// cluster (cluster 0), or at least the header, its extensions and the
// backing file name; reading min(fileSize, 2 MiB) bytes always suffices.
// fileSize is the size of the image file, used to check that the tables the
// header points to lie inside it; pass a negative value if it is unknown
// (those checks are then skipped, as QEMU skips them).
//
// Everything is validated before use: field ranges, QEMU's implementation
// limits, alignment, feature bits (unknown incompatible bits give an
// *UnsupportedFeatureError naming the feature), every extension length
// against the end of the extension area, and the consistency rules between
// features. The returned Header shares no memory with b.
func ParseHeader(b []byte, fileSize int64) (*Header, error) {
	if len(b) < HeaderLengthV2 {
		return nil, invalid("header", "truncated: %d bytes, need at least %d", len(b), HeaderLengthV2)
	}
	h := &Header{
		Version:               be.Uint32(b[4:]),
		BackingFileOffset:     be.Uint64(b[8:]),
		BackingFileSize:       be.Uint32(b[16:]),
		ClusterBits:           be.Uint32(b[20:]),
		Size:                  be.Uint64(b[24:]),
		CryptMethod:           be.Uint32(b[32:]),
		L1Size:                be.Uint32(b[36:]),
		L1TableOffset:         be.Uint64(b[40:]),
		RefcountTableOffset:   be.Uint64(b[48:]),
		RefcountTableClusters: be.Uint32(b[56:]),
		NbSnapshots:           be.Uint32(b[60:]),
		SnapshotsOffset:       be.Uint64(b[64:]),
	}
	if m := be.Uint32(b[0:]); m != Magic {
		return nil, invalid("magic", "%#08x is not a qcow2 image (want %#08x)", m, Magic)
	}
	if h.Version != 2 && h.Version != 3 {
		return nil, unsupported("version", "%d not supported (2 or 3)", h.Version)
	}
	if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
		return nil, invalid("cluster_bits", "%d out of range %d..%d", h.ClusterBits, MinClusterBits, MaxClusterBits)
	}
	cs := h.ClusterSize()

	if h.Version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = HeaderLengthV2
	} else {
		if len(b) < MinHeaderLengthV3 {
			return nil, invalid("header", "truncated: %d bytes, need at least %d for version 3", len(b), MinHeaderLengthV3)
		}
		h.IncompatibleFeatures = be.Uint64(b[72:])
		h.CompatibleFeatures = be.Uint64(b[80:])
		h.AutoclearFeatures = be.Uint64(b[88:])
		h.RefcountOrder = be.Uint32(b[96:])
		h.HeaderLength = be.Uint32(b[100:])
		if h.HeaderLength < MinHeaderLengthV3 {
			return nil, invalid("header_length", "%d too short (minimum %d)", h.HeaderLength, MinHeaderLengthV3)
		}
		if h.HeaderLength%8 != 0 {
			return nil, invalid("header_length", "%d not a multiple of 8", h.HeaderLength)
		}
	}
	if uint64(h.HeaderLength) > cs {
		return nil, invalid("header_length", "%d exceeds cluster size %d", h.HeaderLength, cs)
	}
	if uint64(len(b)) < uint64(h.HeaderLength) {
		return nil, invalid("header", "truncated: %d bytes, header_length is %d", len(b), h.HeaderLength)
	}
	if h.HeaderLength > MinHeaderLengthV3 {
		h.CompressionType = b[MinHeaderLengthV3]
		h.HeaderTail = bytes.Clone(b[MinHeaderLengthV3+1 : h.HeaderLength])
	}

	// The extension area runs from the end of the header to the backing
	// file name, or to the end of cluster 0.
	if h.BackingFileOffset > cs {
		return nil, invalid("backing_file_offset", "%#x beyond the header cluster (%d bytes)", h.BackingFileOffset, cs)
	}
	if h.BackingFileOffset != 0 && h.BackingFileOffset < uint64(h.HeaderLength) {
		return nil, invalid("backing_file_offset", "%#x overlaps the header (header_length %d)", h.BackingFileOffset, h.HeaderLength)
	}
	extEnd := cs
	if h.BackingFileOffset != 0 {
		extEnd = h.BackingFileOffset
	}

	// Same order as QEMU: the compression type first, then unknown
	// incompatible features, so the error a user sees matches qemu-img's.
	if err := h.checkCompressionType(); err != nil {
		return nil, err
	}
	if unknown := h.IncompatibleFeatures &^ IncompatKnown; unknown != 0 {
		return nil, unsupportedFeatures(b, uint64(h.HeaderLength), min(extEnd, uint64(len(b))), unknown)
	}
	if h.ExtendedL2() && h.ClusterBits < MinClusterBitsExtendedL2 {
		return nil, invalid("cluster_bits", "%d too small for extended L2 entries (subcluster size %d < 512)",
			h.ClusterBits, cs/SubclustersPerCluster)
	}
	if h.RefcountOrder > MaxRefcountOrder {
		return nil, invalid("refcount_order", "%d too large (maximum %d: 64-bit refcounts)", h.RefcountOrder, MaxRefcountOrder)
	}
	if h.CryptMethod > CryptLUKS {
		return nil, unsupported("crypt_method", "%d unknown", h.CryptMethod)
	}
	if h.Size > math.MaxInt64 {
		return nil, invalid("size", "%d too large", h.Size)
	}

	if h.RefcountTableClusters == 0 {
		return nil, invalid("refcount_table_clusters", "0: image has no refcount table")
	}
	if err := checkTable("refcount_table_offset", "refcount_table_clusters", h.RefcountTableOffset,
		uint64(h.RefcountTableClusters), cs, MaxRefcountTableBytes, cs, fileSize); err != nil {
		return nil, err
	}
	// Each snapshot table entry is at least the 40-byte fixed part; the real
	// table size is checked by ParseSnapshotTable.
	if err := checkTable("snapshots_offset", "nb_snapshots", h.SnapshotsOffset,
		uint64(h.NbSnapshots), SnapshotHeaderSize, SnapshotHeaderSize*MaxSnapshots, cs, fileSize); err != nil {
		return nil, err
	}
	if err := checkTable("l1_table_offset", "l1_size", h.L1TableOffset,
		uint64(h.L1Size), 8, MaxL1TableBytes, cs, fileSize); err != nil {
		return nil, err
	}
	if need := h.Geometry().L1EntriesFor(h.Size); uint64(h.L1Size) < need {
		return nil, invalid("l1_size", "%d too small for virtual size %d (need %d entries)", h.L1Size, h.Size, need)
	}

	if h.DataFileRaw() && !h.HasDataFile() {
		return nil, invalid("autoclear_features", "%#x: raw external data bit without the external data file bit", h.AutoclearFeatures)
	}
	if h.HasDataFile() && h.NbSnapshots != 0 {
		return nil, invalid("nb_snapshots", "%d: internal snapshots are not allowed with an external data file", h.NbSnapshots)
	}

	if uint64(len(b)) < extEnd {
		return nil, invalid("header", "truncated: %d bytes, extension area ends at %d", len(b), extEnd)
	}
	if err := h.parseExtensions(b[:extEnd], fileSize); err != nil {
		return nil, err
	}

	if h.BackingFileOffset != 0 {
		if h.BackingFileSize > MaxBackingFileSize || uint64(h.BackingFileSize) > cs-h.BackingFileOffset {
			return nil, invalid("backing_file_size", "%d too long (maximum %d, and it must end inside cluster 0)",
				h.BackingFileSize, min(MaxBackingFileSize, cs-h.BackingFileOffset))
		}
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		if uint64(len(b)) < end {
			return nil, invalid("header", "truncated: %d bytes, backing file name ends at %d", len(b), end)
		}
		h.BackingFile = string(b[h.BackingFileOffset:end])
		if h.BackingFile != "" && h.DataFileRaw() {
			return nil, invalid("backing_file_offset", "%#x: backing files are incompatible with raw external data files", h.BackingFileOffset)
		}
	}

	if h.CryptMethod == CryptLUKS && h.Crypto == nil {
		return nil, invalid("crypt_method", "2 (LUKS) without a full disk encryption header extension")
	}
	return h, nil
}

func (h *Header) checkCompressionType() error {
	switch h.CompressionType {
	case CompressionDeflate:
		if h.IncompatibleFeatures&IncompatCompression != 0 {
			return invalid("incompatible_features", "%#x: compression type bit set but compression_type is 0 (deflate)", h.IncompatibleFeatures)
		}
	case CompressionZstd:
		if h.IncompatibleFeatures&IncompatCompression == 0 {
			return invalid("compression_type", "%d without the compression type incompatible bit", h.CompressionType)
		}
	default:
		return unsupported("compression_type", "%d unknown", h.CompressionType)
	}
	return nil
}

// checkTable validates a table the header points to, like QEMU's
// qcow2_validate_table, and additionally that a non-empty table neither
// starts at offset 0 (the header) nor extends past the end of the file.
func checkTable(offField, sizeField string, off, entries, entrySize, maxBytes, cs uint64, fileSize int64) error {
	if entries > maxBytes/entrySize {
		return invalid(sizeField, "%d too large (table limit %d bytes)", entries, maxBytes)
	}
	if off&(cs-1) != 0 {
		return invalid(offField, "%#x not aligned to cluster size %d", off, cs)
	}
	if off >= MaxHostOffset {
		return invalid(offField, "%#x beyond the 2^56 offset limit", off)
	}
	if entries == 0 {
		return nil
	}
	if off == 0 {
		return invalid(offField, "0 overlaps the header (%s %d)", sizeField, entries)
	}
	// No overflow: off < 2^56 and the table is at most 64 MiB.
	if end := off + entries*entrySize; fileSize >= 0 && end > uint64(fileSize) {
		return invalid(offField, "%#x: table ends at %#x, beyond end of file (%d bytes)", off, end, fileSize)
	}
	return nil
}

func extField(typ uint32) string { return fmt.Sprintf("extension %#08x", typ) }

// parseExtensions walks the extension area area (which starts at offset 0 of
// the file, so offsets in errors are file offsets) from header_length to its
// end.
func (h *Header) parseExtensions(area []byte, fileSize int64) error {
	end := uint64(len(area))
	seen := map[uint32]bool{}
	for off := uint64(h.HeaderLength); off < end; {
		if end-off < 8 {
			return invalid("header extensions", "extension header at %#x crosses the end of the extension area (%#x)", off, end)
		}
		typ, n := be.Uint32(area[off:]), uint64(be.Uint32(area[off+4:]))
		off += 8
		if n > end-off {
			return invalid(extField(typ), "length %d exceeds header (%d bytes left before %#x)", n, end-off, end)
		}
		data := area[off : off+n]
		if typ != ExtEnd {
			if typ != ExtBackingFormat && typ != ExtFeatureTable && typ != ExtBitmaps &&
				typ != ExtCryptoHeader && typ != ExtDataFile {
				h.Unknown = append(h.Unknown, Extension{Type: typ, Data: bytes.Clone(data)})
				off += roundUp8(n)
				continue
			}
			if seen[typ] {
				return invalid(extField(typ), "appears more than once")
			}
			seen[typ] = true
		}
		switch typ {
		case ExtEnd:
			if n != 0 {
				return invalid("extension 0x00000000", "end marker has length %d", n)
			}
			return nil
		case ExtBackingFormat:
			if n > MaxBackingFormatSize {
				return invalid(extField(typ), "length %d too long for a format name (maximum %d)", n, MaxBackingFormatSize)
			}
			h.BackingFormat = string(data)
		case ExtDataFile:
			h.DataFile = string(data)
		case ExtFeatureTable:
			t, err := parseFeatureTable(data)
			if err != nil {
				return err
			}
			h.FeatureTable = t
		case ExtBitmaps:
			if n != bitmapsExtSize {
				return invalid(extField(typ), "length %d, want %d", n, bitmapsExtSize)
			}
			if h.AutoclearFeatures&AutoclearBitmaps == 0 {
				h.BitmapsIgnored = true
				break
			}
			bm, err := h.parseBitmapsExt(data, fileSize)
			if err != nil {
				return err
			}
			h.Bitmaps = bm
		case ExtCryptoHeader:
			if h.CryptMethod != CryptLUKS {
				return invalid(extField(typ), "present but crypt_method is %d (only LUKS uses it)", h.CryptMethod)
			}
			if n != cryptoExtSize {
				return invalid(extField(typ), "length %d, want %d", n, cryptoExtSize)
			}
			c := &CryptoHeaderExt{Offset: be.Uint64(data), Length: be.Uint64(data[8:])}
			if err := checkArea(extField(typ), "encryption header", c.Offset, c.Length, h.ClusterSize(), fileSize); err != nil {
				return err
			}
			h.Crypto = c
		}
		off += roundUp8(n)
	}
	// Reaching the end of the area without an end marker is accepted, as
	// QEMU accepts it: the area may be filled exactly.
	return nil
}

// checkArea validates a cluster-aligned host area described by an extension.
func checkArea(field, what string, off, length, cs uint64, fileSize int64) error {
	if off&(cs-1) != 0 {
		return invalid(field, "%s offset %#x not aligned to cluster size %d", what, off, cs)
	}
	if off == 0 || off >= MaxHostOffset || length > MaxHostOffset-off {
		return invalid(field, "%s area %#x+%d out of range", what, off, length)
	}
	if fileSize >= 0 && off+length > uint64(fileSize) {
		return invalid(field, "%s area %#x+%d beyond end of file (%d bytes)", what, off, length, fileSize)
	}
	return nil
}

func (h *Header) parseBitmapsExt(data []byte, fileSize int64) (*BitmapsExt, error) {
	f := extField(ExtBitmaps)
	if r := be.Uint32(data[4:]); r != 0 {
		return nil, invalid(f, "reserved field is %#x, must be zero", r)
	}
	bm := &BitmapsExt{Count: be.Uint32(data), DirectorySize: be.Uint64(data[8:]), DirectoryOffset: be.Uint64(data[16:])}
	if bm.Count == 0 {
		return nil, invalid(f, "nb_bitmaps is 0")
	}
	if bm.Count > MaxBitmaps {
		return nil, invalid(f, "nb_bitmaps %d exceeds the maximum of %d", bm.Count, MaxBitmaps)
	}
	if bm.DirectorySize > MaxBitmapDirectorySize {
		return nil, invalid(f, "bitmap_directory_size %d exceeds the maximum of %d", bm.DirectorySize, MaxBitmapDirectorySize)
	}
	if bm.DirectorySize < uint64(bm.Count)*minBitmapEntrySize {
		return nil, invalid(f, "bitmap_directory_size %d too small for %d bitmaps", bm.DirectorySize, bm.Count)
	}
	if err := checkArea(f, "bitmap directory", bm.DirectoryOffset, bm.DirectorySize, h.ClusterSize(), fileSize); err != nil {
		return nil, err
	}
	return bm, nil
}

// parseFeatureTable parses a feature name table strictly: the length must be
// a whole number of entries, every entry must name a valid bitmap and bit,
// and names must be NUL padded. All-zero entries are skipped because QEMU
// treats an empty name as the end of the table.
func parseFeatureTable(data []byte) ([]FeatureName, error) {
	f := extField(ExtFeatureTable)
	if len(data)%featureEntrySize != 0 {
		return nil, invalid(f, "length %d not a multiple of %d", len(data), featureEntrySize)
	}
	var t []FeatureName
	for i := 0; i < len(data); i += featureEntrySize {
		e := data[i : i+featureEntrySize]
		raw := e[2:]
		if e[0] == 0 && e[1] == 0 && allZero(raw) {
			continue
		}
		if e[0] > byte(FeatureAutoclear) {
			return nil, invalid(f, "entry %d: feature type %d unknown", i/featureEntrySize, e[0])
		}
		if e[1] > 63 {
			return nil, invalid(f, "entry %d: bit %d out of range 0..63", i/featureEntrySize, e[1])
		}
		name := raw
		if z := bytes.IndexByte(raw, 0); z >= 0 {
			name = raw[:z]
			if !allZero(raw[z:]) {
				return nil, invalid(f, "entry %d: name not zero padded", i/featureEntrySize)
			}
		}
		if len(name) == 0 {
			return nil, invalid(f, "entry %d: empty name for type %d bit %d", i/featureEntrySize, e[0], e[1])
		}
		for _, p := range t {
			if p.Type == FeatureType(e[0]) && p.Bit == e[1] {
				return nil, invalid(f, "entry %d: type %d bit %d named twice", i/featureEntrySize, e[0], e[1])
			}
		}
		t = append(t, FeatureName{Type: FeatureType(e[0]), Bit: e[1], Name: string(name)})
	}
	return t, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// unsupportedFeatures builds the error for unknown incompatible bits. Like
// QEMU it scans the extension area leniently for a feature name table, so
// that even a damaged header yields the best message possible, and it never
// fails itself.
func unsupportedFeatures(b []byte, start, end uint64, mask uint64) error {
	var table []byte
	for off := start; off < end && end-off >= 8; {
		typ, n := be.Uint32(b[off:]), uint64(be.Uint32(b[off+4:]))
		off += 8
		if typ == ExtEnd || n > end-off {
			break
		}
		if typ == ExtFeatureTable {
			table = b[off : off+n]
			break
		}
		off += roundUp8(n)
	}
	e := &UnsupportedFeatureError{}
	for i := 0; i+featureEntrySize <= len(table); i += featureEntrySize {
		ent := table[i : i+featureEntrySize]
		name := ent[2:]
		if z := bytes.IndexByte(name, 0); z >= 0 {
			name = name[:z]
		}
		if len(name) == 0 {
			break // QEMU stops at the first empty name
		}
		if ent[0] != byte(FeatureIncompatible) || ent[1] > 63 {
			continue
		}
		if bit := uint64(1) << ent[1]; mask&bit != 0 {
			e.Names = append(e.Names, string(name))
			mask &^= bit
		}
	}
	e.Unknown = mask
	return e
}

// Marshal encodes the header into the content of cluster 0: the header
// fields (header_length as needed for HeaderTail), then the extensions in
// QEMU's order — backing format, external data file name, encryption header
// pointer, feature name table, bitmaps, unknown extensions in their original
// order, end marker — then the backing file name. BackingFileOffset,
// BackingFileSize and HeaderLength are computed, not taken from h.
//
// clusterSize must be the image's cluster size: it is the length of the
// returned buffer and the space everything must fit in. Like QEMU, a
// version 3 header gets the standard feature name table when clusters are
// larger than 4 KiB (with 4 KiB or smaller clusters the table would leave
// too little room for a backing file name); names from h.FeatureTable for
// bits QEMU does not name are kept after it.
//
// Marshal never writes a header ParseHeader would refuse: it parses its own
// output (without file size checks) and returns that error instead.
func (h *Header) Marshal(clusterSize int) ([]byte, error) {
	if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
		return nil, invalid("cluster_bits", "%d out of range %d..%d", h.ClusterBits, MinClusterBits, MaxClusterBits)
	}
	if uint64(clusterSize) != h.ClusterSize() {
		return nil, invalid("cluster_bits", "%d does not match cluster size %d", h.ClusterBits, clusterSize)
	}
	var hl int
	switch h.Version {
	case 2:
		if h.IncompatibleFeatures|h.CompatibleFeatures|h.AutoclearFeatures != 0 {
			return nil, invalid("version", "2 cannot store feature bits")
		}
		if h.RefcountOrder != 4 {
			return nil, invalid("refcount_order", "%d: version 2 requires 4", h.RefcountOrder)
		}
		if h.CompressionType != 0 || len(h.HeaderTail) != 0 {
			return nil, invalid("version", "2 cannot store compression_type or additional fields")
		}
		hl = HeaderLengthV2
	case 3:
		hl = max(HeaderLengthV3, int(roundUp8(uint64(MinHeaderLengthV3+1+len(h.HeaderTail)))))
	default:
		return nil, unsupported("version", "%d not supported (2 or 3)", h.Version)
	}
	if hl > clusterSize {
		return nil, invalid("header_length", "%d exceeds cluster size %d", hl, clusterSize)
	}
	buf := make([]byte, clusterSize)
	be.PutUint32(buf[0:], Magic)
	be.PutUint32(buf[4:], h.Version)
	be.PutUint32(buf[20:], h.ClusterBits)
	be.PutUint64(buf[24:], h.Size)
	be.PutUint32(buf[32:], h.CryptMethod)
	be.PutUint32(buf[36:], h.L1Size)
	be.PutUint64(buf[40:], h.L1TableOffset)
	be.PutUint64(buf[48:], h.RefcountTableOffset)
	be.PutUint32(buf[56:], h.RefcountTableClusters)
	be.PutUint32(buf[60:], h.NbSnapshots)
	be.PutUint64(buf[64:], h.SnapshotsOffset)
	if h.Version == 3 {
		be.PutUint64(buf[72:], h.IncompatibleFeatures)
		be.PutUint64(buf[80:], h.CompatibleFeatures)
		be.PutUint64(buf[88:], h.AutoclearFeatures)
		be.PutUint32(buf[96:], h.RefcountOrder)
		be.PutUint32(buf[100:], uint32(hl))
		buf[104] = h.CompressionType
		copy(buf[105:], h.HeaderTail)
	}

	off := hl
	var errNoSpace error
	add := func(typ uint32, data []byte) {
		need := 8 + int(roundUp8(uint64(len(data))))
		if errNoSpace != nil || len(data) > math.MaxUint32 || need > clusterSize-off {
			errNoSpace = invalid(extField(typ), "length %d does not fit in the header cluster", len(data))
			return
		}
		be.PutUint32(buf[off:], typ)
		be.PutUint32(buf[off+4:], uint32(len(data)))
		copy(buf[off+8:], data)
		off += need
	}
	if h.BackingFormat != "" {
		add(ExtBackingFormat, []byte(h.BackingFormat))
	}
	if h.DataFile != "" {
		add(ExtDataFile, []byte(h.DataFile))
	}
	if h.Crypto != nil {
		var d [cryptoExtSize]byte
		be.PutUint64(d[0:], h.Crypto.Offset)
		be.PutUint64(d[8:], h.Crypto.Length)
		add(ExtCryptoHeader, d[:])
	}
	if h.Version == 3 {
		if t := h.marshalFeatureTable(); len(t) > 0 {
			add(ExtFeatureTable, t)
		}
	}
	if h.Bitmaps != nil {
		var d [bitmapsExtSize]byte
		be.PutUint32(d[0:], h.Bitmaps.Count)
		be.PutUint64(d[8:], h.Bitmaps.DirectorySize)
		be.PutUint64(d[16:], h.Bitmaps.DirectoryOffset)
		add(ExtBitmaps, d[:])
	}
	for _, u := range h.Unknown {
		add(u.Type, u.Data)
	}
	add(ExtEnd, nil)
	if errNoSpace != nil {
		return nil, errNoSpace
	}
	if h.BackingFile != "" {
		n := len(h.BackingFile)
		if n > MaxBackingFileSize || n > clusterSize-off {
			return nil, invalid("backing_file_size", "%d too long (maximum %d, %d bytes left in cluster 0)",
				n, MaxBackingFileSize, clusterSize-off)
		}
		copy(buf[off:], h.BackingFile)
		be.PutUint64(buf[8:], uint64(off))
		be.PutUint32(buf[16:], uint32(n))
	}
	if _, err := ParseHeader(buf, -1); err != nil {
		return nil, err
	}
	return buf, nil
}

// marshalFeatureTable returns the feature name table payload Marshal writes.
func (h *Header) marshalFeatureTable() []byte {
	var t []FeatureName
	std := DefaultFeatureTable()
	if h.ClusterSize() > 4096 {
		t = std
	}
	for _, f := range h.FeatureTable {
		known := false
		for _, s := range std {
			if s.Type == f.Type && s.Bit == f.Bit {
				known = true
				break
			}
		}
		if !known && f.Name != "" && f.Bit <= 63 && f.Type <= FeatureAutoclear {
			t = append(t, f)
		}
	}
	out := make([]byte, featureEntrySize*len(t))
	for i, f := range t {
		e := out[i*featureEntrySize:]
		e[0] = byte(f.Type)
		e[1] = f.Bit
		copy(e[2:2+featureNameSize], f.Name)
	}
	return out
}
