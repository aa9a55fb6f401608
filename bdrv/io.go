package bdrv

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"ublkimg/coroutine"
)

// maxLength bounds offsets and lengths so that off+bytes never overflows,
// as QEMU's BDRV_MAX_LENGTH does.
const maxLength = int64(1)<<62 - 1

// maxZeroBuffer is the largest zero buffer the write-zeroes fallback writes
// at once (QEMU: MAX_WRITE_ZEROES_BOUNCE_BUFFER).
const maxZeroBuffer = 16 << 20

func checkRequest(off, bytes int64) error {
	if off < 0 || bytes < 0 || off > maxLength || bytes > maxLength-off {
		return unix.EINVAL
	}
	return nil
}

// beginRequest counts a request in flight for Drain.
func (n *Node) beginRequest() { n.inFlight.Add(1) }

func (n *Node) endRequest(co *coroutine.Co) {
	if n.inFlight.Add(-1) == 0 && n.drainers.Load() > 0 {
		n.drainMu.Lock(co)
		n.drainQ.RestartAll(co)
		n.drainMu.Unlock(co)
	}
}

// Drain waits until no request is in flight on n or any node below it.
// The caller must stop issuing new requests first.
func (n *Node) Drain(co *coroutine.Co) {
	n.drainers.Add(1)
	n.drainMu.Lock(co)
	for n.inFlight.Load() > 0 {
		n.drainQ.Wait(co, &n.drainMu)
	}
	n.drainMu.Unlock(co)
	n.drainers.Add(-1)
	if n.File != nil {
		n.File.Drain(co)
	}
	if n.Backing != nil {
		n.Backing.Drain(co)
	}
}

// Preadv reads iov.Len() bytes at off. Requests at any offset and length are
// accepted; the part beyond the node's end reads as zeros.
func (n *Node) Preadv(co *coroutine.Co, off int64, iov IOVec, flags ReqFlags) error {
	bytes := iov.Len()
	if err := checkRequest(off, bytes); err != nil {
		return err
	}
	if bytes == 0 {
		return nil
	}
	n.beginRequest()
	defer n.endRequest(co)

	align := n.limits.RequestAlignment
	if off%align == 0 && bytes%align == 0 {
		return n.alignedPreadv(co, off, iov, flags)
	}
	p := newPadding(off, bytes, align)
	if err := n.alignedPreadv(co, p.start, p.vector(iov), flags); err != nil {
		return err
	}
	p.copyOut(iov)
	return nil
}

// alignedPreadv reads an aligned range, zero-filling past the end of the
// node and splitting at MaxTransfer.
func (n *Node) alignedPreadv(co *coroutine.Co, off int64, iov IOVec, flags ReqFlags) error {
	bytes := iov.Len()
	total := n.Length()
	if off >= total {
		iov.Zero(0, bytes)
		return nil
	}
	// The last partial block of a node whose length is not aligned is
	// still read whole: drivers accept reads that straddle their end.
	if avail := alignUp(total-off, n.limits.RequestAlignment); bytes > avail {
		iov.Zero(avail, bytes-avail)
		iov = iov.Slice(0, avail)
		bytes = avail
	}
	max := n.limits.MaxTransfer
	if max == 0 || bytes <= max {
		return n.drv.Preadv(co, off, iov, flags)
	}
	for done := int64(0); done < bytes; done += max {
		chunk := min(max, bytes-done)
		if err := n.drv.Preadv(co, off+done, iov.Slice(done, chunk), flags); err != nil {
			return err
		}
	}
	return nil
}

// checkWrite validates a write-like request.
func (n *Node) checkWrite(off, bytes int64) error {
	if err := checkRequest(off, bytes); err != nil {
		return err
	}
	if n.ReadOnly {
		return unix.EROFS
	}
	// Format nodes have a fixed size; protocol nodes grow when written
	// past their end (a format driver allocating at the end of its file).
	if !n.Format.Protocol && off+bytes > n.Length() {
		return unix.EIO
	}
	return nil
}

