package img

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"path/filepath"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// CommitOptions are qemu-img commit's arguments.
type CommitOptions struct {
	Filename string
	Format   string // -f; "" probes
	// Base (-b) names the image of the backing chain to commit into,
	// as qemu-img resolves it: relative to each overlay's directory. ""
	// commits into the image's own backing file.
	Base string
	// Drop (-d, implied by -b) leaves the committed image as it is
	// instead of emptying it.
	Drop  bool
	Cache bdrv.CacheMode // -t
	// Progress, if not nil, receives -p's progress line.
	Progress io.Writer
}

// maxMirrorIO bounds one copy of commit (the mirror job's MAX_IO_BYTES).
const maxMirrorIO = 1 << 20

// Commit copies what an image holds above its backing file (or above Base,
// further down the chain, including the images in between) into that
// backing file, as qemu-img commit does, then empties the image unless
// opts.Drop. The backing file is grown first if it is smaller than the
// image. The data is copied in units of the base's cluster size (4 KiB to
// 64 KiB, like QEMU's mirror job): a unit is copied whole if any of it is
// allocated above the base, and units that read as zeros become zero
// writes. "Image committed." goes to out (nil for -q).
func Commit(co *coroutine.Co, opts CommitOptions, out io.Writer) error {
	if out == nil {
		out = io.Discard
	}
	progress := NewProgress(opts.Progress, 1)
	defer func() {
		if progress != nil {
			progress.End()
		}
	}()
	progress.Print(0, 100)

	top, base, err := openCommitChain(co, opts)
	if err != nil {
		return err
	}
	defer top.Close(co)

	if err := commitData(co, top, base, progress); err != nil {
		return err
	}
	if err := base.Flush(co); err != nil {
		return fmt.Errorf("Failed to flush the backing file: %s", errText(err))
	}
	if !opts.Drop {
		if e, ok := top.Driver().(bdrv.MakeEmptier); ok {
			if err := e.MakeEmpty(co); err != nil && !errors.Is(err, bdrv.ErrNotSupported) {
				return errors.New(errText(err))
			}
		}
	}
	if err := top.Close(co); err != nil {
		return fmt.Errorf("Failed to close the image: %s", errText(err))
	}
	progress.End()
	progress = nil
	fmt.Fprintf(out, "Image committed.\n")
	return nil
}

// openCommitChain opens the image read-write and its backing chain down to
// the base, read-only except for the base itself, which is opened
// read-write with its own backing chain (read-only) below it. It returns
// the image, linked to the chain, and the base.
func openCommitChain(co *coroutine.Co, opts CommitOptions) (top, base *bdrv.Node, err error) {
	top, err = openImage(co, openSpec{filename: opts.Filename, format: opts.Format, cache: opts.Cache, noBacking: true, ownBacking: true,
		unmap: true})
	if err != nil {
		return nil, nil, err
	}
	fail := func(err error) (*bdrv.Node, *bdrv.Node, error) {
		top.Close(co)
		return nil, nil, err
	}
	// The options of the image's --image-opts string reach each backing
	// file with their "backing." prefixes taken off, as bdrv.Open passes
	// them (backing.encrypt.key-secret=ID is the backing file's key).
	_, _, curOpts, err := ResolveImageName(opts.Filename)
	if err != nil {
		return fail(err)
	}
	display := displayName(opts.Filename)
	cur, curName := top, top.Filename
	for depth := 0; ; depth++ {
		if cur.BackingFile == "" {
			if opts.Base == "" {
				return fail(errors.New("Image does not have a backing file"))
			}
			return fail(fmt.Errorf("Did not find '%s' in the backing chain of '%s'", opts.Base, display))
		}
		name := bdrv.ResolveBacking(curName, cur.BackingFile)
		isBase := depth == 0 && opts.Base == ""
		if opts.Base != "" && !curOpts.BackingOverridden() {
			// A backing file given options is known by its json: name
			// only, which -b cannot match as a file name.
			isBase = sameBackingImage(curName, cur.BackingFile, opts.Base)
		}
		curOpts = curOpts.ChainOptions()
		spec := openSpec{filename: name, format: cur.BackingFormat, cache: opts.Cache,
			readOnly: true, noBacking: !isBase, unmap: true, options: curOpts}
		next, err := openImage(co, spec)
		if err != nil {
			return fail(openError(display, newBackingOpenError(name, depth, err)))
		}
		if isBase {
			// QEMU opens the whole chain read-only, then reopens the
			// base read-write for the commit job, taking the write lock
			// only then: a process writing the base fails the first
			// step ("shared" lock), one reading it the second, whose
			// error names no image.
			next.Close(co)
			spec.readOnly = false
			// ... whatever the base's read-only options say.
			spec.options = maps.Clone(curOpts)
			delete(spec.options, bdrv.OptReadOnly)
			delete(spec.options, bdrv.OptAutoReadOnly)
			if next, err = openImage(co, spec); err != nil {
				if errors.Is(err, bdrv.ErrReadOnlyNode) {
					// The base's file is read-only
					// (backing.file.read-only=on).
					return fail(bdrv.ErrReadOnlyNode)
				}
				var oe *OpenError
				if errors.Is(err, bdrv.ErrLocked) && errors.As(err, &oe) {
					return fail(oe.Err)
				}
				return fail(openError(display, newBackingOpenError(name, depth, err)))
			}
			cur.Backing = next
			return top, next, nil
		}
		cur.Backing = next
		cur, curName = next, name
	}
}

