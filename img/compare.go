package img

import (
	"bytes"
	"fmt"
	"io"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Exit statuses of qemu-img compare.
const (
	CompareIdentical  = 0 // the images read the same
	CompareDiffer     = 1 // they differ (or, with Strict, size or allocation differ)
	CompareOpenError  = 2 // an image could not be opened
	CompareAllocError = 3 // a block-status query failed
	CompareReadError  = 4 // a read failed
)

// ioBufSize is compare's chunk, 2 MiB (IO_BUF_SIZE).
const ioBufSize = ioBufSectors * sectorSize

// CompareOptions are qemu-img compare's arguments.
type CompareOptions struct {
	Filename1, Filename2 string
	Format1, Format2     string // -f, -F; "" probes
	Cache                bdrv.CacheMode
	// Strict (-s) also fails on a size mismatch or on any difference in
	// block status (allocation), not only in content.
	Strict     bool
	ForceShare bool
	// Progress, if not nil, receives -p's progress line.
	Progress io.Writer
}

// CompareError is a failure that ends compare with Code (2, 3 or 4).
type CompareError struct {
	Code int
	Err  error
}

func (e *CompareError) Error() string { return e.Err.Error() }

func (e *CompareError) Unwrap() error { return e.Err }

// Compare compares the content of two images as qemu-img compare does and
// returns its exit status: CompareIdentical or CompareDiffer, or one of
// the error statuses together with a *CompareError. Ranges that read as
// zeros in both images are skipped by block status, ranges allocated in
// only one image are checked for zeros, and when the sizes differ the
// larger image's extra part must read as zeros (after "Warning: Image size
// mismatch!"). Messages ("Content mismatch at offset N!", "Images are
// identical.") go to out, which may be nil (-q).
func Compare(co *coroutine.Co, opts CompareOptions, out io.Writer) (int, error) {
	if out == nil {
		out = io.Discard
	}
	progress := NewProgress(opts.Progress, 2)
	defer progress.End()

	open := func(name, format string) (*bdrv.Node, error) {
		s := openSpec{filename: name, format: format, cache: opts.Cache, readOnly: true}
		if opts.ForceShare {
			s.options = bdrv.Options{bdrv.OptForceShare: "on"}
		}
		n, err := openImage(co, s)
		if err != nil {
			return nil, &CompareError{Code: CompareOpenError, Err: err}
		}
		return n, nil
	}
	n1, err := open(opts.Filename1, opts.Format1)
	if err != nil {
		return CompareOpenError, err
	}
	defer n1.Close(co)
	n2, err := open(opts.Filename2, opts.Format2)
	if err != nil {
		return CompareOpenError, err
	}
	defer n2.Close(co)

	cmp := &comparer{out: out, buf1: compareBuffer(n1), buf2: compareBuffer(n2)}
	return cmp.run(co, n1, n2, opts, progress)
}

type comparer struct {
	out        io.Writer
	buf1, buf2 []byte
}

func compareBuffer(n *bdrv.Node) []byte {
	return bdrv.AlignedBuffer(ioBufSize, max(4096, n.Limits().MinMemAlignment))
}

func (c *comparer) run(co *coroutine.Co, n1, n2 *bdrv.Node, opts CompareOptions, progress *Progress) (int, error) {
	size1, size2 := qemuLength(n1), qemuLength(n2)
	total := min(size1, size2)
	progressBase := max(size1, size2)
	progress.Print(0, 100)

	if opts.Strict && size1 != size2 {
		fmt.Fprintf(c.out, "Strict mode: Image size mismatch!\n")
		return CompareDiffer, nil
	}

	// The flags that make up QEMU's block-status return value; strict
	// mode compares them all, as img_compare compares status1 != status2.
	const statusMask = bdrv.StatusData | bdrv.StatusZero | bdrv.StatusOffsetValid |
		bdrv.StatusAllocated | bdrv.StatusEOF | bdrv.StatusCompressed

	for off := int64(0); off < total; {
		st1, err := n1.BlockStatusAbove(co, nil, true, off, size1-off)
		if err != nil {
			return CompareAllocError, &CompareError{CompareAllocError, fmt.Errorf("Sector allocation test failed for %s", displayName(opts.Filename1))}
		}
		st2, err := n2.BlockStatusAbove(co, nil, true, off, size2-off)
		if err != nil {
			return CompareAllocError, &CompareError{CompareAllocError, fmt.Errorf("Sector allocation test failed for %s", displayName(opts.Filename2))}
		}
		pastEnd1, pastEnd2 := fixPastEnd(&st1, off, size1), fixPastEnd(&st2, off, size2)
		alloc1, alloc2 := st1.Flags&bdrv.StatusAllocated != 0, st2.Flags&bdrv.StatusAllocated != 0
		chunk := min(st1.Pnum, st2.Pnum)

		if opts.Strict && (st1.Flags&statusMask != st2.Flags&statusMask || pastEnd1 != pastEnd2) {
			fmt.Fprintf(c.out, "Strict mode: Offset %d block status mismatch!\n", off)
			return CompareDiffer, nil
		}
		switch {
		case st1.Flags&bdrv.StatusZero != 0 && st2.Flags&bdrv.StatusZero != 0:
			// Both read as zeros: nothing to compare.
		case alloc1 == alloc2:
			if alloc1 {
				chunk = min(chunk, ioBufSize)
				if code, err := c.compareData(co, n1, n2, off, chunk, opts); code != CompareIdentical {
					return code, err
				}
			}
		default:
			chunk = min(chunk, ioBufSize)
			n, name := n1, displayName(opts.Filename1)
			if alloc2 {
				n, name = n2, displayName(opts.Filename2)
			}
			if code, err := c.checkEmpty(co, n, off, chunk, name); code != CompareIdentical {
				return code, err
			}
		}
		off += chunk
		progress.Print(float32(chunk)/float32(progressBase)*100, 100)
	}

	if size1 != size2 {
		fmt.Fprintf(c.out, "Warning: Image size mismatch!\n")
		over, name, overSize := n1, displayName(opts.Filename1), size1
		if size2 > size1 {
			over, name, overSize = n2, displayName(opts.Filename2), size2
		}
		for off := total; off < progressBase; {
			st, err := over.BlockStatusAbove(co, nil, true, off, progressBase-off)
			if err != nil {
				return CompareAllocError, &CompareError{CompareAllocError, fmt.Errorf("Sector allocation test failed for %s", name)}
			}
			fixPastEnd(&st, off, overSize)
			chunk := st.Pnum
			if st.Flags&bdrv.StatusAllocated != 0 && st.Flags&bdrv.StatusZero == 0 {
				chunk = min(chunk, ioBufSize)
				if code, err := c.checkEmpty(co, over, off, chunk, name); code != CompareIdentical {
					return code, err
				}
			}
			off += chunk
			progress.Print(float32(chunk)/float32(progressBase)*100, 100)
		}
	}
	fmt.Fprintf(c.out, "Images are identical.\n")
	return CompareIdentical, nil
}

// fixPastEnd turns the answer for the tail of an image whose exact length
// is not a multiple of 512 (which bdrv reports as end of file) into what
// QEMU reports for that partial sector: zeros up to the sector boundary.
func fixPastEnd(st *bdrv.Status, off, size int64) bool {
	if st.Pnum > 0 {
		return false
	}
	st.Flags = bdrv.StatusZero | bdrv.StatusAllocated | bdrv.StatusEOF
	st.Pnum = max(size-off, 1)
	return true
}

// compareData reads chunk bytes of both images at off and reports the
// first differing 512-byte sector (compare_buffers).
func (c *comparer) compareData(co *coroutine.Co, n1, n2 *bdrv.Node, off, chunk int64, opts CompareOptions) (int, error) {
	b1, b2 := c.buf1[:chunk], c.buf2[:chunk]
	if err := n1.Preadv(co, off, bdrv.IOVec{b1}, 0); err != nil {
		return CompareReadError, &CompareError{CompareReadError, fmt.Errorf("Error while reading offset %d of %s: %s", off, displayName(opts.Filename1), Strerror(err))}
	}
	if err := n2.Preadv(co, off, bdrv.IOVec{b2}, 0); err != nil {
		return CompareReadError, &CompareError{CompareReadError, fmt.Errorf("Error while reading offset %d of %s: %s", off, displayName(opts.Filename2), Strerror(err))}
	}
	for i := int64(0); i < chunk; i += sectorSize {
		end := min(i+sectorSize, chunk)
		if !bytes.Equal(b1[i:end], b2[i:end]) {
			fmt.Fprintf(c.out, "Content mismatch at offset %d!\n", off+i)
			return CompareDiffer, nil
		}
	}
	return CompareIdentical, nil
}

// checkEmpty reads chunk bytes at off and reports the first sector that is
// not all zeros (check_empty_sectors).
func (c *comparer) checkEmpty(co *coroutine.Co, n *bdrv.Node, off, chunk int64, name string) (int, error) {
	b := c.buf1[:chunk]
	if err := n.Preadv(co, off, bdrv.IOVec{b}, 0); err != nil {
		return CompareReadError, &CompareError{CompareReadError, fmt.Errorf("Error while reading offset %d of %s: %s", off, name, Strerror(err))}
	}
	for i := int64(0); i < chunk; i += sectorSize {
		end := min(i+sectorSize, chunk)
		if !bdrv.IsZero(b[i:end]) {
			fmt.Fprintf(c.out, "Content mismatch at offset %d!\n", off+i)
			return CompareDiffer, nil
		}
	}
	return CompareIdentical, nil
}
