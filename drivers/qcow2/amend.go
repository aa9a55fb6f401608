package qcow2

import (
	"errors"
	"fmt"
	"math/bits"

	"ublkimg/coroutine"
	"ublkimg/drivers/lukscrypto"
)

// AmendOptions are the qcow2 options qemu-img amend can change in place
// (QEMU's qcow2_amend_options). Zero values leave a property unchanged.
type AmendOptions struct {
	// Version is the new compat level: 2 (compat=0.10) or 3 (compat=1.1).
	Version uint32
	// LazyRefcounts turns lazy refcounts on or off.
	LazyRefcounts *bool
	// RefcountBits is the new refcount width: 1, 2, 4, 8, 16, 32 or 64
	// (anything else is refused with ErrAmendRefcountW; widths other than
	// 16 need version 3).
	RefcountBits uint32
	// BackingFile and BackingFormat, when set, must equal what the image
	// records (nil for nothing recorded): amend cannot change them.
	BackingFile, BackingFormat *string
	// DataFile renames the external data file ("" removes the name from
	// the header); only for images that have one.
	DataFile *string
	// DataFileRaw clears the data_file_raw bit (false) or keeps it (true
	// is refused unless the bit is already set).
	DataFileRaw *bool
	// Resize, if not nil, is called where QEMU resizes the image: after
	// the lazy refcounts change, before a downgrade. It is called without
	// the metadata lock (it resizes through the node).
	Resize func(co *coroutine.Co) error
	// Encrypt, if not nil, changes LUKS key slots (encrypt.* options);
	// it is applied after an upgrade, before a refcount width change.
	Encrypt *lukscrypto.AmendOptions
	// Status, if not nil, receives progress as QEMU's amend status
	// callback: offset done of total work, in arbitrary units.
	Status func(offset, total int64)
}

