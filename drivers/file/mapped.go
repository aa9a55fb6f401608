package file

import (
	"math/bits"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Reads of files in tmpfs straight from their pages (bdrv.Mapper).
//
// A ublk device's read of a raw image in tmpfs costs two copies when it
// goes through a buffer: pread from the file's pages into the buffer, then
// from the buffer into the request's pages. With UBLK_F_USER_COPY the
// server hands the request its data from any memory of its own; when that
// memory is the file itself, mapped, the data is copied once, and the
// pread goes away. The driver maps such a file read-only, whole, on the
// first MappedRange, and hands out ranges of the mapping.
//
// A read fault in a tmpfs hole allocates a page (read(2) copies the zero
// page instead), so a scan of a sparse image through the mapping would
// fill the image with memory. MappedRange therefore hands out only pages
// it knows hold data: a bitmap filled by SEEK_HOLE (one lseek learns a
// whole extent) and by the driver's writes, and cleared where the driver
// punches holes or shrinks the file. Holes punched by another process
// leave stale bits: reads of them then allocate pages again, which costs
// memory and never returns wrong data.
//
// The mapping is unmapped only at Close, when no request is in flight: a
// shrink lowers the usable length, and a copy from the mapping that a
// concurrent truncation outran fails with EFAULT (the kernel's copy, never
// a signal), after which the caller reads as usual.

// maxMapped bounds the files mapped: the bitmap takes one bit per page
// (2 MiB of bitmap for 64 GiB of file).
const maxMapped = 64 << 30

var pageShift = uint(bits.TrailingZeros(uint(os.Getpagesize())))

// mapping is a file mapped for MappedRange.
type mapping struct {
	mem []byte // PROT_READ, MAP_SHARED: the file's first len(mem) bytes
	// data has a bit per page of mem, set when the page is known to hold
	// data (not a hole).
	data []atomic.Uint64
	// limit is the usable length of mem: the file's length, once it
	// shrank.
	limit atomic.Int64
}

// mapState is the driver's lazily made mapping.
type mapState struct {
	mu    sync.Mutex
	tried bool // the mapping was attempted (guarded by mu)
	m     atomic.Pointer[mapping]
}

// MappedRange implements bdrv.Mapper: on tmpfs, the file's bytes
// [off, off+bytes) as mapped memory when every page of the range is known
// to hold data; nil otherwise (another file system, a hole, beyond the
// mapped length), and the caller reads with Preadv. The memory is the
// page cache itself: a write to the file shows in it at once.
func (d *driver) MappedRange(off, bytes int64) []byte {
	if !d.mappable {
		return nil
	}
	m := d.maps.m.Load()
	if m == nil {
		if m = d.mapFile(); m == nil {
			return nil
		}
	}
	end := off + bytes
	if off < 0 || bytes <= 0 || end > m.limit.Load() {
		return nil
	}
	first, last := off>>pageShift, (end-1)>>pageShift
	if !m.known(first, last) {
		hole, err := unix.Seek(d.fd, off, unix.SEEK_HOLE)
		if err != nil || hole < end {
			return nil
		}
		// The whole extent up to the hole (or the end of the file) is
		// data; only pages the mapping covers have bits.
		m.mark(first, min(hole-1, int64(len(m.mem))-1)>>pageShift)
	}
	return m.mem[off:end:end]
}

// Mappable implements bdrv.Mapper: a file in tmpfs, not empty, not larger
// than maxMapped.
func (d *driver) Mappable() bool {
	size := d.node.Length()
	return d.mappable && size > 0 && size <= maxMapped
}

// mapFile maps the file once, at its current length; nil if it cannot be
// mapped (empty, too large, or mmap failed: reads then take the usual
// path, which is always correct).
func (d *driver) mapFile() *mapping {
	d.maps.mu.Lock()
	defer d.maps.mu.Unlock()
	if d.maps.tried {
		return d.maps.m.Load()
	}
	d.maps.tried = true
	size := d.node.Length()
	if !d.Mappable() || d.fd < 0 {
		return nil
	}
	mem, err := unix.Mmap(d.fd, 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil
	}
	pages := (size + 1<<pageShift - 1) >> pageShift
	m := &mapping{mem: mem, data: make([]atomic.Uint64, (pages+63)/64)}
	m.limit.Store(size)
	d.maps.m.Store(m)
	return m
}

// unmapFile releases the mapping at Close.
func (d *driver) unmapFile() error {
	m := d.maps.m.Swap(nil)
	if m == nil {
		return nil
	}
	return unix.Munmap(m.mem)
}

// wrote records that a write reached [off, off+bytes): tmpfs allocated
// every page the range touches.
func (d *driver) wrote(off, bytes int64) {
	if m := d.maps.m.Load(); m != nil && bytes > 0 {
		first, last := off>>pageShift, (off+bytes-1)>>pageShift
		m.mark(first, min(last, int64(len(m.data))*64-1))
	}
}

// punched forgets the data of every page touching [off, off+bytes): the
// driver punched a hole there (pages the hole only partly covers may
// still hold data; forgetting them only costs an lseek).
func (d *driver) punched(off, bytes int64) {
	if m := d.maps.m.Load(); m != nil && bytes > 0 {
		m.forget(off>>pageShift, (off+bytes-1)>>pageShift)
	}
}

// resized follows a change of the file's length from cur to size.
func (d *driver) resized(cur, size int64) {
	m := d.maps.m.Load()
	if m == nil {
		return
	}
	if size < cur {
		m.forget(size>>pageShift, (cur-1)>>pageShift)
	}
	m.limit.Store(min(size, int64(len(m.mem))))
}

// known reports whether pages first to last are all known to hold data.
func (m *mapping) known(first, last int64) bool {
	for w := first / 64; w <= last/64; w++ {
		want := wordMask(w, first, last)
		if m.data[w].Load()&want != want {
			return false
		}
	}
	return true
}

// mark sets the bits of pages first to last (clipped to the bitmap).
func (m *mapping) mark(first, last int64) {
	last = min(last, int64(len(m.data))*64-1)
	for w := first / 64; w <= last/64; w++ {
		m.data[w].Or(wordMask(w, first, last))
	}
}

// forget clears the bits of pages first to last (clipped to the bitmap).
func (m *mapping) forget(first, last int64) {
	last = min(last, int64(len(m.data))*64-1)
	for w := first / 64; w <= last/64; w++ {
		m.data[w].And(^wordMask(w, first, last))
	}
}

// wordMask is the bits of word w that pages first to last cover.
func wordMask(w, first, last int64) uint64 {
	lo, hi := max(first-w*64, 0), min(last-w*64, 63)
	if lo > hi {
		return 0
	}
	return (^uint64(0) >> (63 - hi)) &^ (uint64(1)<<lo - 1)
}
