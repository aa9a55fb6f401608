package jobs

import (
	"context"
	"errors"
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Granularity and size of the commit's copies (QEMU's mirror job:
// granularity of the dirty bitmap, at most 1 MiB per copy).
const (
	commitGranularity = 64 << 10
	maxCopy           = 1 << 20
)

// Passes and what may stay dirty before the commit's final pass, which
// runs with the device paused: the passes end once less than
// commitFinalDirty granules are dirty, or after commitMaxPasses (a guest
// that writes faster than the copy then waits for the final pass).
const (
	commitMaxPasses  = 16
	commitFinalDirty = 64
)

// Commit merges the image the device serves (an overlay) into its backing
// file while the device is in use, then serves the backing file
// (QEMU's active block-commit): the overlay is left as it was, no longer
// used.
//
//  1. pause; reopen the backing file read-write; resume;
//  2. insert a filter above the overlay that marks the granules every
//     guest write (write-zeroes, discard) touches;
//  3. mark the granules the overlay holds above the backing file, and copy
//     marked granules from the overlay (as read through it) into the
//     backing file, clearing their marks first, in passes, until few
//     remain;
//  4. pause; copy the rest; flush the backing file; pivot(backing): the
//     caller records it as the device's image; serve it; resume; close the
//     overlay.
//
// Until 4 the overlay is what the device serves, and the backing file
// only gains copies of data the overlay holds above it (shadowed), so a
// failure or a crash leaves the overlay and its backing file reading as
// they did. A failure before the pivot takes the filter out and reopens
// the backing file read-only.
func Commit(ctx context.Context, dev Device, o OpenOptions, pivot PivotFunc, progress Progress) error {
	top, err := activeImage(dev, "live commit", false)
	if err != nil {
		return err
	}
	if top.Backing == nil {
		return fmt.Errorf("live commit: '%s' has no backing file to commit into", top.Filename)
	}
	if progress == nil {
		progress = func(int64, int64) {}
	}
	return coroutine.Run(func(co *coroutine.Co) error {
		j := &commitJob{ctx: ctx, dev: dev, top: top, o: o, progress: progress}
		err := j.run(co, pivot)
		if err != nil && !j.pivoted {
			err = errors.Join(err, j.undo(co))
		}
		return err
	})
}

type commitJob struct {
	ctx      context.Context
	dev      Device
	top      *bdrv.Node
	base     *bdrv.Node // the backing file, read-write once reopened
	o        OpenOptions
	progress Progress

	f       *filter
	dirty   *bitset
	done    int64
	buf     []byte
	pivoted bool
}

func (j *commitJob) run(co *coroutine.Co, pivot PivotFunc) error {
	// 1.
	if err := pause(co, j.ctx, j.dev); err != nil {
		return err
	}
	base, err := switchMode(co, j.dev, j.top.Backing, false, j.o, j.baseOpts())
	if base != nil {
		j.top.Backing = base
	}
	if err != nil {
		j.dev.Resume()
		return err
	}
	j.base = base
	size := j.top.Length()
	if base.Length() < size {
		if err := base.Truncate(co, size, false, bdrv.PreallocOff); err != nil {
			j.dev.Resume()
			return fmt.Errorf("growing '%s' to %d bytes: %w", base.Filename, size, err)
		}
	}
	// 2.
	j.dirty = newBitset(size, commitGranularity)
	j.f = &filter{child: j.top, after: j.dirty.setBytes}
	insertFilter(j.dev, "commit-top", j.f)
	j.dev.Resume()

	// 3.
	if err := j.markAllocated(co); err != nil {
		return err
	}
	j.buf = bdrv.AlignedBuffer(maxCopy, max(4096, j.top.Limits().MinMemAlignment, base.Limits().MinMemAlignment))
	for pass := 0; pass < commitMaxPasses && j.dirty.count() >= commitFinalDirty; pass++ {
		if err := j.copyDirty(co); err != nil {
			return err
		}
	}
	// 4.
	if err := pause(co, j.ctx, j.dev); err != nil {
		return err
	}
	defer j.dev.Resume()
	if err := j.copyDirty(co); err != nil {
		return err
	}
	if err := base.Flush(co); err != nil {
		return fmt.Errorf("flushing '%s': %w", base.Filename, err)
	}
	if err := pivot(base.Filename, base.Format.Name, j.baseOpts()); err != nil {
		return err
	}
	removeFilter(j.dev, j.f)
	j.dev.SetNode(base)
	j.pivoted = true
	j.top.Backing = nil
	if err := j.top.Close(co); err != nil {
		return fmt.Errorf("the device serves '%s'; closing the overlay '%s': %w", base.Filename, j.top.Filename, err)
	}
	return nil
}

// baseOpts are the options of the backing file: the overlay's "backing."
// ones and those it inherits (bdrv.Options.ChainOptions), nil for a
// device opened without options.
func (j *commitJob) baseOpts() bdrv.Options {
	if j.o.Image == nil {
		return nil
	}
	return j.o.Image.ChainOptions()
}

// markAllocated marks the granules the overlay holds above its backing
// file.
func (j *commitJob) markAllocated(co *coroutine.Co) error {
	size := j.dirty.size
	for off := int64(0); off < size; {
		if err := cancelled(j.ctx); err != nil {
			return err
		}
		alloc, n, err := j.top.IsAllocatedAbove(co, j.base, off, min(size-off, 1<<30))
		if err != nil {
			return fmt.Errorf("reading the overlay's metadata: %w", err)
		}
		if n <= 0 {
			break
		}
		if alloc {
			j.dirty.setBytes(off, n)
		}
		off += n
	}
	return nil
}

// copyDirty copies every marked granule once, in runs of up to maxCopy.
func (j *commitJob) copyDirty(co *coroutine.Co) error {
	run := int64(maxCopy / commitGranularity)
	for i := j.dirty.next(0); i >= 0; i = j.dirty.next(i) {
		if err := cancelled(j.ctx); err != nil {
			return err
		}
		k := i
		for k < j.dirty.n && k-i < run && j.dirty.test(k) {
			j.dirty.clear(k)
			k++
		}
		off, n := j.dirty.span(i, k)
		if err := copyRange(co, j.top, j.base, off, n, j.buf, 0); err != nil {
			return err
		}
		j.done += n
		j.progress(j.done, j.done+j.dirty.count()*commitGranularity)
		i = k
	}
	return nil
}

// undo takes the filter out and puts the backing file back read-only,
// after a failure before the pivot.
func (j *commitJob) undo(co *coroutine.Co) error {
	if j.base == nil {
		return nil
	}
	// A cancelled job still undoes: the pause gets a context of its own.
	if err := pause(co, context.WithoutCancel(j.ctx), j.dev); err != nil {
		return err
	}
	defer j.dev.Resume()
	if j.f != nil {
		removeFilter(j.dev, j.f)
	}
	if err := j.base.Flush(co); err != nil {
		return fmt.Errorf("flushing '%s': %w", j.base.Filename, err)
	}
	ro, err := switchMode(co, j.dev, j.base, true, j.o, j.baseOpts())
	if ro != nil {
		j.top.Backing = ro
	}
	return err
}

// copyRange copies bytes at off from src (as read through its chain) to
// dst, maxCopy at a time through buf; ranges that read as zeros become
// zero writes with zeroFlags.
func copyRange(co *coroutine.Co, src, dst *bdrv.Node, off, bytes int64, buf []byte, zeroFlags bdrv.ReqFlags) error {
	for bytes > 0 {
		n := min(bytes, int64(len(buf)))
		b := buf[:n]
		if err := src.Preadv(co, off, bdrv.IOVec{b}, 0); err != nil {
			return fmt.Errorf("reading '%s' at %d: %w", src.Filename, off, err)
		}
		var err error
		if isZero(b) {
			err = dst.PwriteZeroes(co, off, n, zeroFlags)
		} else {
			err = dst.Pwritev(co, off, bdrv.IOVec{b}, 0)
		}
		if err != nil {
			return fmt.Errorf("writing '%s' at %d: %w", dst.Filename, off, err)
		}
		off += n
		bytes -= n
	}
	return nil
}
