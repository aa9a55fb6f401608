package main

import (
	"errors"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func compareCommand() *cli.Command {
	return &cli.Command{
		Name:      "compare",
		Usage:     "check whether two images have the same content",
		ArgsUsage: "FILE1 FILE2",
		Description: "Compares the content two images present, whatever their formats. Exit status:\n" +
			"0 identical, 1 different (\"Content mismatch at offset N!\"), 2 an image could not\n" +
			"be opened, 3 an allocation query failed, 4 a read failed. Images of different\n" +
			"sizes are identical if the larger one's extra part reads as zeros (after\n" +
			"\"Warning: Image size mismatch!\"), unless -s asks for strict mode.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Usage: "`FMT` of FILE1 (default: probed)"},
			&cli.StringFlag{Name: "F", Usage: "`FMT` of FILE2 (default: probed)"},
			&cli.BoolFlag{Name: "s", Usage: "strict: sizes and allocation (block status) must match too"},
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "q", Usage: "quiet: print nothing, only set the exit status"},
			&cli.StringFlag{Name: "T", Usage: "`SRC_CACHE` mode of the images (default: writeback)"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open the images even if another process uses them"},
		},
		Action: compareAction,
	}
}

func compareAction(c *cli.Context) error {
	if c.NArg() != 2 {
		return errors.New("Expecting two image file names")
	}
	opts := img.CompareOptions{
		Filename1:  c.Args().Get(0),
		Filename2:  c.Args().Get(1),
		Format1:    c.String("f"),
		Format2:    c.String("F"),
		Strict:     c.Bool("s"),
		ForceShare: c.Bool("U"),
		Cache:      bdrv.CacheWriteback,
	}
	quiet := c.Bool("q")
	if c.Bool("p") && !quiet {
		opts.Progress = c.App.Writer
	}
	if err := cacheOption(c, "T", &opts.Cache); err != nil {
		return &exitError{img.CompareOpenError, err}
	}
	var code int
	err := runCo(func(co *coroutine.Co) error {
		var err error
		code, err = img.Compare(co, opts, quietWriter(c.App.Writer, quiet))
		return err
	})
	if err != nil {
		if code == img.CompareIdentical {
			code = img.CompareOpenError // the loop itself failed
		}
		return &exitError{code, err}
	}
	if code != img.CompareIdentical {
		return &exitError{code: code}
	}
	return nil
}
