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

// Slice returns the bytes [off, off+n) of v as a new IOVec sharing v's
// memory. It panics if the range is outside v, like slicing does.
func (v IOVec) Slice(off, n int64) IOVec {
	if off < 0 || n < 0 {
		panic("bdrv: IOVec.Slice: negative range")
	}
	if n == 0 {
		return IOVec{}
	}
	out := make(IOVec, 0, 1)
	for _, b := range v {
		bl := int64(len(b))
		if off >= bl {
			off -= bl
			continue
		}
		take := min(bl-off, n)
		out = append(out, b[off:off+take])
		n -= take
		off = 0
		if n == 0 {
			return out
		}
	}
	panic("bdrv: IOVec.Slice: range past end")
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