// sameBackingImage reports whether base, as given to commit -b, names the
// backing file that the image at overlay records as backing
// (bdrv_find_backing_image): protocol names compare as strings, file names
// as canonical absolute paths, each relative to the overlay's directory.
func sameBackingImage(overlay, backing, base string) bool {
	if bdrv.HasProtocol(base) || bdrv.HasProtocol(backing) {
		return base == backing || base == bdrv.ResolveBacking(overlay, backing)
	}
	a, err := filepath.EvalSymlinks(bdrv.ResolveBacking(overlay, base))
	if err != nil {
		return false
	}
	b, err := filepath.EvalSymlinks(bdrv.ResolveBacking(overlay, backing))
	if err != nil {
		return false
	}
	a, _ = filepath.Abs(a)
	b, _ = filepath.Abs(b)
	return a == b
}

// commitData copies into base what top and the images between them hold,
// the way QEMU's commit (mirror) job does: the ranges allocated above base,
// widened to base's granularity, are copied from top (zero ranges of at
// least a granule are written as zeros, which may deallocate), after base
// was grown to top's size if it is smaller.
func commitData(co *coroutine.Co, top, base *bdrv.Node, progress *Progress) error {
	size := qemuLength(top)
	if qemuLength(base) < size {
		if err := base.Truncate(co, size, false, bdrv.PreallocOff); err != nil {
			return fmt.Errorf("Could not resize the backing file to %d bytes: %s", size, errText(err))
		}
	}
	gran := int64(65536)
	if cs, ok := base.Driver().(bdrv.ClusterSizer); ok && cs.ClusterSize() > 0 {
		gran = min(max(cs.ClusterSize(), 4096), 65536)
	}

	// The ranges to copy, in granules.
	var dirty [][2]int64
	for off := int64(0); off < size; {
		alloc, n, err := top.IsAllocatedAbove(co, base, off, min(size-off, 1<<30))
		if err != nil {
			return fmt.Errorf("Could not read image metadata: %s", errText(err))
		}
		if n <= 0 {
			break
		}
		if alloc {
			s, e := alignDown(off, gran), min(alignUp(off+n, gran), size)
			if k := len(dirty) - 1; k >= 0 && dirty[k][1] >= s {
				dirty[k][1] = max(dirty[k][1], e)
			} else {
				dirty = append(dirty, [2]int64{s, e})
			}
		}
		off += n
	}
	var total, done int64
	for _, d := range dirty {
		total += d[1] - d[0]
	}

	buf := bdrv.AlignedBuffer(maxMirrorIO, max(4096, top.Limits().MinMemAlignment, base.Limits().MinMemAlignment))
	for _, d := range dirty {
		for off := d[0]; off < d[1]; {
			st, err := top.BlockStatusAbove(co, nil, true, off, d[1]-off)
			if err != nil {
				return fmt.Errorf("Could not read image metadata: %s", errText(err))
			}
			n, zero := st.Pnum, false
			if st.Flags&bdrv.StatusData != 0 {
				n = min(n, maxMirrorIO)
			}
			n -= n % gran
			if n < gran {
				n = gran
			} else if st.Flags&bdrv.StatusData == 0 {
				zero = true
			}
			n = min(n, d[1]-off)
			if zero {
				err = base.PwriteZeroes(co, off, n, bdrv.ReqMayUnmap)
			} else {
				for pos := off; pos < off+n && err == nil; pos += maxMirrorIO {
					b := buf[:min(maxMirrorIO, off+n-pos)]
					if err = top.Preadv(co, pos, bdrv.IOVec{b}, 0); err != nil {
						return fmt.Errorf("Could not read image data at offset %d: %s", pos, errText(err))
					}
					err = base.Pwritev(co, pos, bdrv.IOVec{b}, 0)
				}
			}
			if err != nil {
				return fmt.Errorf("Could not write to the backing file at offset %d: %s", off, errText(err))
			}
			off += n
			done += n
			progress.Print(float32(float64(done)/float64(total)*100), 0)
		}
	}
	progress.Print(100, 0)
	return nil
}
