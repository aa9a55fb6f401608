package img

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// RebaseOptions are qemu-img rebase's arguments.
type RebaseOptions struct {
	Filename string
	Format   string // -f; "" probes
	// Backing (-b) is the new backing file, as it will be recorded
	// (relative names are relative to the image's directory); "" removes
	// the backing file. BackingFormat (-F) is its format.
	Backing, BackingFormat string
	// Unsafe (-u) only rewrites the name in the header, without opening
	// either backing file.
	Unsafe bool
	// Cache (-t) is the image's cache mode, SourceCache (-T) the backing
	// files'.
	Cache, SourceCache bdrv.CacheMode
	ForceShare         bool
	// Progress, if not nil, receives -p's progress line.
	Progress io.Writer
}

// Rebase changes the backing file of an image as qemu-img rebase does. In
// safe mode (the default) every range the image does not allocate itself
// and where the old and the new backing file differ is first copied from
// the old backing file into the image (as zeros where the old one reads
// past its end), so the image reads the same afterwards; a new backing
// file that is already in the image's chain is reused, and only the ranges
// changed above it are compared. With opts.Unsafe only the header changes.
func Rebase(co *coroutine.Co, opts RebaseOptions) error {
	progress := NewProgress(opts.Progress, 2)
	defer progress.End()
	progress.Print(0, 100)

	n, err := openImage(co, openSpec{filename: opts.Filename, format: opts.Format, cache: opts.Cache, noBacking: opts.Unsafe})
	if err != nil {
		return err
	}
	defer n.Close(co)
	if opts.BackingFormat != "" {
		if _, err := bdrv.LookupFormat(opts.BackingFormat); err != nil {
			return fmt.Errorf("Invalid format name: '%s'", opts.BackingFormat)
		}
	}
	if !opts.Unsafe {
		if err := rebaseCopy(co, n, opts, progress); err != nil {
			return err
		}
	}

	var ret error
	if opts.Backing != "" && opts.BackingFormat == "" {
		ret = unix.EINVAL // bdrv_change_backing_file's "require"
	} else if c, ok := n.Driver().(bdrv.BackingFileChanger); !ok {
		ret = unix.ENOTSUP
	} else if opts.Backing != "" {
		ret = c.ChangeBackingFile(co, opts.Backing, opts.BackingFormat)
	} else {
		ret = c.ChangeBackingFile(co, "", "")
	}
	switch {
	case ret == nil:
	case errors.Is(ret, unix.ENOSPC):
		return fmt.Errorf("Could not change the backing file to '%s': No space left in the file header", opts.Backing)
	case errors.Is(ret, unix.EINVAL) && opts.Backing != "" && opts.BackingFormat == "":
		return fmt.Errorf("Could not change the backing file to '%s': backing format must be specified", opts.Backing)
	default:
		return fmt.Errorf("Could not change the backing file to '%s': %s", opts.Backing, Strerror(ret))
	}
	progress.Print(100, 0)
	if err := n.Close(co); err != nil {
		return fmt.Errorf("Failed to close '%s': %s", displayName(opts.Filename), errText(err))
	}
	return nil
}

