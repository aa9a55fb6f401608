package main

import (
	"errors"
	"math"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func benchCommand() *cli.Command {
	return &cli.Command{
		Name:      "bench",
		Usage:     "run a simple sequential I/O benchmark on an image",
		ArgsUsage: "FILE",
		Description: "Sends COUNT read requests (write requests with -w) of BUFFER_SIZE bytes, DEPTH\n" +
			"of them in flight, the first at OFFSET and each next one STEP_SIZE further on,\n" +
			"wrapping around at the end of the image, and prints the time the run took.\n" +
			"Same options, defaults and output as qemu-img bench, so the two can be raced.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "c", Usage: "`COUNT` of requests (default: 75000)"},
			&cli.StringFlag{Name: "d", Usage: "`DEPTH`: requests in flight (default: 64)"},
			&cli.StringFlag{Name: "f", Usage: "`FMT` of the image (default: probed)"},
			&cli.StringFlag{Name: "i", Usage: "`AIO` backend: threads, native or io_uring (accepted; ublkimg always uses io_uring)"},
			&cli.BoolFlag{Name: "n", Usage: "native AIO (accepted; needs -t none or directsync, as in qemu-img)"},
			&cli.StringFlag{Name: "o", Usage: "`OFFSET` of the first request (default: 0)"},
			&cli.StringFlag{Name: "s", Usage: "`BUFFER_SIZE` of each request (default: 4K)"},
			&cli.StringFlag{Name: "S", Usage: "`STEP_SIZE` between request offsets (default: BUFFER_SIZE)"},
			&cli.StringFlag{Name: "t", Usage: "`CACHE` mode (default: writeback)"},
			&cli.BoolFlag{Name: "w", Usage: "write test (default: read)"},
			&cli.StringFlag{Name: "pattern", Usage: "`BYTE` value written by a write test (default: 0)"},
			&cli.StringFlag{Name: "flush-interval", Usage: "write tests: flush every `N` requests (N >= DEPTH)"},
			&cli.BoolFlag{Name: "no-drain", Usage: "flush without first waiting for the requests in flight"},
			&cli.BoolFlag{Name: "q", Usage: "quiet (accepted; bench prints its lines regardless, as qemu-img)"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open the image even if another process uses it"},
		},
		Action: benchAction,
	}
}

func benchAction(c *cli.Context) error {
	opts := img.BenchOptions{
		Count:      img.DefaultBenchCount,
		Depth:      img.DefaultBenchDepth,
		BufSize:    img.DefaultBenchBufSize,
		Format:     c.String("f"),
		Write:      c.Bool("w"),
		NoDrain:    c.Bool("no-drain"),
		Native:     c.Bool("n"),
		ForceShare: c.Bool("U"),
		Cache:      bdrv.CacheWriteback,
	}
	// Checked in qemu-img's order, with its messages.
	uintFlag := func(name, what string, max uint64) (int, error) {
		v, err := img.ParseUintArg(c.String(name), max)
		if err != nil {
			return 0, errors.New("Invalid " + what + " specified")
		}
		return int(v), nil
	}
	var err error
	if c.IsSet("c") {
		if opts.Count, err = uintFlag("c", "request count", math.MaxInt32); err != nil {
			return err
		}
	}
	if c.IsSet("d") {
		if opts.Depth, err = uintFlag("d", "queue depth", math.MaxInt32); err != nil {
			return err
		}
	}
	if c.IsSet("i") {
		switch a := c.String("i"); a {
		case "threads", "io_uring":
		case "native":
			opts.Native = true
		default:
			return errors.New("Invalid aio option: " + a)
		}
	}
	if c.IsSet("o") {
		if opts.Offset, err = img.ParseSizeArg("offset", c.String("o"), 0, img.MaxImageSize); err != nil {
			return err
		}
	}
	if c.IsSet("s") {
		v, err := img.ParseSizeArg("buffer size", c.String("s"), 0, math.MaxInt32)
		if err != nil {
			return err
		}
		opts.BufSize = int(v)
	}
	if c.IsSet("S") {
		v, err := img.ParseSizeArg("step_size", c.String("S"), 0, math.MaxInt32)
		if err != nil {
			return err
		}
		opts.Step = int(v)
	}
	if c.IsSet("t") {
		if opts.Cache, err = bdrv.ParseCacheMode(c.String("t")); err != nil {
			return errors.New("Invalid cache mode")
		}
	}
	if c.IsSet("pattern") {
		v, err := uintFlag("pattern", "pattern byte", 0xff)
		if err != nil {
			return err
		}
		opts.Pattern = byte(v)
	}
	if c.IsSet("flush-interval") {
		if opts.FlushInterval, err = uintFlag("flush-interval", "flush interval", math.MaxInt32); err != nil {
			return err
		}
	}
	if c.NArg() != 1 {
		return errors.New("Expecting one image file name")
	}
	opts.Filename = c.Args().First()
	return runCo(func(co *coroutine.Co) error {
		_, err := img.Bench(co, opts, c.App.Writer)
		return err
	})
}
