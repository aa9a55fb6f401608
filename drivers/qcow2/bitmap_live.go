package qcow2

import (
	"fmt"
	"math/bits"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Bitmaps as the live jobs use them (bdrv.PersistentBitmaps): a backup
// takes a bitmap's content and clears it at its point in time, and gives
// it back when it fails.

// TakeBitmap returns the content of a usable bitmap, in the on-disk order
// (bit i of byte j is granule 8j+i, granules of the returned size), and
// clears it, in one step under the metadata lock: a write that completes
// after it is in the cleared bitmap, one before it in the content. The
// caller pauses the image's writers around it to make that a point in
// time.
func (img *Image) TakeBitmap(co *coroutine.Co, name string) (granularity uint64, data []byte, err error) {
	err = img.changeBitmap(co, name, func(b *dirtyBitmap) error {
		granularity = b.Granularity()
		buf := make([]byte, (b.bits.n+63)/64*8)
		b.bits.serialize(0, buf)
		data = buf[:(b.bits.n+7)/8]
		b.bits.reset()
		return nil
	})
	return granularity, data, err
}

// MergeBitmapBits sets in bitmap name every granule that touches a granule
// set in data (as TakeBitmap returns it, granules of granularity bytes,
// covering the image's size).
func (img *Image) MergeBitmapBits(co *coroutine.Co, name string, granularity uint64, data []byte) error {
	if granularity < 512 || granularity&(granularity-1) != 0 {
		return fmt.Errorf("invalid bitmap granularity %d", granularity)
	}
	return img.changeBitmap(co, name, func(b *dirtyBitmap) error {
		gs := uint8(bits.TrailingZeros64(granularity))
		src := newBitVec(bitmapBits(img.hdr.Size, gs))
		buf := make([]byte, (len(data)+7)/8*8)
		copy(buf, data)
		src.deserialize(0, buf)
		b.bits.mergeFrom(b.GranularityBits, src, gs)
		return nil
	})
}

var _ bdrv.PersistentBitmaps = (*Image)(nil)
