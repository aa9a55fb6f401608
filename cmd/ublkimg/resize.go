package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func resizeCommand() *cli.Command {
	return &cli.Command{
		Name:      "resize",
		Usage:     "change the virtual size of an image",
		ArgsUsage: "FILE [+|-]SIZE",
		Description: "Sets FILE's virtual size to SIZE, or grows (+SIZE) or shrinks (-SIZE) it by\n" +
			"that much, as qemu-img resize does. Shrinking needs --shrink and loses the data\n" +
			"past the new end; --preallocation allocates the added part (off, metadata for\n" +
			"qcow2, falloc, full). SIZE is the last argument, so a negative one is not\n" +
			"taken for an option. An attached image (FILE, or its device /dev/ublkbN)\n" +
			"is grown by its server together with the device, where the kernel can change a\n" +
			"live device's size (Linux 6.16, UBLK_F_UPDATE_SIZE); elsewhere it is refused\n" +
			"before anything changes.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.BoolFlag{Name: "shrink", Usage: "allow the image to become smaller"},
			&cli.StringFlag{Name: "preallocation", Usage: "`MODE` of allocation of the added part: off, metadata, falloc, full"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet: print nothing but errors"},
		},
		Action: resizeAction,
	}
}

func resizeAction(c *cli.Context) error {
	opts := img.ResizeOptions{Format: c.String("f"), Shrink: c.Bool("shrink"),
		Warn: func(msg string) { fmt.Fprintf(c.App.ErrWriter, "ublkimg: %s\n", msg) }}
	if c.IsSet("preallocation") {
		p, err := bdrv.ParsePrealloc(c.String("preallocation"))
		if err != nil {
			return errors.New("Invalid preallocation mode '" + c.String("preallocation") + "'")
		}
		opts.Prealloc = p
	}
	if c.NArg() != 2 {
		return errors.New("Expecting image file name and size")
	}
	opts.Filename, opts.Size = c.Args().Get(0), c.Args().Get(1)
	// An attached image (or its device) grows through its server, which
	// grows the device with it.
	if id, ok, err := attachedDevice(opts.Filename); err != nil {
		return err
	} else if ok {
		if c.IsSet("shrink") || c.IsSet("preallocation") || c.IsSet("f") {
			return errors.New("resize of an attached image: --shrink, --preallocation and -f do not apply")
		}
		return liveResize(c, id, opts.Size)
	}
	return runCo(func(co *coroutine.Co) error {
		return img.Resize(co, opts, quietWriter(c.App.Writer, c.Bool("q")))
	})
}