// Pwritev writes iov at off. Unaligned requests become a serialised
// read-modify-write of the aligned blocks around them; ReqFUA is passed to
// the driver or emulated with a flush.
func (n *Node) Pwritev(co *coroutine.Co, off int64, iov IOVec, flags ReqFlags) error {
	bytes := iov.Len()
	if err := n.checkWrite(off, bytes); err != nil {
		return err
	}
	if bytes == 0 {
		return nil
	}
	return n.write(co, off, bytes, iov, flags&^ReqZeroWrite)
}

// PwriteZeroes makes bytes at off read as zeros: with the driver's
// write-zeroes when it has one, else (unless ReqNoFallback) by writing
// zeros. ReqMayUnmap allows deallocation, except on a child node that
// ignores discards (discard=ignore): as in QEMU, where
// bdrv_co_pwrite_zeroes drops BDRV_REQ_MAY_UNMAP for the node a driver
// writes to, while the graph's user (a BlockBackend) decides for the top.
func (n *Node) PwriteZeroes(co *coroutine.Co, off, bytes int64, flags ReqFlags) error {
	if err := n.checkWrite(off, bytes); err != nil {
		return err
	}
	if bytes == 0 {
		return nil
	}
	if n.child && !n.Unmap {
		flags &^= ReqMayUnmap
	}
	return n.write(co, off, bytes, nil, flags|ReqZeroWrite)
}

// write is the common path of Pwritev and PwriteZeroes (iov is nil for the
// latter): tracking, padding, the aligned write, FUA emulation and the
// bookkeeping every completed write needs.
func (n *Node) write(co *coroutine.Co, off, bytes int64, iov IOVec, flags ReqFlags) error {
	n.beginRequest()
	defer n.endRequest(co)
	if n.Cache.Writethrough() {
		flags |= ReqFUA
	}

	align := n.limits.RequestAlignment
	aligned := off%align == 0 && bytes%align == 0
	var req *trackedReq
	if align > 1 || flags&ReqSerialising != 0 {
		// Unaligned writes are read-modify-write of whole blocks: they
		// must not interleave with any other write to those blocks.
		start, end := off, off+bytes
		serialising := flags&ReqSerialising != 0 || !aligned
		if serialising {
			start, end = alignDown(start, align), alignUp(end, align)
		}
		req = n.tracked.begin(co, start, end, serialising)
		defer n.tracked.end(co, req)
	}

	var err error
	if aligned {
		err = n.alignedWrite(co, off, bytes, iov, flags)
	} else {
		err = n.paddedWrite(co, off, bytes, iov, flags)
	}
	n.writeGen.Add(1)
	if n.tracker != nil {
		n.tracker.WriteDone(off, bytes)
	}
	if n.Format.Protocol && err == nil {
		n.growLength(off + bytes)
	}
	if err == nil && flags&ReqFUA != 0 && n.writeFlags&ReqFUA == 0 {
		err = n.Flush(co)
	}
	return err
}

// paddedWrite does the read-modify-write of an unaligned write: read the
// partial head and tail blocks, overlay the new data (or zeros), write the
// aligned range. Zero writes send their aligned middle as a zero write.
func (n *Node) paddedWrite(co *coroutine.Co, off, bytes int64, iov IOVec, flags ReqFlags) error {
	p := newPadding(off, bytes, n.limits.RequestAlignment)
	if err := p.readBlocks(co, n); err != nil {
		return err
	}
	if flags&ReqZeroWrite == 0 {
		p.copyIn(iov)
		return n.alignedWrite(co, p.start, p.end-p.start, p.vector(iov), flags)
	}
	p.zeroIn()
	if p.merged {
		return n.alignedWrite(co, p.start, p.end-p.start, IOVec{p.buf}, flags&^ReqZeroWrite)
	}
	mid, midEnd := p.start, p.end
	if p.head != nil {
		if err := n.alignedWrite(co, p.start, int64(len(p.head)), IOVec{p.head}, flags&^ReqZeroWrite); err != nil {
			return err
		}
		mid += int64(len(p.head))
	}
	if p.tail != nil {
		midEnd -= int64(len(p.tail))
		if err := n.alignedWrite(co, midEnd, int64(len(p.tail)), IOVec{p.tail}, flags&^ReqZeroWrite); err != nil {
			return err
		}
	}
	if midEnd > mid {
		return n.alignedWrite(co, mid, midEnd-mid, nil, flags)
	}
	return nil
}

