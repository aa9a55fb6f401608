package jobs

import (
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// cbwState is the copy-before-write of a backup (QEMU's
// block/copy-before-write.c and block-copy.c): the granules of the image
// not copied to the target yet, and the copies in progress. The job's
// coroutine copies granules in order; a guest write first copies the
// granules it is about to overwrite (on its queue's loop), so the target
// receives every granule as it was at the backup's point in time. A
// granule is copied once: whoever finds it being copied waits for that
// copy.
type cbwState struct {
	src, dst *bdrv.Node
	// pending are the granules still to copy; a granule leaves it once
	// its copy is in the target.
	pending *bitset
	// incremental targets have a backing file: a range that reads as
	// zeros must be written as zeros; a full backup's target reads as
	// zeros already.
	incremental bool

	// mu guards busy and err.
	mu coroutine.Mutex
	// busy maps every granule being copied to the queue of those that
	// wait for its copy.
	busy map[int64]*coroutine.Queue
	// err is the first failed copy: the backup fails, and the filter
	// stops copying (the guest's writes go on).
	err error
}

// beforeWrite is the filter's hook: the pending granules [off,
// off+bytes) touches are copied before the write goes on.
func (s *cbwState) beforeWrite(co *coroutine.Co, off, bytes int64) {
	p := s.pending
	if bytes <= 0 || off >= p.size {
		return
	}
	first, last := off/p.gran, min(off+bytes-1, p.size-1)/p.gran
	for i := first; i <= last; i++ {
		if p.test(i) {
			// A failure is the backup's (s.err), not the write's.
			s.copy(co, i, last+1)
			return
		}
	}
}

// copy copies the pending granules of [i, j) that nobody copies yet and
// waits for those another coroutine copies.
func (s *cbwState) copy(co *coroutine.Co, i, j int64) error {
	for g := i; g < j; {
		if !s.pending.test(g) {
			g++
			continue
		}
		s.mu.Lock(co)
		if s.err != nil {
			err := s.err
			s.mu.Unlock(co)
			return err
		}
		if !s.pending.test(g) {
			s.mu.Unlock(co)
			g++
			continue
		}
		if q := s.busy[g]; q != nil {
			q.Wait(co, &s.mu)
			s.mu.Unlock(co)
			continue // look at g again
		}
		h := g
		q := new(coroutine.Queue)
		for h < j && s.pending.test(h) && s.busy[h] == nil {
			s.busy[h] = q
			h++
		}
		s.mu.Unlock(co)

		err := s.copyRun(co, g, h)

		s.mu.Lock(co)
		for k := g; k < h; k++ {
			delete(s.busy, k)
			if err == nil {
				s.pending.clear(k)
			}
		}
		if err != nil && s.err == nil {
			s.err = err
		}
		q.RestartAll(co)
		s.mu.Unlock(co)
		if err != nil {
			return err
		}
		g = h
	}
	return nil
}

// copyRun copies granules [g, h) from the image to the target; ranges
// that read as zeros are skipped (full) or written as zeros (incremental).
func (s *cbwState) copyRun(co *coroutine.Co, g, h int64) error {
	off, n := s.pending.span(g, h)
	for n > 0 {
		st, err := s.src.BlockStatusAbove(co, nil, true, off, n)
		if err != nil {
			return fmt.Errorf("reading the image's metadata at %d: %w", off, err)
		}
		m := min(st.Pnum, n)
		if m <= 0 {
			m = n
		}
		switch {
		case st.Flags&bdrv.StatusZero != 0 && !s.incremental:
		case st.Flags&bdrv.StatusZero != 0:
			if err := s.dst.PwriteZeroes(co, off, m, 0); err != nil {
				return fmt.Errorf("writing '%s' at %d: %w", s.dst.Filename, off, err)
			}
		default:
			zeroFlags := bdrv.ReqMayUnmap
			if s.incremental {
				zeroFlags = 0
			}
			buf := bdrv.AlignedBuffer(int(min(m, maxCopy)), max(4096, s.src.Limits().MinMemAlignment, s.dst.Limits().MinMemAlignment))
			if err := copyRange(co, s.src, s.dst, off, m, buf, zeroFlags); err != nil {
				return err
			}
		}
		off += m
		n -= m
	}
	return nil
}

// failure returns the first failed copy.
func (s *cbwState) failure(co *coroutine.Co) error {
	s.mu.Lock(co)
	defer s.mu.Unlock(co)
	return s.err
}
