package main

import (
	"errors"
	"math"

	"github.com/urfave/cli/v2"

	"ublkimg/coroutine"
	"ublkimg/img"
)

func mapCommand() *cli.Command {
	return &cli.Command{
		Name:      "map",
		Usage:     "show where an image's data is",
		ArgsUsage: "FILE",
		Description: "Prints the allocation map of FILE and its backing chain, as qemu-img map does:\n" +
			"the extents holding data and where they are stored (human), or every extent\n" +
			"with its status and the layer of the chain that provides it (--output json).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.StringFlag{Name: "output", Usage: "output `FORMAT`: human (default) or json"},
			&cli.StringFlag{Name: "s", Aliases: []string{"start-offset"}, Usage: "start the map at `OFFSET`"},
			&cli.StringFlag{Name: "l", Aliases: []string{"max-length"}, Usage: "map at most `LENGTH` bytes"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open the image even if another process uses it"},
		},
		Action: mapAction,
	}
}

func mapAction(c *cli.Context) error {
	opts := img.MapOptions{Format: c.String("f"), ForceShare: c.Bool("U"), MaxLength: -1}
	// qemu-img checks the numbers while it reads the options, in the
	// order given; both must be well formed.
	if c.IsSet("s") {
		v, err := img.ParseSizeArg("start offset", c.String("s"), 0, math.MaxInt64)
		if err != nil {
			return err
		}
		opts.StartOffset = v
	}
	if c.IsSet("l") {
		v, err := img.ParseSizeArg("max length", c.String("l"), 0, math.MaxInt64)
		if err != nil {
			return err
		}
		opts.MaxLength = v
	}
	if c.NArg() != 1 {
		return errors.New("Expecting one image file name")
	}
	opts.Filename = c.Args().First()
	json, err := jsonOutput(c)
	if err != nil {
		return err
	}
	opts.JSON = json
	return runCo(func(co *coroutine.Co) error { return img.Map(co, opts, c.App.Writer) })
}
