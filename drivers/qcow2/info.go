package qcow2

import (
	"fmt"

	"ublkimg/coroutine"
	"ublkimg/drivers/lukscrypto"
)

// What qemu-img info reports about a qcow2 image (QEMU's qcow2_get_info and
// qcow2_get_specific_info): the methods are bdrv's capabilities
// ClusterSizer, DirtyReporter, EncryptionReporter and InfoProvider. They
// read the header as it is on disk and, for bitmaps, the bitmap directory;
// they change nothing.

// ClusterSize returns the cluster size in bytes ("cluster_size: 65536").
func (img *Image) ClusterSize() int64 { return int64(img.cs) }

// IsDirty reports the dirty bit ("cleanly shut down: no").
func (img *Image) IsDirty() bool {
	h := img.Header()
	return h.Dirty()
}

// IsEncrypted reports whether the image is encrypted ("encrypted: yes").
func (img *Image) IsEncrypted() bool {
	h := img.Header()
	return h.CryptMethod != CryptNone
}

// SpecificInfo is the "Format specific information" of a qcow2 image, QEMU's
// QAPI ImageInfoSpecificQCow2: the json tags are QEMU's member names, in
// schema order; nil pointers are members QEMU leaves out (version 2 images
// have no feature members, images without a data file no data-file ones).
type SpecificInfo struct {
	Compat          string       `json:"compat"`
	DataFile        *string      `json:"data-file"`
	DataFileRaw     *bool        `json:"data-file-raw"`
	ExtendedL2      *bool        `json:"extended-l2"`
	LazyRefcounts   *bool        `json:"lazy-refcounts"`
	Corrupt         *bool        `json:"corrupt"`
	RefcountBits    int64        `json:"refcount-bits"`
	Encrypt         *EncryptInfo `json:"encrypt"`
	Bitmaps         []BitmapInfo `json:"bitmaps,omitempty"`
	CompressionType string       `json:"compression-type"`
}

// EncryptInfo is the "encrypt" member of an encrypted image's information
// (QAPI QCryptoBlockInfo): the format, and for LUKS the header's cipher
// and key slots. Offsets are in bytes.
type EncryptInfo struct {
	Format         string     `json:"format"`
	CipherAlg      string     `json:"cipher-alg,omitempty"`
	CipherMode     string     `json:"cipher-mode,omitempty"`
	IVGenAlg       string     `json:"ivgen-alg,omitempty"`
	IVGenHashAlg   string     `json:"ivgen-hash-alg,omitempty"`
	HashAlg        string     `json:"hash-alg,omitempty"`
	PayloadOffset  *int64     `json:"payload-offset"`
	MasterKeyIters *int64     `json:"master-key-iters"`
	UUID           string     `json:"uuid,omitempty"`
	Slots          []SlotInfo `json:"slots,omitempty"`
}

// SlotInfo is one LUKS key slot (QAPI QCryptoBlockInfoLUKSSlot).
type SlotInfo = lukscrypto.SlotInfo

// encryptInfo describes the image's encryption, nil if it has none.
func (img *Image) encryptInfo() *EncryptInfo {
	switch img.hdr.CryptMethod {
	case CryptAES:
		return &EncryptInfo{Format: "aes"}
	case CryptLUKS:
	default:
		return nil
	}
	in := img.crypt.luks.Info()
	num := func(v int64) *int64 { return &v }
	return &EncryptInfo{
		Format: "luks", CipherAlg: in.CipherAlg, CipherMode: in.CipherMode, IVGenAlg: in.IVGenAlg,
		IVGenHashAlg: in.IVGenHashAlg, HashAlg: in.HashAlg, UUID: in.UUID,
		PayloadOffset:  num(in.PayloadOffset),
		MasterKeyIters: num(in.MasterKeyIters),
		Slots:          in.Slots,
	}
}

// BitmapInfo describes one persistent bitmap (QAPI Qcow2BitmapInfo). Flags
// are "in-use" and "auto", in that order.
type BitmapInfo struct {
	Name        string   `json:"name"`
	Granularity int64    `json:"granularity"`
	Flags       []string `json:"flags"`
}

// FormatSpecific returns the image's SpecificInfo.
func (img *Image) FormatSpecific(co *coroutine.Co) (any, error) {
	h := img.Header()
	info := &SpecificInfo{
		Compat:          "0.10",
		RefcountBits:    int64(h.RefcountBits()),
		CompressionType: "zlib",
	}
	if h.CompressionType == CompressionZstd {
		info.CompressionType = "zstd"
	}
	info.Encrypt = img.encryptInfo()
	if h.Version < 3 {
		return info, nil
	}
	yes := func(b bool) *bool { return &b }
	info.Compat = "1.1"
	info.LazyRefcounts = yes(h.LazyRefcounts())
	info.Corrupt = yes(h.Corrupt())
	info.ExtendedL2 = yes(h.ExtendedL2())
	if h.DataFile != "" {
		name := h.DataFile
		info.DataFile = &name
	}
	if h.HasDataFile() {
		info.DataFileRaw = yes(h.DataFileRaw())
	}
	if h.Bitmaps != nil {
		ext := *h.Bitmaps
		dir, err := img.readFile(co, ext.DirectoryOffset, ext.DirectorySize)
		if err != nil {
			return nil, fmt.Errorf("reading the bitmap directory: %w", err)
		}
		bms, err := ParseBitmapDirectory(dir[:ext.DirectorySize], ext, h.ClusterBits, h.Size)
		if err != nil {
			return nil, err
		}
		for _, b := range bms {
			bi := BitmapInfo{Name: b.Name, Granularity: int64(b.Granularity()), Flags: []string{}}
			if b.InUse() {
				bi.Flags = append(bi.Flags, "in-use")
			}
			if b.Auto() {
				bi.Flags = append(bi.Flags, "auto")
			}
			info.Bitmaps = append(info.Bitmaps, bi)
		}
	}
	return info, nil
}
