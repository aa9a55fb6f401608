package main

import (
	"errors"
	"math"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func commitCommand() *cli.Command {
	return &cli.Command{
		Name:      "commit",
		Usage:     "merge an image into its backing file",
		ArgsUsage: "FILE",
		Description: "Copies what FILE holds into its backing file (or, with -b, into BASE further\n" +
			"down the chain, together with the images in between), as qemu-img commit does,\n" +
			"then empties FILE unless -d (or -b) is given.\n" +
			"--live DEV commits the image an attached device serves (an overlay) into its\n" +
			"backing file while the device is in use, then makes the device serve the\n" +
			"backing file (QEMU's active commit); the overlay is left as it was.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.StringFlag{Name: "b", Usage: "`BASE` image of the backing chain to commit into (implies -d)"},
			&cli.BoolFlag{Name: "d", Usage: "do not empty FILE after committing it"},
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet: print nothing but errors"},
			&cli.StringFlag{Name: "t", Usage: "`CACHE` mode of the images (default: writeback)"},
			&cli.StringFlag{Name: "r", Usage: "`RATE` limit in bytes per second (accepted, not enforced)"},
			&cli.BoolFlag{Name: "live", Usage: "commit the overlay an attached device serves into its backing file while in use: ublkimg commit --live [-p] DEV"},
		},
		Action: commitAction,
	}
}

func commitAction(c *cli.Context) error {
	if c.Bool("live") {
		return liveCommit(c)
	}
	opts := img.CommitOptions{
		Format: c.String("f"),
		Base:   c.String("b"),
		Drop:   c.Bool("d") || c.IsSet("b"),
		Cache:  bdrv.CacheWriteback,
	}
	if c.IsSet("r") {
		if _, err := img.ParseSizeArg("rate limit", c.String("r"), 0, math.MaxInt64); err != nil {
			return err
		}
	}
	quiet := c.Bool("q")
	if c.NArg() != 1 {
		return errors.New("Expecting one image file name")
	}
	opts.Filename = c.Args().First()
	if err := cacheOption(c, "t", &opts.Cache); err != nil {
		return err
	}
	if c.Bool("p") && !quiet {
		opts.Progress = c.App.Writer
	}
	return runCo(func(co *coroutine.Co) error {
		return img.Commit(co, opts, quietWriter(c.App.Writer, quiet))
	})
}
