package jobs

import (
	"sync/atomic"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// filter is the driver of the filter nodes jobs insert above the device's
// image: before is called ahead of every write, write-zeroes and discard
// (copy-before-write), after once it ended, successfully or not (dirty
// tracking). Either may be nil. Reads and flushes go straight through.
type filter struct {
	child  *bdrv.Node
	before func(co *coroutine.Co, off, bytes int64)
	after  func(off, bytes int64)
	// owns is set while the device serves through the filter: if the
	// device closes then (its server stops during the job), closing the
	// filter closes the image below. The job clears it when it takes the
	// filter out, and closes nothing.
	owns atomic.Bool
}

// insertFilter makes the device serve through a new filter above its image
// child; the device must be paused.
func insertFilter(dev Device, name string, f *filter) *bdrv.Node {
	f.owns.Store(true)
	n := bdrv.NewFilter(name, f.child, f)
	dev.SetNode(n)
	return n
}

// removeFilter makes the device serve the filter's child again; the device
// must be paused.
func removeFilter(dev Device, f *filter) {
	dev.SetNode(f.child)
	f.owns.Store(false)
}

func (f *filter) FilteredChild() *bdrv.Node { return f.child }

func (f *filter) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	return f.child.Preadv(co, off, iov, flags)
}

func (f *filter) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	n := iov.Len()
	f.hookBefore(co, off, n)
	err := f.child.Pwritev(co, off, iov, flags)
	f.hookAfter(off, n)
	return err
}

func (f *filter) PwriteZeroes(co *coroutine.Co, off, bytes int64, flags bdrv.ReqFlags) error {
	f.hookBefore(co, off, bytes)
	err := f.child.PwriteZeroes(co, off, bytes, flags)
	f.hookAfter(off, bytes)
	return err
}

func (f *filter) Pdiscard(co *coroutine.Co, off, bytes int64) error {
	f.hookBefore(co, off, bytes)
	err := f.child.Pdiscard(co, off, bytes)
	f.hookAfter(off, bytes)
	return err
}

func (f *filter) hookBefore(co *coroutine.Co, off, bytes int64) {
	if f.before != nil {
		f.before(co, off, bytes)
	}
}

func (f *filter) hookAfter(off, bytes int64) {
	if f.after != nil {
		f.after(off, bytes)
	}
}

func (f *filter) Flush(co *coroutine.Co) error { return f.child.Flush(co) }

func (f *filter) Close(co *coroutine.Co) error {
	if f.owns.Load() {
		return f.child.Close(co)
	}
	return nil
}

// bitset is a set of granules of an image, safe for concurrent use (the
// filters mark it from the queues' loops while the job reads and clears
// it).
type bitset struct {
	gran  int64 // bytes per bit, a power of two
	size  int64 // bytes covered
	n     int64 // bits
	words []atomic.Uint64
}

func newBitset(size, gran int64) *bitset {
	n := (size + gran - 1) / gran
	return &bitset{gran: gran, size: size, n: n, words: make([]atomic.Uint64, (n+63)/64)}
}

func (b *bitset) set(i int64)   { b.words[i/64].Or(1 << (i % 64)) }
func (b *bitset) clear(i int64) { b.words[i/64].And(^(uint64(1) << (i % 64))) }
func (b *bitset) test(i int64) bool {
	return b.words[i/64].Load()&(1<<(i%64)) != 0
}

// setBytes sets the granules that [off, off+bytes) touches.
func (b *bitset) setBytes(off, bytes int64) {
	if bytes <= 0 || off >= b.size {
		return
	}
	last := min(off+bytes-1, b.size-1) / b.gran
	for i := off / b.gran; i <= last; i++ {
		if !b.test(i) {
			b.set(i)
		}
	}
}

// setAll sets every granule.
func (b *bitset) setAll() {
	for i := range b.n {
		b.set(i)
	}
}

// next returns the first set granule at or after i, or -1.
func (b *bitset) next(i int64) int64 {
	for i < b.n {
		w := b.words[i/64].Load() >> (i % 64)
		if w == 0 {
			i = (i/64 + 1) * 64
			continue
		}
		for w&1 == 0 {
			w >>= 1
			i++
		}
		return i
	}
	return -1
}

// count returns the number of set granules.
func (b *bitset) count() int64 {
	var c int64
	for i := range b.words {
		w := b.words[i].Load()
		for w != 0 {
			w &= w - 1
			c++
		}
	}
	return c
}

// span returns the bytes of granules [i, j), clipped to the image.
func (b *bitset) span(i, j int64) (off, bytes int64) {
	off = i * b.gran
	return off, min(j*b.gran, b.size) - off
}

// isZero reports whether buf holds only zeros.
func isZero(buf []byte) bool {
	for len(buf) >= 8 {
		if buf[0]|buf[1]|buf[2]|buf[3]|buf[4]|buf[5]|buf[6]|buf[7] != 0 {
			return false
		}
		buf = buf[8:]
	}
	for _, c := range buf {
		if c != 0 {
			return false
		}
	}
	return true
}
