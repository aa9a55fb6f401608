package bdrv

import (
	"errors"

	"ublkimg/coroutine"
)

// The data the image capabilities of driver.go exchange with the verbs.

// DirtyBitmap describes a persistent dirty bitmap of an open image.
type DirtyBitmap struct {
	Name string
	// Granularity is the bytes one bit stands for.
	Granularity uint64
	// Enabled bitmaps track writes.
	Enabled bool
	// Inconsistent: the bitmap was not stored cleanly (in use on disk);
	// it cannot be used, only removed.
	Inconsistent bool
}

// BitmapData is a dirty bitmap's content detached from its image: a view,
// valid until the bitmap next changes (PersistentBitmaps.ExportBitmap), or
// a copy that stays valid (TakeBitmap), for merging into a bitmap of the
// same or of another image.
type BitmapData interface {
	// Size is the disk bytes the bitmap covers.
	Size() uint64
	// Granularity is the bytes one bit stands for, a power of two.
	Granularity() uint64
	// NextDirty returns the first dirty range at or after off (QEMU's
	// bdrv_dirty_bitmap_next_dirty_area): its start and length in bytes,
	// whole granules clipped to [off, Size()); length 0 when there is
	// none.
	NextDirty(off uint64) (start, length uint64)
}

// ErrBitmapsLost is matched by the error Close returns when persistent
// bitmaps could not be stored (QEMU's "Lost persistent bitmaps" at close):
// they are left in use in the image, the rest of which is fine. qemu-img
// prints it as a warning and succeeds.
var ErrBitmapsLost = errors.New("persistent bitmaps lost")

// AmendControl is what an amend needs from its caller besides the options.
type AmendControl struct {
	// Force allows what QEMU calls unsafe (qemu-img amend --force):
	// overwriting an active key slot, erasing the last ones.
	Force bool
	// Resize changes the virtual size through the node, as QEMU's amend
	// does with blk_truncate; the format calls it where its amend
	// resizes, without its own locks held.
	Resize func(co *coroutine.Co, size int64) error
	// Status, if not nil, receives progress: offset done of total work,
	// in units of the format's choosing (QEMU's amend status callback).
	Status func(offset, total int64)
}

// MeasureFunc computes the size of the file of a new image of its format
// (qemu-img measure, QEMU's bdrv_measure): one created with opts (create
// options, checked against the format's CreateOptions; "size" is the
// virtual size when given) and, when in is not nil, holding in's data
// instead. Errors are the format's, worded as QEMU's.
type MeasureFunc func(co *coroutine.Co, opts Options, in *Node) (*MeasureInfo, error)

// MeasureInfo is qemu-img measure's result (QAPI BlockMeasureInfo).
type MeasureInfo struct {
	// Required is the file size the image needs at least: its metadata
	// plus the data clusters the measured image allocates.
	Required int64
	// FullyAllocated is the file size with every cluster allocated.
	FullyAllocated int64
	// Bitmaps is the space for the persistent bitmaps of the measured
	// image, when both it and the output can have them; nil otherwise.
	Bitmaps *int64
}
