package bdrv

import (
	"unsafe"

	"ublkimg/coroutine"
)

// padding extends an unaligned request to the node's request alignment.
//
//	start            off                          off+bytes          end
//	  |<--- head --->|<--------- caller's data --------->|<-- tail -->|
//	  |<- align ->|                                       |<- align ->|
//	  [ head block ]          (caller's buffers)          [ tail block ]
//
// The partial blocks at each end live in bounce buffers (head, tail); the
// caller's buffers cover the aligned middle directly. When the whole padded
// range is at most two blocks, one bounce buffer (buf) covers all of it and
// merged is set, which avoids a three-piece vector for small requests.
//
// A request that needs no padding never gets a padding value: callers check
// alignment first, so newPadding always changes something.
type padding struct {
	off, bytes int64 // the caller's request
	start, end int64 // the aligned range
	align      int64
	merged     bool
	buf        []byte // merged bounce buffer for [start, end)
	head, tail []byte // bounce buffers of the partial first and last block
}

func newPadding(off, bytes, align int64) *padding {
	p := &padding{off: off, bytes: bytes, align: align,
		start: alignDown(off, align), end: alignUp(off+bytes, align)}
	if p.end-p.start <= 2*align {
		p.merged = true
		p.buf = AlignedBuffer(int(p.end-p.start), int(max(align, 512)))
		return p
	}
	if off != p.start {
		p.head = AlignedBuffer(int(align), int(max(align, 512)))
	}
	if off+bytes != p.end {
		p.tail = AlignedBuffer(int(align), int(max(align, 512)))
	}
	return p
}

// headLen and tailLen are how many of the caller's bytes fall into the head
// and tail blocks.
func (p *padding) headLen() int64 {
	if p.head == nil {
		return 0
	}
	return p.start + p.align - p.off
}

func (p *padding) tailLen() int64 {
	if p.tail == nil {
		return 0
	}
	return p.off + p.bytes - (p.end - p.align)
}

// vector is the aligned request: bounce buffers around the caller's middle.
func (p *padding) vector(iov IOVec) IOVec {
	if p.merged {
		return IOVec{p.buf}
	}
	h, t := p.headLen(), p.tailLen()
	v := make(IOVec, 0, len(iov)+2)
	if p.head != nil {
		v = append(v, p.head)
	}
	if mid := p.bytes - h - t; mid > 0 {
		v = append(v, iov.Slice(h, mid)...)
	}
	if p.tail != nil {
		v = append(v, p.tail)
	}
	return v
}

// copyOut copies what a padded read fetched into the caller's buffers.
func (p *padding) copyOut(iov IOVec) {
	if p.merged {
		iov.CopyFrom(p.buf[p.off-p.start:p.off-p.start+p.bytes], 0)
		return
	}
	if p.head != nil {
		iov.CopyFrom(p.head[p.off-p.start:], 0)
	}
	if p.tail != nil {
		iov.CopyFrom(p.tail[:p.tailLen()], p.bytes-p.tailLen())
	}
}

// readBlocks reads the current content of the partial blocks before a
// read-modify-write. The caller holds the serialising tracked request.
func (p *padding) readBlocks(co *coroutine.Co, n *Node) error {
	if p.merged {
		return n.alignedPreadv(co, p.start, IOVec{p.buf}, 0)
	}
	if p.head != nil {
		if err := n.alignedPreadv(co, p.start, IOVec{p.head}, 0); err != nil {
			return err
		}
	}
	if p.tail != nil {
		return n.alignedPreadv(co, p.end-p.align, IOVec{p.tail}, 0)
	}
	return nil
}

// copyIn overlays the caller's data on the partial blocks.
func (p *padding) copyIn(iov IOVec) {
	if p.merged {
		iov.CopyTo(p.buf[p.off-p.start:p.off-p.start+p.bytes], 0)
		return
	}
	if p.head != nil {
		iov.CopyTo(p.head[p.off-p.start:], 0)
	}
	if p.tail != nil {
		iov.CopyTo(p.tail[:p.tailLen()], p.bytes-p.tailLen())
	}
}

// zeroIn zeroes the caller's range inside the partial blocks.
func (p *padding) zeroIn() {
	if p.merged {
		clear(p.buf[p.off-p.start : p.off-p.start+p.bytes])
		return
	}
	if p.head != nil {
		clear(p.head[p.off-p.start:])
	}
	if p.tail != nil {
		clear(p.tail[:p.tailLen()])
	}
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
