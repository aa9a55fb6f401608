package main

import (
	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func init() { registerCommands(bitmapCommand) }

// bitmapOps collects qemu-img bitmap's operations in command-line order
// (urfave keeps no order between different flags).
type bitmapOps struct{ ops []img.BitmapOp }

// opValue is the flag.Value of one operation flag: each occurrence appends
// the operation (with its argument, for --merge).
type opValue struct {
	to      *bitmapOps
	action  bdrv.BitmapAction
	withArg bool
}

func (v *opValue) String() string   { return "" }
func (v *opValue) IsBoolFlag() bool { return !v.withArg }
func (v *opValue) Set(s string) error {
	op := img.BitmapOp{Action: v.action}
	if v.withArg {
		op.Source = s
	}
	v.to.ops = append(v.to.ops, op)
	return nil
}

// opFlag is a GenericFlag that, for getopt's sake, says whether it takes
// a value.
type opFlag struct {
	*cli.GenericFlag
	withArg bool
}

func (f *opFlag) TakesValue() bool { return f.withArg }

func bitmapCommand() *cli.Command {
	ops := &bitmapOps{}
	op := func(a bdrv.BitmapAction, usage string, withArg bool) cli.Flag {
		return &opFlag{&cli.GenericFlag{Name: string(a), Usage: usage,
			Value: &opValue{to: ops, action: a, withArg: withArg}}, withArg}
	}
	return &cli.Command{
		Name:      "bitmap",
		Usage:     "add, remove, clear, enable, disable or merge persistent bitmaps",
		ArgsUsage: "FILE BITMAP",
		Description: "Changes the persistent dirty bitmaps of a qcow2 image as qemu-img bitmap does.\n" +
			"Operations run in the order given, all on BITMAP; the first failure stops\n" +
			"them. --add creates an enabled bitmap (-g sets its granularity; add --disable\n" +
			"to create it disabled); --merge SRC sets every bit set in bitmap SRC, of FILE\n" +
			"or of the image -b names. FILE may be an attached image or its device\n" +
			"(/dev/ublkbN): its server then makes the changes between two requests.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			op(bdrv.BitmapAdd, "create the bitmap", false),
			op(bdrv.BitmapRemove, "delete the bitmap", false),
			op(bdrv.BitmapClear, "clear every bit", false),
			op(bdrv.BitmapEnable, "track writes", false),
			op(bdrv.BitmapDisable, "stop tracking writes", false),
			op(bdrv.BitmapMerge, "merge bitmap `SRC` into it", true),
			&cli.StringFlag{Name: "g", Aliases: []string{"granularity"}, Usage: "`GRANULARITY` of a new bitmap (power of 2, at least 512)"},
			&cli.StringFlag{Name: "b", Aliases: []string{"source-file"}, Usage: "image `SRC_FILE` holding the --merge source"},
			&cli.StringFlag{Name: "F", Aliases: []string{"source-format"}, Usage: "`SRC_FMT` of -b's image"},
		},
		Action: func(c *cli.Context) error {
			o := img.BitmapOptions{Args: c.Args().Slice(), Format: c.String("f"), Ops: ops.ops,
				Granularity: c.String("g"), SourceFile: c.String("b"), SourceFormat: c.String("F")}
			// An attached image (or its device) is changed by its
			// server, between two of its requests.
			if len(o.Args) == 2 && len(o.Ops) > 0 {
				if id, ok, err := attachedDevice(o.Args[0]); err != nil {
					return err
				} else if ok {
					return liveBitmap(c, id, o.Args[1], o)
				}
			}
			return runCo(func(co *coroutine.Co) error { return img.Bitmap(co, o) })
		},
	}
}