// rebaseCopy is safe mode's copy: for each range of n that n itself does
// not allocate, compare the old backing chain (n.Backing) with the new
// one and write the old content where they differ.
func rebaseCopy(co *coroutine.Co, n *bdrv.Node, opts RebaseOptions, progress *Progress) error {
	old := n.Backing
	var newB, prefix *bdrv.Node
	if opts.Backing != "" {
		path := pathCombine(n.Filename, opts.Backing)
		// A new backing file from the image's own chain is reused; one
		// opened with options of its own (--image-opts backing.*) is known
		// by its json: name only, which -b does not match as a file name.
		_, _, o, err := ResolveImageName(opts.Filename)
		if err != nil {
			return err
		}
		name := n.Filename
		for p := n; p != nil && p.Backing != nil && !o.BackingOverridden(); p = p.Backing {
			if sameBackingImage(name, p.BackingFile, opts.Backing) {
				prefix = p.Backing
				break
			}
			name, o = pathCombine(name, p.BackingFile), o.ChainOptions()
		}
		if prefix != nil {
			newB = prefix
		} else {
			s := openSpec{filename: path, format: opts.BackingFormat, cache: opts.SourceCache, readOnly: true}
			if opts.ForceShare {
				s.options = bdrv.Options{bdrv.OptForceShare: "on"}
			}
			b, err := openImage(co, s)
			if err != nil {
				return &wordedError{fmt.Sprintf("Could not open new backing file '%s': %s", opts.Backing, backingReason(path, err)), err}
			}
			defer b.Close(co)
			newB = b
		}
	}

	size := qemuLength(n)
	var oldSize, newSize int64
	if old != nil {
		oldSize = qemuLength(old)
	}
	if newB != nil {
		newSize = qemuLength(newB)
	}
	var step float32
	if size != 0 {
		step = float32(100) / float32(size/min(size, ioBufSize))
	}
	align := max(4096, n.Limits().MinMemAlignment)
	bufOld, bufNew := bdrv.AlignedBuffer(ioBufSize, align), bdrv.AlignedBuffer(ioBufSize, align)
	for off := int64(0); off < size; {
		chunk := min(ioBufSize, size-off)
		alloc, pnum, err := n.IsAllocatedAbove(co, n.Backing, off, chunk)
		if err != nil {
			return fmt.Errorf("error while reading image metadata: %s", errText(err))
		}
		if pnum > 0 {
			chunk = pnum
		}
		if alloc {
			off += chunk
			continue
		}
		if prefix != nil {
			// Unchanged since the new backing file: nothing to do.
			alloc, pnum, err := n.Backing.IsAllocatedAbove(co, prefix, off, chunk)
			if err != nil {
				return fmt.Errorf("error while reading image metadata: %s", errText(err))
			}
			if pnum > 0 { // 0: past the end of the backing file, unchanged zeros
				chunk = pnum
			}
			if !alloc {
				off += chunk
				continue
			}
		}
		oldZero := false
		if off >= oldSize {
			clear(bufOld[:chunk])
			oldZero = true
		} else {
			chunk = min(chunk, oldSize-off)
			if err := old.Preadv(co, off, bdrv.IOVec{bufOld[:chunk]}, 0); err != nil {
				return errors.New("error while reading from old backing file")
			}
		}
		if newB == nil || off >= newSize {
			clear(bufNew[:chunk])
		} else {
			chunk = min(chunk, newSize-off)
			if err := newB.Preadv(co, off, bdrv.IOVec{bufNew[:chunk]}, 0); err != nil {
				return errors.New("error while reading from new backing file")
			}
		}
		for done := int64(0); done < chunk; {
			differ, same := compareSectors(bufOld[done:chunk], bufNew[done:chunk])
			if differ {
				var err error
				if oldZero {
					err = n.PwriteZeroes(co, off+done, same, 0)
				} else {
					err = n.Pwritev(co, off+done, bdrv.IOVec{bufOld[done : done+same]}, 0)
				}
				if err != nil {
					return fmt.Errorf("Error while writing to COW image: %s", Strerror(err))
				}
			}
			done += same
		}
		off += chunk
		progress.Print(step, 100)
	}
	return nil
}

// compareSectors is qemu-img's compare_buffers: whether the first 512-byte
// sector of a and b differs, and how many bytes from the start share that
// answer.
func compareSectors(a, b []byte) (differ bool, n int64) {
	l := int64(len(a))
	i := min(l, sectorSize)
	differ = !bytes.Equal(a[:i], b[:i])
	for i < l {
		e := min(l, i+sectorSize)
		if !bytes.Equal(a[i:e], b[i:e]) != differ {
			break
		}
		i = e
	}
	return differ, i
}
