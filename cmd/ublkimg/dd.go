package main

import (
	"github.com/urfave/cli/v2"

	"ublkimg/coroutine"
	"ublkimg/img"
)

func ddCommand() *cli.Command {
	return &cli.Command{
		Name:      "dd",
		Usage:     "copy part of an image into a new image",
		ArgsUsage: "[bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT",
		Description: "Creates OUTPUT (format OUTPUT_FMT) and copies INPUT into it block by block, as\n" +
			"qemu-img dd does: bs= is the block size (default 512), skip= the number of\n" +
			"blocks left out at the start, count= the length of the input in blocks\n" +
			"(counted from its start, skipped blocks included).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Usage: "`FMT` of INPUT (default: probed)"},
			&cli.StringFlag{Name: "O", Usage: "`OUTPUT_FMT` of OUTPUT (default: raw)"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open INPUT even if another process uses it"},
		},
		Action: ddAction,
	}
}

func ddAction(c *cli.Context) error {
	opts := img.DDOptions{Format: c.String("f"), OutputFormat: c.String("O"), ForceShare: c.Bool("U"), Warn: c.App.ErrWriter}
	if err := img.ParseDDOperands(c.Args().Slice(), &opts); err != nil {
		return err
	}
	return runCo(func(co *coroutine.Co) error { return img.DD(co, opts) })
}
