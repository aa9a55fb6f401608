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
		if qtotal := alignUp(total, sectorSize); off < qtotal && bytes > 0 {
			return n.tailStatus(co, wantZero, off, min(bytes, qtotal-off))
		}
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
	} else if wantZero && off >= alignUp(n.Backing.Length(), sectorSize) {
		// Past the end of a short backing file: zeros too. Its end is
		// that of its last sector, as QEMU's bdrv_getlength counts;
		// up to there the backing file answers (tailStatus).
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
	if off+st.Pnum >= alignUp(total, sectorSize) {
		st.Flags |= StatusEOF
	}
	return st, nil
}

// sectorSize is QEMU's BDRV_SECTOR_SIZE: QEMU's node lengths are whole
// sectors, so a node whose length is not one answers for the rest of its
// last sector too.
const sectorSize = 512

// tailStatus reports [off, off+bytes) between the node's exact end and the
// end of its last sector, which reads as zeros (QEMU's file-posix reports
// a trailing hole there, and the layers above a short backing file read
// zeros from its exact end). A protocol node answers zeros at that offset
// of itself; a format node whose last byte maps straight to its file (raw)
// answers zeros at the file's offset for the same bytes. Any other node
// ends at its exact length (StatusEOF with Pnum 0).
func (n *Node) tailStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (Status, error) {
	if n.Format.Protocol {
		return Status{Flags: StatusZero | StatusAllocated | StatusOffsetValid | StatusEOF,
			Pnum: bytes, Map: off, File: n}, nil
	}
	bs, ok := n.drv.(BlockStatuser)
	total := n.Length()
	if !ok || total == 0 {
		return Status{Flags: StatusEOF}, nil
	}
	aoff := alignDown(total-1, n.limits.RequestAlignment)
	last, err := bs.BlockStatus(co, false, aoff, total-aoff)
	if err != nil {
		return Status{}, err
	}
	if last.Flags&StatusRaw == 0 || last.File == nil || last.Pnum < total-aoff {
		return Status{Flags: StatusEOF}, nil
	}
	st, err := last.File.BlockStatus(co, wantZero, last.Map+off-aoff, bytes)
	if err != nil || st.Pnum == 0 {
		return Status{Flags: StatusEOF}, err
	}
	// Zeros whatever the file holds there (a window of a longer file):
	// that is what the node reads past its end.
	st.Pnum = min(st.Pnum, bytes)
	st.Flags = st.Flags&^(StatusRecurse|StatusRaw|StatusData) | StatusZero | StatusAllocated
	if off+st.Pnum >= alignUp(total, sectorSize) {
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
	// eof is where n ends if its answer reached its end: a lower
	// layer's end says nothing about n's, so the answer is at EOF only
	// if it reaches there (QEMU's bdrv_co_common_block_status_above).
	eof := int64(-1)
	atEOF := func(st Status) Status {
		st.Flags &^= StatusEOF
		if off+st.Pnum == eof {
			st.Flags |= StatusEOF
		}
		return st
	}
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
			return atEOF(Status{Flags: StatusZero | StatusAllocated, Pnum: bytes, Depth: depth}), nil
		}
		if p == n && st.Flags&StatusEOF != 0 {
			eof = off + st.Pnum
		}
		if st.Flags&StatusAllocated != 0 || p.Backing == nil || p.Backing == base {
			// Allocated here, or the last layer asked: its answer
			// stands, including the ZERO it gives unallocated ranges
			// with nothing below (QEMU reports that layer's depth).
			st.Depth = depth
			if depth > 0 {
				st = atEOF(st)
			}
			return st, nil
		}
		bytes = st.Pnum
		depth++
	}
	return atEOF(Status{Pnum: bytes, Depth: depth}), nil
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
