package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func convertCommand() *cli.Command {
	return &cli.Command{
		Name:      "convert",
		Usage:     "copy an image, possibly into another format",
		ArgsUsage: "SRC [SRC2...] DST",
		Description: "Copies SRC (several SRCs are concatenated) into a new image DST of format\n" +
			"OUTPUT_FMT. Ranges that read as zeros are not written, so DST is sparse; -S sets\n" +
			"how long a run of zero bytes inside data must be to be left out (default 4k;\n" +
			"0 writes everything, fully allocating DST). If anything fails after DST was\n" +
			"created, DST is removed.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Usage: "`FMT` of the source images (default: probed)"},
			&cli.StringFlag{Name: "O", Usage: "`OUTPUT_FMT` of the new image (default: raw)"},
			&cli.StringSliceFlag{Name: "o", Usage: "`OPTIONS` for the new image, k=v,...; repeatable ('-o help' lists them)"},
			&cli.BoolFlag{Name: "c", Usage: "compress the output clusters (formats with compression only)"},
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "q", Usage: "quiet: print nothing but errors"},
			&cli.StringFlag{Name: "S", Usage: "`SPARSE_SIZE`: zero runs this long (a multiple of 512, up to 16M) are not written; 0 disables"},
			&cli.StringFlag{Name: "m", Usage: "`NUM_COROUTINES` copying in parallel, 1 to 16 (default: 8)"},
			&cli.BoolFlag{Name: "W", Usage: "allow out-of-order writes"},
			&cli.BoolFlag{Name: "n", Usage: "do not create DST: write into the existing image"},
			&cli.BoolFlag{Name: "target-is-zero", Usage: "with -n: DST reads as zeros, so zero ranges need no writing"},
			&cli.StringFlag{Name: "t", Usage: "`CACHE` mode of the output (default: unsafe)"},
			&cli.StringFlag{Name: "T", Usage: "`SRC_CACHE` mode of the sources (default: writeback)"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open the sources even if another process uses them"},
			&cli.BoolFlag{Name: "bitmaps", Usage: "copy the persistent bitmaps (qcow2 to qcow2)"},
			&cli.BoolFlag{Name: "skip-broken-bitmaps", Usage: "with --bitmaps: skip inconsistent bitmaps instead of failing"},
		},
		Action: convertAction,
	}
}

func convertAction(c *cli.Context) error {
	opts := img.ConvertOptions{
		SourceFormat: c.String("f"),
		TargetFormat: c.String("O"),
		Compress:     c.Bool("c"),
		SparseSize:   img.DefaultSparseSize,
		Coroutines:   img.DefaultCoroutines,
		OutOfOrder:   c.Bool("W"),
		NoCreate:     c.Bool("n"),
		TargetIsZero: c.Bool("target-is-zero"),
		ForceShare:   c.Bool("U"),
		SourceCache:  bdrv.CacheWriteback,
		TargetCache:  bdrv.CacheUnsafe,
		Bitmaps:      c.Bool("bitmaps"),
		SkipBroken:   c.Bool("skip-broken-bitmaps"),
		Warn:         func(msg string) { fmt.Fprintf(c.App.ErrWriter, "ublkimg: warning: %s\n", msg) },
	}
	if opts.SkipBroken && !opts.Bitmaps {
		return errors.New("Use of --skip-broken-bitmaps requires --bitmaps")
	}
	if opts.TargetFormat == "" {
		opts.TargetFormat = "raw"
	}
	if s := c.String("S"); c.IsSet("S") {
		v, err := img.ParseSizeArg("buffer size for sparse output", s, 0, img.MaxImageSize)
		if err != nil {
			return err
		}
		if v%512 != 0 || v > img.MaxSparseSize {
			return errors.New("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).")
		}
		opts.SparseSize = v
	}
	if c.IsSet("m") {
		v, err := img.ParseUintArg(c.String("m"), img.MaxCoroutines)
		if err != nil || v < 1 {
			return errors.New("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
		}
		opts.Coroutines = int(v)
	}
	o, err := parseOptionList(c.StringSlice("o"))
	if err != nil {
		return err
	}
	args := c.Args().Slice()
	if img.HasHelpOption(o) {
		name := ""
		if len(args) > 0 {
			name = args[len(args)-1]
		}
		return img.WriteCreateOptionsHelp(c.App.Writer, opts.TargetFormat, name)
	}
	if len(o) > 0 {
		opts.Options = o
	}
	if len(args) < 2 {
		return errors.New("Must specify image file name")
	}
	opts.Sources, opts.Target = args[:len(args)-1], args[len(args)-1]
	if err := cacheOption(c, "T", &opts.SourceCache); err != nil {
		return err
	}
	if err := cacheOption(c, "t", &opts.TargetCache); err != nil {
		return err
	}
	if c.Bool("p") && !c.Bool("q") {
		opts.Progress = c.App.Writer
	}
	return runCo(func(co *coroutine.Co) error { return img.Convert(co, opts) })
}
