package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Bitmap management (QEMU's block-dirty-bitmap-* commands as qemu-img
// bitmap and convert --bitmaps use them). Changes are made in memory and
// stored when the image is closed, as QEMU stores them. The errors are
// QEMU's messages.

// DirtyBitmap describes a persistent bitmap of an open image.
type DirtyBitmap = bdrv.DirtyBitmap

// BitmapData is a bitmap's content, detached from its image, for merging
// into a bitmap of another image (or back into its own, after
// TakeBitmap): the bdrv.BitmapData of this driver.
type BitmapData struct {
	size uint64 // disk bytes covered
	gran uint8
	bits *bitVec
}

// ErrBitmapInconsistent is matched by errors about a bitmap found in use.
var ErrBitmapInconsistent = errors.New("bitmap inconsistent")

type bitmapError struct {
	msg  string
	kind error
}

func (e *bitmapError) Error() string { return e.msg }
func (e *bitmapError) Unwrap() error { return e.kind }

// inconsistentError is QEMU's message without its hint (use
// block-dirty-bitmap-remove): errors are one line here.
func inconsistentError(name string) error {
	return &bitmapError{fmt.Sprintf("Bitmap '%s' is inconsistent and cannot be used", name), ErrBitmapInconsistent}
}

func notFoundError(name string) error {
	return &bitmapError{fmt.Sprintf("Dirty bitmap '%s' not found", name), unix.ENOENT}
}

// DefaultBitmapGranularity is QEMU's bdrv_get_default_bitmap_granularity:
// the cluster size, kept within 4 KiB..64 KiB.
func (img *Image) DefaultBitmapGranularity() uint64 { return min(max(img.cs, 4096), 65536) }

// SupportsBitmaps reports whether the image can hold persistent bitmaps
// (version 3; QEMU's qcow2_supports_persistent_dirty_bitmap).
func (img *Image) SupportsBitmaps() bool { return img.hdr.Version >= 3 }

// DirtyBitmaps lists the image's persistent bitmaps in directory order
// (bitmaps added since the open last). A read-only image reads them now.
func (img *Image) DirtyBitmaps(co *coroutine.Co) ([]DirtyBitmap, error) {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.loadBitmapsLocked(co); err != nil {
		return nil, err
	}
	var out []DirtyBitmap
	for _, b := range img.bm.list {
		out = append(out, DirtyBitmap{Name: b.Name, Granularity: b.Granularity(), Enabled: b.enabled,
			Inconsistent: b.inconsistent()})
	}
	return out, nil
}

// findBitmapLocked returns the named bitmap or QEMU's "not found" error.
func (img *Image) findBitmapLocked(co *coroutine.Co, name string) (*dirtyBitmap, error) {
	if err := img.loadBitmapsLocked(co); err != nil {
		return nil, err
	}
	for _, b := range img.bm.list {
		if b.Name == name {
			return b, nil
		}
	}
	return nil, notFoundError(name)
}

// usableBitmapLocked returns a bitmap whose data can be used or changed.
func (img *Image) usableBitmapLocked(co *coroutine.Co, name string) (*dirtyBitmap, error) {
	b, err := img.findBitmapLocked(co, name)
	if err != nil {
		return nil, err
	}
	if b.bits == nil {
		return nil, inconsistentError(name)
	}
	return b, nil
}

// AddBitmap adds an empty persistent bitmap (QEMU's block-dirty-bitmap-add
// with persistent=true): granularity 0 takes DefaultBitmapGranularity;
// disabled bitmaps do not track writes.
func (img *Image) AddBitmap(co *coroutine.Co, name string, granularity uint64, disabled bool) error {
	if name == "" {
		return errors.New("Bitmap name cannot be empty")
	}
	if granularity == 0 {
		granularity = img.DefaultBitmapGranularity()
	} else if granularity < 512 || granularity&(granularity-1) != 0 {
		return errors.New("Granularity must be power of 2 and at least 512")
	}
	if img.readOnly {
		return unix.EROFS
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	if err := img.loadBitmapsLocked(co); err != nil {
		return err
	}
	gb := uint8(bits.TrailingZeros64(granularity))
	if err := img.canStoreBitmapLocked(name, gb); err != nil {
		return fmt.Errorf("Can't make bitmap '%s' persistent in '%s': %w", name, img.node.Filename, err)
	}
	if img.bitmapMemoryLocked(img.hdr.Size, true, gb) > maxBitmapMemory {
		return errBitmapMemory
	}
	if slices.ContainsFunc(img.bm.list, func(b *dirtyBitmap) bool { return b.Name == name }) {
		return fmt.Errorf("Bitmap already exists: %s", name)
	}
	b := &dirtyBitmap{
		Bitmap:  Bitmap{Type: BitmapTypeDirtyTracking, GranularityBits: gb, Name: name},
		bits:    newBitVec(bitmapBits(img.hdr.Size, gb)),
		enabled: !disabled,
		stale:   true,
	}
	img.bm.list = append(img.bm.list, b)
	img.bm.changed = true
	img.publishTrackingLocked()
	return nil
}

// bitmapConstraints is QEMU's check_constraints_on_bitmap: can a bitmap
// of granularity 1<<gb named name be stored for a disk of size bytes.
func (img *Image) bitmapConstraints(size uint64, gb uint8, name string) error {
	switch {
	case gb > MaxBitmapGranularity:
		return fmt.Errorf("Granularity exceeds maximum (%d bytes)", uint64(1)<<MaxBitmapGranularity)
	case gb < MinBitmapGranularity:
		return fmt.Errorf("Granularity is under minimum (%d bytes)", uint64(1)<<MinBitmapGranularity)
	case (bitmapBits(size, gb)+7)/8 > min(maxBitmapPhysSize, MaxBitmapTableEntries*img.cs):
		return errors.New("Too much space will be occupied by the bitmap. Use larger granularity")
	case len(name) > MaxBitmapNameSize:
		return fmt.Errorf("Name length exceeds maximum (%d characters)", MaxBitmapNameSize)
	}
	return nil
}

// canStoreBitmapLocked is QEMU's qcow2_co_can_store_new_dirty_bitmap.
func (img *Image) canStoreBitmapLocked(name string, gb uint8) error {
	if img.hdr.Version < 3 {
		return errors.New("Cannot store dirty bitmaps in qcow2 v2 files")
	}
	if err := img.bitmapConstraints(img.hdr.Size, gb, name); err != nil {
		return err
	}
	if len(img.bm.list) >= MaxBitmaps {
		return errors.New("Maximum number of persistent bitmaps is already reached")
	}
	dirSize := uint64(0)
	for _, b := range img.bm.list {
		dirSize += roundUp8(uint64(bitmapEntryFixed + len(b.ExtraData) + len(b.Name)))
	}
	if dirSize+roundUp8(uint64(bitmapEntryFixed+len(name))) > MaxBitmapDirectorySize {
		return errors.New("Not enough space in the bitmap directory")
	}
	return nil
}

// RemoveBitmap removes a bitmap, inconsistent ones included (QEMU's
// block-dirty-bitmap-remove); its clusters are freed when the new
// directory is stored.
func (img *Image) RemoveBitmap(co *coroutine.Co, name string) error {
	if img.readOnly {
		return unix.EROFS
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	b, err := img.findBitmapLocked(co, name)
	if err != nil {
		return err
	}
	if b.TableOffset != 0 {
		if b.table == nil {
			if b.table, err = img.readBitmapTableLocked(co, b); err != nil {
				return fmt.Errorf("qcow2: reading the table of bitmap '%s': %w", name, err)
			}
		}
		img.bm.removed = append(img.bm.removed, b)
	}
	img.bm.list = slices.DeleteFunc(img.bm.list, func(x *dirtyBitmap) bool { return x == b })
	img.bm.changed = true
	img.publishTrackingLocked()
	return nil
}

// ClearBitmap clears every bit (QEMU's block-dirty-bitmap-clear).
func (img *Image) ClearBitmap(co *coroutine.Co, name string) error {
	return img.changeBitmap(co, name, func(b *dirtyBitmap) error { b.bits.reset(); return nil })
}

// SetBitmapEnabled enables or disables a bitmap (QEMU's
// block-dirty-bitmap-enable and -disable).
func (img *Image) SetBitmapEnabled(co *coroutine.Co, name string, enabled bool) error {
	return img.changeBitmap(co, name, func(b *dirtyBitmap) error { b.enabled = enabled; return nil })
}

// CheckBitmap reports whether the named bitmap exists and can be used,
// with the error QEMU gives when it cannot.
func (img *Image) CheckBitmap(co *coroutine.Co, name string) error {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	_, err := img.usableBitmapLocked(co, name)
	return err
}

// changeBitmap applies fn to a usable bitmap and has it stored at close.
func (img *Image) changeBitmap(co *coroutine.Co, name string, fn func(b *dirtyBitmap) error) error {
	if img.readOnly {
		return unix.EROFS
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	b, err := img.usableBitmapLocked(co, name)
	if err != nil {
		return err
	}
	// The copy on disk is about to be outdated: in use first.
	if err := img.markBitmapsInUseLocked(co, []*dirtyBitmap{b}); err != nil {
		return err
	}
	if err := fn(b); err != nil {
		return err
	}
	img.bm.changed = true
	img.publishTrackingLocked()
	return nil
}

// ExportBitmap returns a usable bitmap's content: a view, not a copy (a
// copy of a 512 MiB bitmap would double what the cap counts), valid
// until the bitmap next changes; merge it right away.
func (img *Image) ExportBitmap(co *coroutine.Co, name string) (bdrv.BitmapData, error) {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	b, err := img.usableBitmapLocked(co, name)
	if err != nil {
		return nil, err
	}
	return &BitmapData{size: img.hdr.Size, gran: b.GranularityBits, bits: b.bits}, nil
}

// TakeBitmap returns a usable bitmap's content and clears the bitmap, in
// one step under the metadata lock (a backup's point in time). The
// content moves: the bitmap's chunks go to the returned copy and the
// bitmap starts again with none, so taking costs no copy and no memory
// beyond what the bitmap held. A write that marks a chunk while it moves
// sets its bit in the copy or in the bitmap, never in neither; the caller
// pauses the writers to make the step a point in time between requests.
func (img *Image) TakeBitmap(co *coroutine.Co, name string) (bdrv.BitmapData, error) {
	var taken *BitmapData
	err := img.changeBitmap(co, name, func(b *dirtyBitmap) error {
		v := newBitVec(b.bits.n)
		for i := range b.bits.chunks {
			v.chunks[i].Store(b.bits.chunks[i].Swap(nil))
		}
		taken = &BitmapData{size: img.hdr.Size, gran: b.GranularityBits, bits: v}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return taken, nil
}

// MergeBitmap sets in bitmap dst every granule that touches a granule set
// in src (QEMU's block-dirty-bitmap-merge): both must cover the same disk
// size; their granularities may differ. A bitmap of this driver merges
// word by word, any other by its dirty ranges.
func (img *Image) MergeBitmap(co *coroutine.Co, dst string, src bdrv.BitmapData) error {
	return img.changeBitmap(co, dst, func(b *dirtyBitmap) error {
		if src.Size() != img.hdr.Size {
			return fmt.Errorf("Bitmaps are of different sizes (destination size is %d, source size is %d) and can't be merged", img.hdr.Size, src.Size())
		}
		if s, ok := src.(*BitmapData); ok {
			b.bits.mergeFrom(b.GranularityBits, s.bits, s.gran)
			return nil
		}
		for off := uint64(0); ; {
			start, n := src.NextDirty(off)
			if n == 0 {
				return nil
			}
			b.bits.setRange(start>>b.GranularityBits, (start+n-1)>>b.GranularityBits)
			off = start + n
		}
	})
}

// Granularity is the bytes one bit covers.
func (d *BitmapData) Granularity() uint64 { return 1 << d.gran }

// Size is the disk bytes the bitmap covers.
func (d *BitmapData) Size() uint64 { return d.size }

// NextDirty returns the first dirty range at or after off, whole granules
// clipped to [off, Size()); length 0 when there is none.
func (d *BitmapData) NextDirty(off uint64) (start, length uint64) {
	if off >= d.size {
		return 0, 0
	}
	i := d.bits.nextSet(off >> d.gran)
	if i >= d.bits.n {
		return 0, 0
	}
	start = max(off, i<<d.gran)
	end := min(d.bits.nextClear(i)<<d.gran, d.size)
	return start, end - start
}
