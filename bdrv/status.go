package bdrv

import "ublkimg/coroutine"

// BlockStatus reports the allocation status of [off, off+bytes) in this node
// alone (QEMU's bdrv_co_block_status). Status.Pnum may be smaller than
// bytes; it is 0 only when off is at or past the end (StatusEOF). wantZero
// asks the driver to work harder at telling zeros apart (for convert and
// map); without it a cheap answer is fine.
func (n *Node) BlockStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (Status, error) {
	if err := checkRequest(off, bytes); err != nil {
		return Status{}, err
	}
	total := n.Length()
	if off >= total || bytes == 0 {
		return Status{Flags: StatusEOF}, nil
	}
	bytes = min(bytes, total-off)

	bs, ok := n.drv.(BlockStatuser)
	var st Status
	if !ok {
		st = Status{Flags: StatusData, Pnum: bytes}
		if n.Format.Protocol {
			st.Flags |= StatusOffsetValid
			st.Map, st.File = off, n
		}
	} else {
		// Drivers answer for aligned ranges; report from off onwards.
		align := n.limits.RequestAlignment
		aoff := alignDown(off, align)
		aend := min(alignUp(off+bytes, align), alignUp(total, align))
		var err error
		if st, err = bs.BlockStatus(co, wantZero, aoff, aend-aoff); err != nil {
			return Status{}, err
		}
		if skip := off - aoff; skip > 0 {
			if st.Pnum <= skip {
				// The driver's answer ended inside the head block;
				// report that block's status for the one byte range.
				st.Pnum = skip + 1
			}
			st.Pnum -= skip
			if st.Flags&StatusOffsetValid != 0 {
				st.Map += skip
			}
		}
		st.Pnum = min(st.Pnum, bytes)
		if st.Pnum <= 0 {
			st.Pnum = min(bytes, align)
		}
	}

	if st.Flags&StatusRaw != 0 && st.File != nil {
		inner, err := st.File.BlockStatus(co, wantZero, st.Map, st.Pnum)
		if err != nil {
			return Status{}, err
		}
		if inner.Pnum == 0 {
			// Past the end of the file below: reads as zeros.
			inner = Status{Flags: StatusZero, Pnum: st.Pnum}
		}
		st = inner
		st.Flags &^= StatusAllocated | StatusEOF
	}

	if st.Flags&(StatusData|StatusZero) != 0 {
		st.Flags |= StatusAllocated
	} else if n.Backing == nil {
		// Nothing below: unallocated areas read as zeros.
		st.Flags |= StatusZero
	} else if wantZero && off >= n.Backing.Length() {
		// Past the end of a short backing file: zeros too.
		st.Flags |= StatusZero
	}

	if wantZero && st.Flags&StatusRecurse != 0 && st.Flags&StatusData != 0 &&
		st.Flags&StatusOffsetValid != 0 && st.File != nil {
		fst, err := st.File.BlockStatus(co, true, st.Map, st.Pnum)
		if err == nil {
			if fst.Pnum == 0 {
				st.Flags |= StatusZero
			} else {
				st.Pnum = min(st.Pnum, fst.Pnum)
				st.Flags |= fst.Flags & StatusZero
			}
		}
	}
	st.Flags &^= StatusRecurse | StatusRaw
	if off+st.Pnum >= total {
		st.Flags |= StatusEOF
	}
	return st, nil
}

// BlockStatusAbove reports the status of [off, off+bytes) as seen through n
// and its backing chain down to, not including, base (nil: the whole
// chain): the first layer that allocates the range answers, and
// Status.Depth says which (0 = n). A layer shorter than the one above it
// reads as zeros beyond its end. Status.Pnum never spans a change of the
// answering layer.
func (n *Node) BlockStatusAbove(co *coroutine.Co, base *Node, wantZero bool, off, bytes int64) (Status, error) {
	depth := 0
	for p := n; p != nil && p != base; p = p.Backing {
		st, err := p.BlockStatus(co, wantZero, off, bytes)
		if err != nil {
			return Status{}, err
		}
		if st.Pnum == 0 {
			if p == n {
				return st, nil // the query itself is past the end
			}
			// Past the end of a shorter lower layer: zeros, for as
			// long as the layers above left the range unallocated.
			return Status{Flags: StatusZero | StatusAllocated, Pnum: bytes, Depth: depth}, nil
		}
		if st.Flags&StatusAllocated != 0 || p.Backing == nil || p.Backing == base {
			// Allocated here, or the last layer asked: its answer
			// stands, including the ZERO it gives unallocated ranges
			// with nothing below (QEMU reports that layer's depth).
			st.Depth = depth
			return st, nil
		}
		bytes = st.Pnum
		depth++
	}
	return Status{Pnum: bytes, Depth: depth}, nil
}

// IsAllocatedAbove reports whether [off, off+bytes) is allocated in n or any
// layer above base, and for how many bytes that answer holds.
func (n *Node) IsAllocatedAbove(co *coroutine.Co, base *Node, off, bytes int64) (bool, int64, error) {
	st, err := n.BlockStatusAbove(co, base, false, off, bytes)
	if err != nil {
		return false, 0, err
	}
	return st.Flags&StatusAllocated != 0, st.Pnum, nil
}
