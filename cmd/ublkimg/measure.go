package main

import (
	"errors"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func measureCommand() *cli.Command {
	return &cli.Command{
		Name:      "measure",
		Usage:     "compute the file size an image needs",
		ArgsUsage: "[FILE]",
		Description: "Prints the file size a new image of format OUTPUT_FMT with OPTIONS needs, for\n" +
			"a virtual size of SIZE (--size) or to hold a copy of FILE, as qemu-img measure\n" +
			"does: the required size (metadata and the data clusters in use), the fully\n" +
			"allocated size, and for qcow2 copies of qcow2 images the bitmaps' size.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Usage: "output `FORMAT`: human (default) or json"},
			&cli.StringFlag{Name: "O", Usage: "`OUTPUT_FMT` of the image to measure (default: raw)"},
			&cli.StringSliceFlag{Name: "o", Usage: "`OPTIONS` of the image to measure, k=v,...; repeatable"},
			&cli.StringFlag{Name: "size", Usage: "virtual `SIZE` of a new image"},
			&cli.StringFlag{Name: "f", Usage: "`FMT` of FILE (default: probed)"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open FILE even if another process uses it"},
		},
		Action: measureAction,
	}
}

func measureAction(c *cli.Context) error {
	opts := img.MeasureOptions{OutputFormat: c.String("O"), Format: c.String("f"), Size: -1, ForceShare: c.Bool("U")}
	json, err := jsonOutput(c)
	if err != nil {
		return err
	}
	if c.IsSet("size") {
		v, err := img.ParseSizeArg("image size", c.String("size"), 0, img.MaxImageSize)
		if err != nil {
			return err
		}
		opts.Size = v
	}
	o, err := parseOptionList(c.StringSlice("o"))
	if err != nil {
		return err
	}
	opts.Options = o
	switch {
	case c.NArg() > 1:
		return errors.New("At most one filename argument is allowed.")
	case c.NArg() == 1:
		opts.Filename = c.Args().First()
	}
	switch {
	case opts.Filename == "" && opts.Format != "":
		return errors.New("--image-opts, -f, and -l require a filename argument.")
	case opts.Filename != "" && opts.Size >= 0:
		return errors.New("--size N cannot be used together with a filename.")
	case opts.Filename == "" && opts.Size < 0:
		return errors.New("Either --size N or one filename must be specified.")
	}
	var info *bdrv.MeasureInfo
	err = runCo(func(co *coroutine.Co) error {
		var err error
		info, err = img.Measure(co, opts)
		return err
	})
	if err != nil {
		return err
	}
	return img.WriteMeasure(c.App.Writer, info, json)
}