// alignedWrite sends an aligned write (or zero write, when iov is nil) to the
// driver, split at its limits. With detect-zeroes, a write of zeros to a
// driver that can write zeroes becomes a zero write, as in QEMU's
// bdrv_aligned_pwritev.
func (n *Node) alignedWrite(co *coroutine.Co, off, bytes int64, iov IOVec, flags ReqFlags) error {
	if n.DetectZeroes != DetectZeroesOff && flags&ReqZeroWrite == 0 && iov.IsZero() {
		if _, ok := n.drv.(ZeroWriter); ok {
			flags |= ReqZeroWrite
			if n.DetectZeroes == DetectZeroesUnmap {
				flags |= ReqMayUnmap
			}
		}
	}
	if flags&ReqZeroWrite != 0 {
		return n.alignedZeroes(co, off, bytes, flags)
	}
	dflags := flags & n.writeFlags
	max := n.limits.MaxTransfer
	if max == 0 || bytes <= max {
		return n.drv.Pwritev(co, off, iov, dflags)
	}
	for done := int64(0); done < bytes; done += max {
		chunk := min(max, bytes-done)
		if err := n.drv.Pwritev(co, off+done, iov.Slice(done, chunk), dflags); err != nil {
			return err
		}
	}
	return nil
}

// alignedZeroes is QEMU's bdrv_co_do_pwrite_zeroes: pieces aligned to the
// driver's write-zeroes alignment go to its ZeroWriter; whatever it cannot
// do becomes writes of a zero buffer unless ReqNoFallback forbids that.
func (n *Node) alignedZeroes(co *coroutine.Co, off, bytes int64, flags ReqFlags) error {
	zw, _ := n.drv.(ZeroWriter)
	zalign := max(n.limits.PwriteZeroesAlignment, n.limits.RequestAlignment)
	maxZ := n.limits.MaxPwriteZeroes
	if maxZ == 0 {
		maxZ = maxLength
	}
	maxZ = alignDown(maxZ, zalign)
	for bytes > 0 {
		num := bytes
		if head := off % zalign; head != 0 {
			// Unaligned head: up to the next zero-alignment boundary.
			num = min(bytes, zalign-head)
		} else if num > zalign {
			num = min(alignDown(num, zalign), maxZ)
		}
		err := ErrNotSupported
		if zw != nil {
			err = zw.PwriteZeroes(co, off, num, flags&(ReqMayUnmap|ReqNoFallback|(ReqFUA&n.writeFlags)))
		}
		if errors.Is(err, ErrNotSupported) && flags&ReqNoFallback == 0 {
			err = n.writeZeroBuffer(co, off, num, flags&^(ReqZeroWrite|ReqMayUnmap))
		}
		if err != nil {
			return err
		}
		off += num
		bytes -= num
	}
	return nil
}

func (n *Node) writeZeroBuffer(co *coroutine.Co, off, bytes int64, flags ReqFlags) error {
	chunkMax := int64(maxZeroBuffer)
	if n.limits.MaxTransfer > 0 {
		chunkMax = min(chunkMax, n.limits.MaxTransfer)
	}
	zeros := zeroBuffer()
	for bytes > 0 {
		chunk := min(bytes, chunkMax)
		var iov IOVec
		for left := chunk; left > 0; {
			k := min(left, int64(len(zeros)))
			iov = append(iov, zeros[:k])
			left -= k
		}
		if err := n.drv.Pwritev(co, off, iov, flags&n.writeFlags); err != nil {
			return err
		}
		off += chunk
		bytes -= chunk
	}
	return nil
}

// zeroBuffer is a shared, never-written buffer of zeros, page aligned so
// O_DIRECT can use it without bouncing.
var zeroBuffer = sync.OnceValue(func() []byte { return AlignedBuffer(1<<20, 4096) })

// AlignedBuffer allocates a zeroed buffer of n bytes whose address is a
// multiple of align (a power of two), for O_DIRECT.
func AlignedBuffer(n, align int) []byte {
	b := make([]byte, n+align)
	skip := 0
	if r := int(uintptrOf(b) & uintptr(align-1)); r != 0 {
		skip = align - r
	}
	return b[skip : skip+n : skip+n]
}

