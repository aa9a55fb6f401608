package jobs

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// BitmapOp is one operation: Granularity and Disabled are add's, Source
// is the bitmap a merge reads.
type BitmapOp struct {
	Action      bdrv.BitmapAction `json:"action"`
	Granularity uint64            `json:"granularity,omitempty"`
	Disabled    bool              `json:"disabled,omitempty"`
	Source      string            `json:"source,omitempty"`
}

// BitmapSource is the image whose bitmaps merges read (qemu-img bitmap's
// -b and -F): File "" (or the file of the image the device serves) for
// that image itself, another image opened read-only otherwise.
type BitmapSource struct {
	File   string `json:"file,omitempty"`
	Format string `json:"format,omitempty"`
}

// Bitmap applies ops in order to bitmap name of the image the device
// serves, as qemu-img bitmap does to an image file: the first failure
// stops them ("Operation OP on bitmap NAME failed: reason"). The device
// pauses around them, so that each takes effect between two guest
// requests: a bitmap cleared or enabled records exactly the writes that
// complete after it, a merge sets what the source marked at that moment.
// Merges read their source bitmap from src. Changes are stored when the
// image is closed, as QEMU's.
func Bitmap(ctx context.Context, dev Device, name string, ops []BitmapOp, src BitmapSource) error {
	if len(ops) == 0 {
		return errors.New("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
	}
	image := bdrv.Unfiltered(dev.Node())
	if image == nil {
		return errors.New("the device serves no image")
	}
	bm, ok := image.Driver().(bdrv.PersistentBitmaps)
	return coroutine.Run(func(co *coroutine.Co) error {
		source, err := openBitmapSource(co, image, src)
		if err != nil {
			return err
		}
		if source != image {
			defer source.Close(co)
		}
		if err := pause(co, ctx, dev); err != nil {
			return err
		}
		defer dev.Resume()
		for _, op := range ops {
			var err error
			switch {
			case !ok && op.Action == bdrv.BitmapAdd && name == "":
				err = errors.New("Bitmap name cannot be empty")
			case !ok && op.Action == bdrv.BitmapAdd:
				err = fmt.Errorf("Can't store persistent bitmaps to %s: Operation not supported", image.Filename)
			case !ok:
				err = fmt.Errorf("Dirty bitmap '%s' not found", name)
			case op.Action == bdrv.BitmapAdd:
				err = bm.AddBitmap(co, name, op.Granularity, op.Disabled)
			case op.Action == bdrv.BitmapRemove:
				err = bm.RemoveBitmap(co, name)
			case op.Action == bdrv.BitmapClear:
				err = bm.ClearBitmap(co, name)
			case op.Action == bdrv.BitmapEnable, op.Action == bdrv.BitmapDisable:
				err = bm.SetBitmapEnabled(co, name, op.Action == bdrv.BitmapEnable)
			case op.Action == bdrv.BitmapMerge:
				err = mergeBitmap(co, bm, name, source, op.Source)
			default:
				err = fmt.Errorf("unknown bitmap operation '%s'", op.Action)
			}
			if err != nil {
				if op.Action != bdrv.BitmapAdd {
					err = inBacking(co, image, name, err)
				}
				return fmt.Errorf("Operation %s on bitmap %s failed: %w", op.Action, name, err)
			}
		}
		return nil
	})
}

// openBitmapSource opens the image whose bitmaps merges read: image
// itself, unless src names another file, opened read-only without its
// backing file as qemu-img bitmap -b opens it.
func openBitmapSource(co *coroutine.Co, image *bdrv.Node, src BitmapSource) (*bdrv.Node, error) {
	if src.File == "" {
		return image, nil
	}
	a, aerr := filepath.Abs(src.File)
	b, berr := filepath.Abs(image.Filename)
	if aerr == nil && berr == nil && a == b {
		return image, nil
	}
	return bdrv.Open(co, bdrv.Spec{Filename: src.File, Format: src.Format, ReadOnly: true, NoBacking: true})
}

// mergeBitmap merges bitmap source of image src into bitmap dst (QEMU's
// block-dirty-bitmap-merge, in qemu-img bitmap --merge's order of checks).
func mergeBitmap(co *coroutine.Co, bm bdrv.PersistentBitmaps, dst string, src *bdrv.Node, source string) error {
	if err := bm.CheckBitmap(co, dst); err != nil {
		return err
	}
	sq, ok := src.Driver().(bdrv.PersistentBitmaps)
	if !ok {
		return fmt.Errorf("Dirty bitmap '%s' not found", source)
	}
	data, err := sq.ExportBitmap(co, source)
	if err != nil {
		return err
	}
	return bm.MergeBitmap(co, dst, data)
}

// inBacking returns err, the refusal of bitmap name that image does not
// hold, with where the bitmap is when a backing file of image holds it: a
// live snapshot leaves the image's bitmaps in it (as QEMU's
// blockdev-snapshot-sync leaves them on the node that becomes the
// backing one), read-only from then on, recording no write.
func inBacking(co *coroutine.Co, image *bdrv.Node, name string, err error) error {
	if !errors.Is(err, unix.ENOENT) && !strings.HasPrefix(err.Error(), "Dirty bitmap '"+name+"' not found") {
		return err
	}
	for b := image.Backing; b != nil; b = b.Backing {
		q, ok := b.Driver().(bdrv.PersistentBitmaps)
		if !ok {
			continue
		}
		list, lerr := q.DirtyBitmaps(co)
		if lerr != nil {
			continue
		}
		for _, bm := range list {
			if bm.Name == name {
				return fmt.Errorf("%w: it is in the backing file '%s', read-only since a live snapshot and recording no writes (ublkimg bitmap --add adds one to '%s')",
					err, b.Filename, image.Filename)
			}
		}
	}
	return err
}
