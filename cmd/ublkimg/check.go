package main

import (
	"errors"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:      "check",
		Usage:     "check an image for consistency, and repair it",
		ArgsUsage: "FILE",
		Description: "Checks the metadata of FILE (qcow2) as qemu-img check does: every cluster's\n" +
			"reference count against the tables that use it. -r leaks frees leaked\n" +
			"clusters; -r all also repairs corruptions, then checks again. Exit status:\n" +
			"0 no errors (left), 1 the check could not be completed, 2 corruptions,\n" +
			"3 only leaked clusters, 63 the format has no check (raw).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.StringFlag{Name: "r", Aliases: []string{"repair"}, Usage: "repair `MODE`: leaks or all"},
			&cli.StringFlag{Name: "output", Value: "human", Usage: "output `FORMAT`: human or json"},
			&cli.StringFlag{Name: "T", Usage: "`SRC_CACHE` mode of the image (default: writeback)"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet: print only the checker's messages and errors"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open the image even if another process uses it"},
		},
		Action: checkAction,
	}
}

func checkAction(c *cli.Context) error {
	opts := img.CheckOptions{
		Format:     c.String("f"),
		Quiet:      c.Bool("q"),
		ForceShare: c.Bool("U"),
		Cache:      bdrv.CacheWriteback,
	}
	if c.IsSet("r") {
		r, err := img.ParseRepair(c.String("r"))
		if err != nil {
			return err
		}
		opts.Repair = r
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
	if err := cacheOption(c, "T", &opts.Cache); err != nil {
		return err
	}
	var code int
	err = runCo(func(co *coroutine.Co) error {
		var err error
		code, err = img.Check(co, opts, c.App.Writer, c.App.ErrWriter)
		return err
	})
	switch {
	case err != nil && code == img.CheckClean:
		return &exitError{img.CheckFailed, err} // the loop itself failed
	case err != nil:
		return &exitError{code, err}
	case code != img.CheckClean:
		return &exitError{code: code}
	}
	return nil
}