// Pdiscard deallocates the aligned part of [off, off+bytes). Discard is
// advisory: drivers that cannot do it, and nodes that ignore discards
// (discard=ignore), make it a successful no-op.
func (n *Node) Pdiscard(co *coroutine.Co, off, bytes int64) error {
	if err := n.checkWrite(off, bytes); err != nil {
		return err
	}
	d, ok := n.drv.(Discarder)
	if !ok || bytes == 0 || !n.Unmap {
		return nil
	}
	n.beginRequest()
	defer n.endRequest(co)
	align := max(n.limits.PdiscardAlignment, n.limits.RequestAlignment)
	start, end := alignUp(off, align), alignDown(off+bytes, align)
	maxD := n.limits.MaxPdiscard
	if maxD == 0 {
		maxD = maxLength
	}
	maxD = max(alignDown(maxD, align), align)
	defer n.writeGen.Add(1)
	if n.tracker != nil {
		// The whole range, unaligned parts included, as QEMU's
		// bdrv_co_pdiscard marks it.
		defer n.tracker.WriteDone(off, bytes)
	}
	for start < end {
		num := min(end-start, maxD)
		if err := d.Pdiscard(co, start, num); err != nil && !errors.Is(err, ErrNotSupported) {
			return err
		}
		start += num
	}
	return nil
}

// Flush makes every write completed before the call durable: the driver
// writes back its caches, then the node's file child is flushed. A flush is
// skipped when nothing was written since the last one; concurrent flushes
// run one at a time.
func (n *Node) Flush(co *coroutine.Co) error {
	if n.ReadOnly {
		return nil
	}
	n.beginRequest()
	defer n.endRequest(co)
	gen := n.writeGen.Load()
	n.flushMu.Lock(co)
	defer n.flushMu.Unlock(co)
	if n.flushedGen == gen {
		return nil
	}
	// cache=unsafe still writes a format's caches to its file (QEMU's
	// flush_to_os); it only skips the sync of the protocol node.
	if !(n.Format.Protocol && n.Cache.NoFlush()) {
		if err := n.drv.Flush(co); err != nil {
			return err
		}
	}
	if n.File != nil {
		if err := n.File.Flush(co); err != nil {
			return err
		}
	}
	n.flushedGen = gen
	return nil
}

// Truncate resizes the node. Shrinking with preallocation is refused, as in
// QEMU. Growing a node whose open backing file is longer than the node was
// zeroes the new area (ZeroTruncater), as QEMU's bdrv_co_truncate does:
// the backing file's data there must not show through. A node opened
// without its backing file is grown as it is.
func (n *Node) Truncate(co *coroutine.Co, size int64, exact bool, prealloc Prealloc) error {
	if n.ReadOnly {
		return unix.EROFS
	}
	if size < 0 || size > maxLength {
		return unix.EINVAL
	}
	t, ok := n.drv.(Truncater)
	if !ok {
		return ErrNotSupported
	}
	old := n.Length()
	zero := size > old && n.Backing != nil && n.Backing.Length() > old
	zt, canZero := n.drv.(ZeroTruncater)
	if zero && !canZero {
		return fmt.Errorf("Block driver does not support requested flags: %w", unix.ENOTSUP)
	}
	n.beginRequest()
	defer n.endRequest(co)
	defer n.writeGen.Add(1)
	if zero {
		return zt.TruncateZeroed(co, size, exact, prealloc)
	}
	return t.Truncate(co, size, exact, prealloc)
}

// AllocatedSize is the number of host bytes the node uses, or -1 when the
// driver cannot tell.
func (n *Node) AllocatedSize(co *coroutine.Co) int64 {
	if a, ok := n.drv.(AllocatedSizer); ok {
		if s, err := a.AllocatedSize(co); err == nil {
			return s
		}
		return -1
	}
	if n.File != nil {
		return n.File.AllocatedSize(co)
	}
	return -1
}

// HasZeroInit reports whether the node, freshly created, reads as zeros.
func (n *Node) HasZeroInit() bool {
	if z, ok := n.drv.(ZeroIniter); ok {
		return z.HasZeroInit()
	}
	return false
}
