package img

import (
	"errors"
	"fmt"
	"math"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// BitmapOp is an operation with its argument (the source bitmap of a
// merge).
type BitmapOp struct {
	Action bdrv.BitmapAction
	Source string
}

// BitmapOptions are qemu-img bitmap's arguments; Ops run in the order
// given.
type BitmapOptions struct {
	// Args are the operands: the image file and the bitmap name.
	Args   []string
	Format string
	Ops    []BitmapOp
	// Granularity is -g as given ("" for the default).
	Granularity string
	// SourceFile and SourceFormat are -b and -F: where merges read their
	// source bitmap (default: the image itself).
	SourceFile, SourceFormat string
}

// Bitmap runs qemu-img bitmap: the image is opened read-write and the
// operations applied in order; the first failure stops them with
// "Operation OP on bitmap NAME failed: reason", and what was done before
// it is kept. Usage errors and messages are qemu-img 7.2's.
func Bitmap(co *coroutine.Co, o BitmapOptions) error {
	if err := o.Check(); err != nil {
		return err
	}
	filename, name := o.Args[0], o.Args[1]
	gran, err := ParseBitmapGranularity(o.Granularity)
	if err != nil {
		return err
	}
	node, err := openImage(co, openSpec{filename: filename, format: o.Format, noBacking: true})
	if err != nil {
		return err
	}
	src := node
	if o.SourceFile != "" {
		if src, err = openImage(co, openSpec{filename: o.SourceFile, format: o.SourceFormat, readOnly: true, noBacking: true}); err != nil {
			node.Close(co)
			return err
		}
	}
	q, _ := node.Driver().(bdrv.PersistentBitmaps)
	for _, op := range o.Ops {
		if err = bitmapOp(co, node, q, src, op, name, gran); err != nil {
			err = fmt.Errorf("Operation %s on bitmap %s failed: %w", op.Action, name, err)
			break
		}
	}
	if src != node {
		src.Close(co)
	}
	if cerr := node.Close(co); err == nil && cerr != nil {
		err = cerr
	}
	return err
}

// Check refuses the usage errors of qemu-img bitmap's arguments, in its
// words.
func (o BitmapOptions) Check() error {
	var add, merge bool
	for _, op := range o.Ops {
		add = add || op.Action == bdrv.BitmapAdd
		merge = merge || op.Action == bdrv.BitmapMerge
	}
	switch {
	case len(o.Ops) == 0:
		return errors.New("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
	case o.Granularity != "" && !add:
		return errors.New("granularity only supported with --add")
	case o.SourceFormat != "" && o.SourceFile == "":
		return errors.New("-F only supported with -b")
	case o.SourceFile != "" && !merge:
		return errors.New("Merge bitmap source file only supported with --merge")
	case len(o.Args) != 2:
		return errors.New("Expecting filename and bitmap name")
	}
	return nil
}

// ParseBitmapGranularity parses -g ("" for the default, 0).
func ParseBitmapGranularity(s string) (uint64, error) {
	if s == "" {
		return 0, nil
	}
	g, err := ParseSizeArg("granularity", s, 0, math.MaxInt64)
	if err != nil {
		return 0, err
	}
	// QMP's granularity is a uint32: larger values wrap, and one that
	// wraps to 0 is still given (and refused), not the default.
	gran := uint64(uint32(g))
	if gran == 0 && g != 0 {
		gran = 1
	}
	return gran, nil
}

// bitmapOp applies one operation to the image's bitmaps q (nil when its
// format has none and can store none).
func bitmapOp(co *coroutine.Co, node *bdrv.Node, q bdrv.PersistentBitmaps, src *bdrv.Node, op BitmapOp, name string, gran uint64) error {
	if op.Action == bdrv.BitmapAdd && q == nil {
		if name == "" {
			return errors.New("Bitmap name cannot be empty")
		}
		return fmt.Errorf("Can't store persistent bitmaps to %s: Operation not supported", node.Filename)
	}
	if q == nil {
		return fmt.Errorf("Dirty bitmap '%s' not found", name)
	}
	switch op.Action {
	case bdrv.BitmapAdd:
		return q.AddBitmap(co, name, gran, false)
	case bdrv.BitmapRemove:
		return q.RemoveBitmap(co, name)
	case bdrv.BitmapClear:
		return q.ClearBitmap(co, name)
	case bdrv.BitmapEnable, bdrv.BitmapDisable:
		return q.SetBitmapEnabled(co, name, op.Action == bdrv.BitmapEnable)
	case bdrv.BitmapMerge:
		if err := q.CheckBitmap(co, name); err != nil {
			return err
		}
		sq, _ := src.Driver().(bdrv.PersistentBitmaps)
		if sq == nil {
			return fmt.Errorf("Dirty bitmap '%s' not found", op.Source)
		}
		data, err := sq.ExportBitmap(co, op.Source)
		if err != nil {
			return err
		}
		return q.MergeBitmap(co, name, data)
	}
	return fmt.Errorf("internal error: bitmap operation %q", op.Action)
}
