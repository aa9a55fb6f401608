package qcow2

import "testing"

// TestBitVec checks the bit vector against a plain []bool model: ranges
// across words and chunks, the on-disk byte order, resizing and merging
// between granularities.
func TestBitVec(t *testing.T) {
	const n = bitChunkBits + 200
	model := make([]bool, n)
	v := newBitVec(n)
	set := func(first, last uint64) {
		v.setRange(first, last)
		for i := first; i <= min(last, n-1); i++ {
			model[i] = true
		}
	}
	for _, r := range [][2]uint64{{0, 0}, {3, 70}, {63, 64}, {128, 191}, {bitChunkBits - 5, bitChunkBits + 3}, {n - 2, n + 100}} {
		set(r[0], r[1])
	}
	check := func(what string, v *bitVec, model []bool) {
		t.Helper()
		buf := make([]byte, (v.n+63)/64*8)
		v.serialize(0, buf)
		for i := range uint64(len(buf) * 8) {
			got := buf[i/8]&(1<<(i%8)) != 0
			if want := i < uint64(len(model)) && model[i]; got != want {
				t.Fatalf("%s: bit %d is %v, want %v", what, i, got, want)
			}
		}
	}
	check("set", v, model)

	// Round trip through the on-disk form, in two pieces.
	buf := make([]byte, (n+63)/64*8)
	v.serialize(0, buf[:4096])
	v.serialize(4096, buf[4096:])
	w := newBitVec(n)
	w.deserialize(0, buf[:4096])
	w.deserialize(4096, buf[4096:])
	check("round trip", w, model)

	// A whole chunk set is the shared onesChunk, which ORs leave alone;
	// shrinking into it copies it before clearing the tail; growing
	// after finds the dropped bits clear.
	set(0, bitChunkBits-1)
	if v.chunks[0].Load() != onesChunk {
		t.Error("a whole chunk set is not onesChunk")
	}
	w.mergeFrom(9, v, 9)
	check("merged into ones", w, model)
	v.resize(100)
	check("shrunk", v, model[:100])
	v.resize(2 * n)
	check("grown", v, append(model[:100:100], make([]bool, 2*n-100)...))
	for i, x := range onesChunk {
		if x != ^uint64(0) {
			t.Fatalf("onesChunk word %d changed to %#x", i, x)
		}
	}
	x := newBitVec(2 * bitChunkBits)
	x.setRange(0, 2*bitChunkBits-1)
	x.resize(bitChunkBits + 64)
	all := make([]bool, bitChunkBits+64)
	for i := range all {
		all[i] = true
	}
	check("shrunk at a word", x, all)

	// Merging a 4-bit-granule vector into a 1-bit one sets 4 bits per
	// source bit, and back again one bit per touched group of 4.
	fine := newBitVec(4 * 64)
	coarse := newBitVec(64)
	coarse.setRange(1, 1)
	fine.mergeFrom(9, coarse, 11)
	want := make([]bool, 4*64)
	for i := 4; i < 8; i++ {
		want[i] = true
	}
	check("merge fine", fine, want)
	fine.setRange(17, 17)
	coarse2 := newBitVec(64)
	coarse2.mergeFrom(11, fine, 9)
	check("merge coarse", coarse2, []bool{false, true, false, false, true})

	if v.empty() {
		t.Error("empty after sets")
	}
	v.reset()
	if !v.empty() {
		t.Error("not empty after reset")
	}
}

// TestBitVecNext checks nextSet and nextClear against a plain model, across
// words, an unwritten chunk, a whole chunk set (onesChunk) and the end.
func TestBitVecNext(t *testing.T) {
	const n = 3*bitChunkBits + 100
	v := newBitVec(n)
	model := make([]bool, n)
	for _, r := range [][2]uint64{{5, 5}, {60, 130}, {bitChunkBits - 1, bitChunkBits}, {2 * bitChunkBits, 3*bitChunkBits - 1}, {n - 3, n - 1}} {
		v.setRange(r[0], r[1])
		for i := r[0]; i <= r[1]; i++ {
			model[i] = true
		}
	}
	if v.chunks[2].Load() != onesChunk {
		t.Fatal("chunk 2 is not onesChunk")
	}
	next := func(i uint64, set bool) uint64 {
		for ; i < n && model[i] != set; i++ {
		}
		return i
	}
	for i := uint64(0); i <= n; i += 1 + i%97 {
		if got, want := v.nextSet(i), next(i, true); got != want {
			t.Errorf("nextSet(%d) = %d, want %d", i, got, want)
		}
		if got, want := v.nextClear(i), next(i, false); got != want {
			t.Errorf("nextClear(%d) = %d, want %d", i, got, want)
		}
	}
}

// BenchmarkBitVecMark is the cost the write path pays per request and
// bitmap: marking a 4 KiB write at 64 KiB granularity, bits already set
// (the common case) and the same on a 512-byte granularity.
func BenchmarkBitVecMark(b *testing.B) {
	v := newBitVec(1 << 20)
	for i := 0; b.Loop(); i++ {
		off := uint64(i*4096) % (1 << 30)
		v.setRange(off>>16, (off+4095)>>16)
		v.setRange(off>>9, (off+4095)>>9)
	}
}
