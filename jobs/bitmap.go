package jobs

import (
	"context"
	"errors"
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// BitmapAction is an operation on a persistent bitmap of a device's image,
// named as qemu-img bitmap's options.
type BitmapAction string

// The operations Bitmap runs.
const (
	BitmapAdd     BitmapAction = "add"
	BitmapRemove  BitmapAction = "remove"
	BitmapClear   BitmapAction = "clear"
	BitmapEnable  BitmapAction = "enable"
	BitmapDisable BitmapAction = "disable"
)

// BitmapOp is one operation: Granularity and Disabled are add's.
type BitmapOp struct {
	Action      BitmapAction `json:"action"`
	Granularity uint64       `json:"granularity,omitempty"`
	Disabled    bool         `json:"disabled,omitempty"`
}

// Bitmap applies ops in order to bitmap name of the image the device
// serves, as qemu-img bitmap does to an image file: the first failure
// stops them ("Operation OP on bitmap NAME failed: reason"). The device
// pauses around them, so that each takes effect between two guest
// requests: a bitmap cleared or enabled records exactly the writes that
// complete after it. Changes are stored when the image is closed, as
// QEMU's.
func Bitmap(ctx context.Context, dev Device, name string, ops []BitmapOp) error {
	if len(ops) == 0 {
		return errors.New("Need at least one of --add, --remove, --clear, --enable, --disable")
	}
	image := bdrv.Unfiltered(dev.Node())
	if image == nil {
		return errors.New("the device serves no image")
	}
	bm, ok := image.Driver().(bdrv.PersistentBitmaps)
	return coroutine.Run(func(co *coroutine.Co) error {
		if err := pause(co, ctx, dev); err != nil {
			return err
		}
		defer dev.Resume()
		for _, op := range ops {
			var err error
			switch {
			case !ok && op.Action == BitmapAdd && name == "":
				err = errors.New("Bitmap name cannot be empty")
			case !ok && op.Action == BitmapAdd:
				err = fmt.Errorf("Can't store persistent bitmaps to %s: Operation not supported", image.Filename)
			case !ok:
				err = fmt.Errorf("Dirty bitmap '%s' not found", name)
			case op.Action == BitmapAdd:
				err = bm.AddBitmap(co, name, op.Granularity, op.Disabled)
			case op.Action == BitmapRemove:
				err = bm.RemoveBitmap(co, name)
			case op.Action == BitmapClear:
				err = bm.ClearBitmap(co, name)
			case op.Action == BitmapEnable, op.Action == BitmapDisable:
				err = bm.SetBitmapEnabled(co, name, op.Action == BitmapEnable)
			default:
				err = fmt.Errorf("unknown bitmap operation '%s'", op.Action)
			}
			if err != nil {
				return fmt.Errorf("Operation %s on bitmap %s failed: %w", op.Action, name, err)
			}
		}
		return nil
	})
}
