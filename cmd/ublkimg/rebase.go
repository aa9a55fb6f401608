package main

import (
	"errors"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func rebaseCommand() *cli.Command {
	return &cli.Command{
		Name:      "rebase",
		Usage:     "change the backing file of an image",
		ArgsUsage: "FILE",
		Description: "Makes BACKING the backing file of FILE, as qemu-img rebase does. In the default\n" +
			"safe mode, the ranges where the old and the new backing file differ are first\n" +
			"copied into FILE, so its content does not change; -u only rewrites the name\n" +
			"(after renaming or moving the backing file). -b \"\" removes the backing file.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Usage: "`FMT` of the image (default: probed)"},
			&cli.StringFlag{Name: "F", Usage: "`BACKING_FMT` of the new backing file"},
			&cli.StringFlag{Name: "b", Usage: "new `BACKING` file (\"\": none)"},
			&cli.BoolFlag{Name: "u", Usage: "unsafe: only change the name in the header"},
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet: print nothing but errors"},
			&cli.StringFlag{Name: "t", Usage: "`CACHE` mode of the image (default: writeback)"},
			&cli.StringFlag{Name: "T", Usage: "`SRC_CACHE` mode of the backing files (default: writeback)"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open the new backing file even if another process uses it"},
		},
		Action: rebaseAction,
	}
}

func rebaseAction(c *cli.Context) error {
	opts := img.RebaseOptions{
		Format:        c.String("f"),
		Backing:       c.String("b"),
		BackingFormat: c.String("F"),
		Unsafe:        c.Bool("u"),
		ForceShare:    c.Bool("U"),
		Cache:         bdrv.CacheWriteback,
		SourceCache:   bdrv.CacheWriteback,
	}
	if c.NArg() != 1 {
		return errors.New("Expecting one image file name")
	}
	if !opts.Unsafe && !c.IsSet("b") {
		return errors.New("Must specify backing file (-b) or use unsafe mode (-u)")
	}
	opts.Filename = c.Args().First()
	if err := cacheOption(c, "t", &opts.Cache); err != nil {
		return err
	}
	if err := cacheOption(c, "T", &opts.SourceCache); err != nil {
		return err
	}
	if c.Bool("p") && !c.Bool("q") {
		opts.Progress = c.App.Writer
	}
	return runCo(func(co *coroutine.Co) error { return img.Rebase(co, opts) })
}
