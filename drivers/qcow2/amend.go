package qcow2

import (
	"errors"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// AmendOptions are the qcow2 options qemu-img amend can change in place
// (QEMU's qcow2_amend_options). Zero values leave a property unchanged.
type AmendOptions struct {
	// Version is the new compat level: 2 (compat=0.10) or 3 (compat=1.1).
	Version uint32
	// LazyRefcounts turns lazy refcounts on or off.
	LazyRefcounts *bool
	// RefcountBits is the new refcount width.
	RefcountBits uint32
}

// Errors of Amend, worded as QEMU's.
var (
	ErrAmendLazyV2     = errors.New("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
	ErrAmendRefcountV2 = errors.New("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	ErrAmendRefcountW  = errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	ErrAmendDowngrade  = errors.New("compat=0.10 requires refcount_bits=16")
	// ErrAmendNotImplemented: the change is valid for QEMU but this
	// driver cannot make it yet (downgrade to compat=0.10, refcount width).
	ErrAmendNotImplemented = errors.New("not supported by ublkimg yet")
)

// Amend changes the image's compat level and lazy refcounts setting
// (QEMU's qcow2_amend_options): upgrade first, then lazy refcounts. An
// upgrade from version 2 rewrites the snapshot table (version 3 requires
// the disk size in every entry) and then the header cluster. Turning lazy
// refcounts off writes the refcounts back and clears the dirty bit before
// the compat bit.
func (img *Image) Amend(co *coroutine.Co, o AmendOptions) error {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.checkIO(); err != nil {
		return err
	}
	h := img.Header()
	newVersion := h.Version
	if o.Version != 0 {
		newVersion = o.Version
	}
	if o.LazyRefcounts != nil && *o.LazyRefcounts && newVersion < 3 {
		return ErrAmendLazyV2
	}
	if o.RefcountBits != 0 {
		b := o.RefcountBits
		if b > 64 || b&(b-1) != 0 {
			return ErrAmendRefcountW
		}
		if newVersion < 3 && b != 16 {
			return ErrAmendRefcountV2
		}
	}
	refBits := h.RefcountBits()
	if o.RefcountBits != 0 {
		refBits = o.RefcountBits
	}
	if newVersion < h.Version && refBits != 16 {
		return ErrAmendDowngrade
	}
	if img.readOnly {
		return errors.New("qcow2: image is read-only")
	}
	if newVersion < h.Version {
		return errors.New("Downgrading to compat=0.10 is " + ErrAmendNotImplemented.Error())
	}
	if refBits != h.RefcountBits() {
		return errors.New("Changing the refcount width is " + ErrAmendNotImplemented.Error())
	}
	img.quiesceLocked(co)
	if newVersion > h.Version {
		if err := img.upgradeLocked(co); err != nil {
			return err
		}
	}
	if o.LazyRefcounts != nil {
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
func (img *Image) upgradeLocked(co *coroutine.Co) error {
	need := false
	for _, s := range img.snapshots {
		need = need || s.ExtraDataSize < snapshotExtraV3
	}
	if need {
		if err := img.writeSnapshotsLocked(co, img.snapshots); err != nil {
			return err
		}
	}
	h := img.Header()
	h.Version = 3
	h.RefcountOrder = 4
	buf, err := h.Marshal(int(img.cs))
	if err != nil {
		return err
	}
	out := bdrv.AlignedBuffer(len(buf), 4096)
	copy(out, buf)
	if err := img.file.Pwritev(co, 0, bdrv.IOVec{out}, 0); err != nil {
		return err
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	nh, err := ParseHeader(out, -1)
	if err != nil {
		return err
	}
	img.hdrMu.Lock()
	*img.hdr = *nh
	img.hdrMu.Unlock()
	img.g = nh.Geometry()
	return nil
}
