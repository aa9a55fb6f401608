package bdrv

// IOVec is a scatter/gather list of buffers (QEMU's QEMUIOVector). Its
// length is the sum of its buffers' lengths.
type IOVec [][]byte

// Len is the total number of bytes.
func (v IOVec) Len() int64 {
	var n int64
	for _, b := range v {
		n += int64(len(b))
	}
	return n
}

// Slice returns the bytes [off, off+n) of v as an IOVec sharing v's
// memory. It panics if the range is outside v, like slicing does.
//
// A range made of whole elements of v (all of v, as in a request that
// fits one cluster or one transfer) is returned as a subslice of v itself,
// without allocating: callers must not assign to the result's elements.
func (v IOVec) Slice(off, n int64) IOVec {
	if off < 0 || n < 0 {
		panic("bdrv: IOVec.Slice: negative range")
	}
	if n == 0 {
		return IOVec{}
	}
	// The range starts at first[off] and ends at last[end].
	first := 0
	for first < len(v) && off >= int64(len(v[first])) {
		off -= int64(len(v[first]))
		first++
	}
	last, end := first, off+n
	for last < len(v) && end > int64(len(v[last])) {
		end -= int64(len(v[last]))
		last++
	}
	if last == len(v) {
		panic("bdrv: IOVec.Slice: range past end")
	}
	if off == 0 && end == int64(len(v[last])) {
		return v[first : last+1 : last+1]
	}
	out := make(IOVec, last+1-first)
	copy(out, v[first:last+1])
	out[len(out)-1] = out[len(out)-1][:end]
	out[0] = out[0][off:]
	return out
}

// CopyTo copies v's bytes, starting at off, into dst and returns how many
// it copied.
func (v IOVec) CopyTo(dst []byte, off int64) int {
	done := 0
	for _, b := range v {
		if off >= int64(len(b)) {
			off -= int64(len(b))
			continue
		}
		done += copy(dst[done:], b[off:])
		off = 0
		if done == len(dst) {
			break
		}
	}
	return done
}

// CopyFrom copies src into v starting at off and returns how many bytes it
// copied.
func (v IOVec) CopyFrom(src []byte, off int64) int {
	done := 0
	for _, b := range v {
		if off >= int64(len(b)) {
			off -= int64(len(b))
			continue
		}
		done += copy(b[off:], src[done:])
		off = 0
		if done == len(src) {
			break
		}
	}
	return done
}

// Zero sets bytes [off, off+n) of v to zero.
func (v IOVec) Zero(off, n int64) {
	for _, b := range v {
		if n == 0 {
			return
		}
		if off >= int64(len(b)) {
			off -= int64(len(b))
			continue
		}
		end := min(int64(len(b)), off+n)
		clear(b[off:end])
		n -= end - off
		off = 0
	}
}

// IsZero reports whether every byte of v is zero.
func (v IOVec) IsZero() bool {
	for _, b := range v {
		if !isZero(b) {
			return false
		}
	}
	return true
}

func isZero(b []byte) bool {
	// Compare in 8-byte words where possible: this runs on every
	// detect-zeroes write and on convert's sparse scan.
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// IsZero reports whether every byte of b is zero.
func IsZero(b []byte) bool { return isZero(b) }