// Errors of Amend, worded as QEMU's.
var (
	ErrAmendLazyV2      = errors.New("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
	ErrAmendRefcountV2  = errors.New("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	ErrAmendRefcountW   = errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	ErrAmendDowngrade   = errors.New("compat=0.10 requires refcount_bits=16")
	ErrAmendBacking     = errors.New("Cannot amend the backing file")
	ErrAmendDataFile    = errors.New("data-file can only be set for images that use an external data file")
	ErrAmendDataFileRaw = errors.New("data-file-raw cannot be set on existing images")
	// ErrAmendNotImplemented: the change is valid for QEMU but this
	// driver cannot make it yet (downgrades of images with zstd, or with
	// a backing file and unallocated zero clusters).
	ErrAmendNotImplemented = errors.New("not supported by ublkimg yet")
)

// Operations of an amend, for progress (QEMU's Qcow2AmendOperation).
const (
	amendUpgrade = 1 + iota
	amendEncryption
	amendRefcountOrder
	amendDowngrade
)

// AmendWith changes the image's options in QEMU's order (qcow2_amend_options),
// so that a combination fails at the same step, with the same changes
// already made: the option values are checked first (data_file,
// data_file_raw, refcount width); then come the upgrade, the LUKS key
// slot change (encrypt.*), the refcount width (changeRefcountOrderLocked), the data file name and raw bit, the
// backing file check, lazy refcounts, the resize and last the downgrade
// (downgradeLocked), which turns lazy refcounts off. An upgrade from
// version 2 rewrites the snapshot table (version 3 requires the disk size
// in every entry) and then the header cluster. Turning lazy refcounts off
// writes the refcounts back and clears the dirty bit before the compat
// bit. After a refcount width change the driver's refcount table, cache
// and geometry are the new ones: the image stays usable.
func (img *Image) AmendWith(co *coroutine.Co, o AmendOptions) error {
	if img.readOnly {
		return errors.New("qcow2: image is read-only")
	}
	img.meta.Lock(co)
	h := img.Header()
	newVersion := h.Version
	if o.Version != 0 {
		newVersion = o.Version
	}
	st := &amendStatus{cb: o.Status}
	if newVersion != h.Version {
		st.total++
	}
	if o.RefcountBits != 0 && o.RefcountBits != h.RefcountBits() {
		st.total++
	}
	if o.Encrypt != nil {
		st.total++
	}
	err := img.amendLocked(co, o, newVersion, st)
	img.meta.Unlock(co)
	if err != nil {
		return err
	}
	if o.Resize != nil {
		if err := o.Resize(co); err != nil {
			return err
		}
	}
	if newVersion >= h.Version {
		return nil
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.checkIO(); err != nil {
		return err
	}
	img.quiesceLocked(co)
	st.start(amendDowngrade)
	return img.downgradeLocked(co, st)
}

// amendLocked is Amend up to the resize. Called with img.meta held.
func (img *Image) amendLocked(co *coroutine.Co, o AmendOptions, newVersion uint32, st *amendStatus) error {
	if err := img.checkIO(); err != nil {
		return err
	}
	h := img.Header()
	if o.Encrypt != nil {
		if err := img.checkAmendCrypto(); err != nil {
			return err
		}
	}
	if o.DataFile != nil && !h.HasDataFile() {
		return ErrAmendDataFile
	}
	if o.DataFileRaw != nil && *o.DataFileRaw && !h.DataFileRaw() {
		return ErrAmendDataFileRaw
	}
	if b := o.RefcountBits; b != 0 && (b > 64 || b&(b-1) != 0) {
		return ErrAmendRefcountW
	}
	img.quiesceLocked(co)
	if newVersion > h.Version {
		st.start(amendUpgrade)
		if err := img.upgradeLocked(co, st); err != nil {
			return err
		}
	}
	if o.Encrypt != nil {
		st.start(amendEncryption)
		if err := img.amendCryptoLocked(co, *o.Encrypt); err != nil {
			return err
		}
	}
	if b := o.RefcountBits; b != 0 && b != img.g.RefcountBits() {
		if newVersion < 3 && b != 16 {
			return ErrAmendRefcountV2
		}
		st.start(amendRefcountOrder)
		order := uint32(bits.TrailingZeros32(b))
		if err := img.changeRefcountOrderLocked(co, order, st); err != nil {
			return err
		}
	}
	h = img.Header()
	nh := h
	if o.DataFileRaw != nil && !*o.DataFileRaw {
		nh.AutoclearFeatures &^= AutoclearDataFileRaw
	}
	if o.DataFile != nil {
		nh.DataFile = *o.DataFile
	}
	if nh.AutoclearFeatures != h.AutoclearFeatures || nh.DataFile != h.DataFile {
		if err := img.rewriteHeaderLocked(co, &nh); err != nil {
			return fmt.Errorf("Failed to update the image header: %w", err)
		}
	}
	if o.BackingFile != nil || o.BackingFormat != nil {
		if !sameName(o.BackingFile, h.BackingFile) || !sameName(o.BackingFormat, h.BackingFormat) {
			return ErrAmendBacking
		}
	}
	if o.LazyRefcounts != nil && *o.LazyRefcounts != img.lazy {
		if *o.LazyRefcounts && newVersion < 3 {
			return ErrAmendLazyV2
		}
		h := img.Header()
		f := h.CompatibleFeatures &^ CompatLazyRefcounts
		if *o.LazyRefcounts {
			f |= CompatLazyRefcounts
		} else if err := img.markCleanLocked(co); err != nil {
			return err
		}
		if f != h.CompatibleFeatures {
			if err := img.writeHeaderU64(co, 80, f); err != nil {
				return err
			}
			img.hdrMu.Lock()
			img.hdr.CompatibleFeatures = f
			img.hdrMu.Unlock()
		}
		img.lazy = *o.LazyRefcounts
	}
	return nil
}

// sameName reports whether an amend option names what the header records
// ("" there: nothing, which only an absent option matches).
func sameName(opt *string, recorded string) bool {
	if opt == nil {
		return recorded == ""
	}
	return recorded != "" && *opt == recorded
}

// markCleanLocked writes every deferred refcount back and clears the
// dirty bit (QEMU's qcow2_mark_clean).
func (img *Image) markCleanLocked(co *coroutine.Co) error {
	if !img.dirtyOnDisk {
		return nil
	}
	if err := img.syncAllLocked(co); err != nil {
		return err
	}
	f := img.hdr.IncompatibleFeatures &^ IncompatDirty
	if err := img.writeHeaderU64(co, 72, f); err != nil {
		return err
	}
	img.setFeaturesLocked(f, img.hdr.AutoclearFeatures)
	img.dirtyOnDisk = false
	return nil
}

// upgradeLocked turns a version 2 image into version 3 (QEMU's
// qcow2_upgrade): the snapshot table is rewritten with the extra data
// version 3 requires, then the header cluster.
func (img *Image) upgradeLocked(co *coroutine.Co, st *amendStatus) error {
	st.report(0, 2)
	need := false
	for _, s := range img.snapshots {
		need = need || s.ExtraDataSize < snapshotExtraV3
	}
	if need {
		if err := img.writeSnapshotsLocked(co, img.snapshots); err != nil {
			return err
		}
	}
	st.report(1, 2)
	h := img.Header()
	h.Version = 3
	h.RefcountOrder = 4
	if err := img.rewriteHeaderLocked(co, &h); err != nil {
		return err
	}
	st.report(2, 2)
	return nil
}

// downgradeLocked turns a version 3 image into version 2 (QEMU's
// qcow2_downgrade): refcounts are written back and the dirty bit cleared,
// zero clusters (which version 2 cannot express) are expanded in the active
// and every snapshot's tables, then the version 2 header is written.
// Preallocated zero clusters are filled with zeros; unallocated zero
// clusters become unallocated, which needs an image without a backing file
// (with one, ublkimg refuses: QEMU would allocate zeroed clusters).
func (img *Image) downgradeLocked(co *coroutine.Co, st *amendStatus) error {
	h := img.Header()
	if h.RefcountBits() != 16 {
		return ErrAmendDowngrade
	}
	if h.HasDataFile() {
		return errors.New("Cannot downgrade an image with a data file")
	}
	if err := img.markCleanLocked(co); err != nil {
		return err
	}
	h = img.Header()
	if f := h.IncompatibleFeatures &^ IncompatCompression; f != 0 {
		return fmt.Errorf("Cannot downgrade an image with incompatible features %#x set", f)
	}
	if h.CompressionType != 0 {
		return errors.New("Downgrading an image with zstd compression is " + ErrAmendNotImplemented.Error())
	}
	tables := [][]uint64{img.l1}
	for _, s := range img.snapshots {
		l1, err := img.readSnapshotL1Locked(co, s, 0)
		if err != nil {
			return err
		}
		tables = append(tables, l1)
	}
	if h.BackingFile != "" {
		for _, l1 := range tables {
			n, err := img.expandZeroLocked(co, l1, true, nil)
			if err != nil {
				return err
			}
			if n > 0 {
				return errors.New("Downgrading an image with a backing file and zero clusters is " + ErrAmendNotImplemented.Error())
			}
		}
	}
	// Progress counts L1 entries, as QEMU's qcow2_expand_zero_clusters.
	var visited, entries int64
	for _, l1 := range tables {
		entries += int64(len(l1))
	}
	for _, l1 := range tables {
		visit := func() {
			visited++
			st.report(visited, entries)
		}
		if _, err := img.expandZeroLocked(co, l1, false, visit); err != nil {
			return err
		}
	}
	if err := img.syncAllLocked(co); err != nil {
		return err
	}
	h.Version, h.RefcountOrder = 2, 4
	h.IncompatibleFeatures, h.CompatibleFeatures, h.AutoclearFeatures = 0, 0, 0
	h.HeaderTail, h.FeatureTable, h.Bitmaps = nil, nil, nil
	if err := img.rewriteHeaderLocked(co, &h); err != nil {
		return err
	}
	img.lazy = false
	return nil
}

// expandZeroLocked rewrites the zero clusters the L2 tables of l1 map, or
// with scan only counts the unallocated ones. Zeroed data reaches the disk
// before the L2 entries that expose it. visited, if not nil, is called
// after each L1 entry.
func (img *Image) expandZeroLocked(co *coroutine.Co, l1 []uint64, scan bool, visited func()) (int, error) {
	g, cs := img.g, img.cs
	count := 0
	for i := range l1 {
		l2Off, _, err := g.DecodeL1(l1[i], img.l1Offset, int64(i))
		if err != nil {
			return count, img.asCorruptionLocked(co, err)
		}
		if l2Off == 0 {
			if visited != nil {
				visited()
			}
			continue
		}
		for s := uint64(0); s < cs/img.l2SliceSize; s++ {
			e, err := img.l2Cache.getLocked(co, l2Off+s*img.l2SliceSize)
			if err != nil {
				return count, err
			}
			for j := 0; j < int(img.l2SliceEnts); j++ {
				ent, bm, _ := g.L2EntryAt(e.buf, j)
				var ne uint64
				switch g.ClusterType(ent) {
				case ClusterZeroPlain:
					count++
					ne = 0
				case ClusterZeroAlloc:
					hc := HostOffset(ent)
					if scan {
						continue
					}
					err = img.checkOverlapLocked(co, hc, cs, mkNone)
					if err == nil {
						err = img.file.PwriteZeroes(co, int64(hc), int64(cs), 0)
					}
					if err != nil {
						img.l2Cache.putLocked(e)
						return count, err
					}
					ne = hc | ent&OflagCopied
				default:
					continue
				}
				if !scan {
					g.SetL2EntryAt(e.buf, j, ne, bm)
					img.l2Cache.markDirtyLocked(e)
					img.l2Cache.setDependsOnFlushLocked()
				}
			}
			img.l2Cache.putLocked(e)
		}
		if visited != nil {
			visited()
		}
	}
	return count, nil
}

// rewriteHeaderLocked writes h as the header cluster, flushes, and adopts
// it as the image's header.
func (img *Image) rewriteHeaderLocked(co *coroutine.Co, h *Header) error {
	nh, err := img.writeHeaderClusterLocked(co, h)
	if err != nil {
		return err
	}
	img.hdrMu.Lock()
	*img.hdr = *nh
	img.hdrMu.Unlock()
	img.g = nh.Geometry()
	return nil
}
