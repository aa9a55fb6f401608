package qcow2

import (
	"encoding/binary"
	"math/bits"
	"sync/atomic"
)

// bitVec is the in-memory form of a dirty bitmap (QEMU's HBitmap, one
// level): bit i stands for granule i. It is allocated in chunks on first
// use, so a clean bitmap of a large disk costs only its chunk pointers.
//
// setRange may run on any number of loops at once (atomic operations, no
// lock: the write path only pays for it when a bit is still clear); every
// other method is for the control path, with no request in flight.
type bitVec struct {
	n      uint64 // bits
	chunks []atomic.Pointer[bitChunk]
}

const (
	bitChunkWords = 4096 // 32 KiB of bitmap per chunk
	bitChunkBits  = bitChunkWords * 64
)

type bitChunk [bitChunkWords]uint64

func newBitVec(n uint64) *bitVec {
	return &bitVec{n: n, chunks: make([]atomic.Pointer[bitChunk], (n+bitChunkBits-1)/bitChunkBits)}
}

// chunk returns chunk i, allocating it if needed.
func (v *bitVec) chunk(i uint64) *bitChunk {
	if c := v.chunks[i].Load(); c != nil {
		return c
	}
	c := new(bitChunk)
	if v.chunks[i].CompareAndSwap(nil, c) {
		return c
	}
	return v.chunks[i].Load()
}

// setRange sets bits first..last (inclusive), clipped to the vector.
func (v *bitVec) setRange(first, last uint64) {
	if v.n == 0 {
		return
	}
	last = min(last, v.n-1)
	for first <= last {
		c := v.chunk(first / bitChunkBits)
		// Within one word: bits lo..hi of word w.
		w, lo := (first%bitChunkBits)/64, first%64
		hi := min(63, lo+(last-first))
		mask := (^uint64(0) >> (63 - hi)) &^ (uint64(1)<<lo - 1)
		if atomic.LoadUint64(&c[w])&mask != mask {
			atomic.OrUint64(&c[w], mask)
		}
		first += hi - lo + 1
	}
}

// word returns word w (bits 64w..64w+63), zero where no chunk exists.
func (v *bitVec) word(w uint64) uint64 {
	c := v.chunks[w/bitChunkWords].Load()
	if c == nil {
		return 0
	}
	return atomic.LoadUint64(&c[w%bitChunkWords])
}

// orWord ORs x into word w.
func (v *bitVec) orWord(w, x uint64) {
	if x != 0 {
		atomic.OrUint64(&v.chunk(w / bitChunkWords)[w%bitChunkWords], x)
	}
}

// words is the number of 64-bit words the vector holds.
func (v *bitVec) words() uint64 { return (v.n + 63) / 64 }

// tailMask keeps the bits of the last word that lie inside the vector.
func (v *bitVec) tailMask(w uint64) uint64 {
	if w == v.words()-1 && v.n%64 != 0 {
		return uint64(1)<<(v.n%64) - 1
	}
	return ^uint64(0)
}

// serialize writes the bitmap bytes from byte offset off (a multiple of 8)
// into buf in QEMU's on-disk order (little-endian words: bit i of byte j is
// granule 8j+i) and reports whether any bit was set. Bytes past the vector
// are zero.
func (v *bitVec) serialize(off uint64, buf []byte) bool {
	clear(buf)
	set := false
	for i := uint64(0); i+8 <= uint64(len(buf)); i += 8 {
		w := (off + i) / 8
		if w >= v.words() {
			break
		}
		if x := v.word(w); x != 0 {
			binary.LittleEndian.PutUint64(buf[i:], x)
			set = true
		}
	}
	return set
}

// deserialize ORs on-disk bitmap bytes read from byte offset off (a
// multiple of 8) into the vector; bits past its end are dropped.
func (v *bitVec) deserialize(off uint64, buf []byte) {
	for i := uint64(0); i+8 <= uint64(len(buf)); i += 8 {
		w := (off + i) / 8
		if w >= v.words() {
			return
		}
		v.orWord(w, binary.LittleEndian.Uint64(buf[i:])&v.tailMask(w))
	}
}

// setBytes sets every bit of on-disk bytes [off, off+n) (an "all ones"
// bitmap table entry).
func (v *bitVec) setBytes(off, n uint64) {
	if first := off * 8; first < v.n {
		v.setRange(first, (off+n)*8-1)
	}
}

// empty reports whether no bit is set.
func (v *bitVec) empty() bool {
	for i := range v.chunks {
		if c := v.chunks[i].Load(); c != nil {
			for _, x := range c {
				if x != 0 {
					return false
				}
			}
		}
	}
	return true
}

// reset clears every bit.
func (v *bitVec) reset() {
	for i := range v.chunks {
		v.chunks[i].Store(nil)
	}
}

// resized returns a copy of the vector with n bits: bits past the old end
// read as clear, bits past the new end are dropped (QEMU's hbitmap_truncate).
func (v *bitVec) resized(n uint64) *bitVec {
	nv := newBitVec(n)
	for w := range min(v.words(), nv.words()) {
		nv.orWord(w, v.word(w)&nv.tailMask(w))
	}
	return nv
}

// mergeFrom sets in v (granularity 1<<gv bytes) every granule that touches a
// granule set in src (granularity 1<<gs bytes); both cover the same disk
// (QEMU's hbitmap_merge, which allows different granularities).
func (v *bitVec) mergeFrom(gv uint8, src *bitVec, gs uint8) {
	for w := range src.words() {
		x := src.word(w)
		if x == 0 {
			continue
		}
		if gv == gs {
			v.orWord(w, x&v.tailMask(w))
			continue
		}
		for x != 0 {
			b := uint64(bits.TrailingZeros64(x))
			x &= x - 1
			i := w*64 + b
			v.setRange((i<<gs)>>gv, ((i+1)<<gs-1)>>gv)
		}
	}
}
