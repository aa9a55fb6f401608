package qcow2

import (
	"encoding/binary"
	"math/bits"
	"sync/atomic"
)

// bitVec is the in-memory form of a dirty bitmap (QEMU's HBitmap, one
// level): bit i stands for granule i. It is allocated in chunks on first
// use, so a clean bitmap of a large disk costs only its chunk pointers,
// and a chunk whose bits are all set is the shared onesChunk, so a bitmap
// whose image stores "all ones" clusters, or that a write over the whole
// disk dirtied, costs no more. At most every chunk is allocated:
// bitVecBytes, which the image's bitmap memory cap counts.
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

// onesChunk stands for every chunk whose bits are all set. It is never
// written: writers OR only into words that miss a bit, and the paths that
// clear bits replace chunks rather than change them.
var onesChunk = func() *bitChunk {
	c := new(bitChunk)
	for i := range c {
		c[i] = ^uint64(0)
	}
	return c
}()

func newBitVec(n uint64) *bitVec {
	return &bitVec{n: n, chunks: make([]atomic.Pointer[bitChunk], bitChunksFor(n))}
}

// bitChunksFor is the number of chunks n bits take.
func bitChunksFor(n uint64) uint64 { return (n + bitChunkBits - 1) / bitChunkBits }

// bitVecBytes is the most memory a vector of n bits holds: every chunk
// allocated (its chunk pointers, 1/4096 of that, aside).
func bitVecBytes(n uint64) uint64 { return bitChunksFor(n) * bitChunkWords * 8 }

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
// Whole chunks become onesChunk.
func (v *bitVec) setRange(first, last uint64) {
	if v.n == 0 {
		return
	}
	last = min(last, v.n-1)
	for first <= last {
		if first%bitChunkBits == 0 && last-first >= bitChunkBits-1 {
			// Bits set concurrently in the chunk replaced are set in
			// onesChunk too: nothing is lost.
			v.chunks[first/bitChunkBits].Store(onesChunk)
			first += bitChunkBits
			continue
		}
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

// nextSet returns the first set bit at or after i, v.n if there is none.
// Chunks never written are skipped whole.
func (v *bitVec) nextSet(i uint64) uint64 {
	return v.next(i, 0)
}

// nextClear returns the first clear bit at or after i, v.n if there is
// none. Chunks whose bits are all set (onesChunk) are skipped whole.
func (v *bitVec) nextClear(i uint64) uint64 {
	return v.next(i, ^uint64(0))
}

// next returns the first bit at or after i that differs from the bits of
// skip (0: the first set bit; all ones: the first clear one).
func (v *bitVec) next(i, skip uint64) uint64 {
	for i < v.n {
		c := v.chunks[i/bitChunkBits].Load()
		if c == nil && skip == 0 || c == onesChunk && skip != 0 {
			i = (i/bitChunkBits + 1) * bitChunkBits
			continue
		}
		if c == nil || c == onesChunk {
			return i
		}
		for w := (i % bitChunkBits) / 64; w < bitChunkWords && i < v.n; w++ {
			x := (atomic.LoadUint64(&c[w]) ^ skip) &^ (uint64(1)<<(i%64) - 1)
			if x != 0 {
				return min(v.n, i-i%64+uint64(bits.TrailingZeros64(x)))
			}
			i += 64 - i%64
		}
	}
	return v.n
}

// orWord ORs x into word w.
func (v *bitVec) orWord(w, x uint64) {
	if x == 0 {
		return
	}
	p := &v.chunk(w / bitChunkWords)[w%bitChunkWords]
	if atomic.LoadUint64(p)&x != x {
		atomic.OrUint64(p, x)
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

// resize gives the vector n bits in place, keeping its chunks: bits past
// the old end read as clear, bits past the new end are dropped (QEMU's
// hbitmap_truncate). No request may run concurrently.
func (v *bitVec) resize(n uint64) {
	chunks := make([]atomic.Pointer[bitChunk], bitChunksFor(n))
	for i := range min(len(v.chunks), len(chunks)) {
		chunks[i].Store(v.chunks[i].Load())
	}
	v.n, v.chunks = n, chunks
	// Bits past the end are clear in a vector (growing finds them so);
	// shrinking may cut a chunk, whose tail is cleared.
	last := len(chunks) - 1
	tail := n % bitChunkBits
	if tail == 0 || last < 0 || chunks[last].Load() == nil {
		return
	}
	c := chunks[last].Load()
	if c == onesChunk {
		c = new(bitChunk)
		*c = *onesChunk
		chunks[last].Store(c)
	}
	if tail%64 != 0 {
		c[tail/64] &= uint64(1)<<(tail%64) - 1
		tail += 64 - tail%64
	}
	clear(c[tail/64:])
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
