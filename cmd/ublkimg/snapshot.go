package main

import (
	"errors"

	"github.com/urfave/cli/v2"

	"ublkimg/coroutine"
	"ublkimg/img"
)

func init() { registerCommands(snapshotCommand) }

func snapshotCommand() *cli.Command {
	return &cli.Command{
		Name:      "snapshot",
		Usage:     "list, create, apply or delete internal snapshots",
		ArgsUsage: "FILE",
		Description: "Works on the internal snapshots of a qcow2 image as qemu-img snapshot does:\n" +
			"-l lists them (the default), -c NAME takes one, -a NAME reverts the image to\n" +
			"one (by ID or name), -d NAME deletes one (by name).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.BoolFlag{Name: "l", Usage: "list the snapshots"},
			&cli.StringFlag{Name: "c", Usage: "create snapshot `NAME`"},
			&cli.StringFlag{Name: "a", Usage: "apply snapshot `NAME`"},
			&cli.StringFlag{Name: "d", Usage: "delete snapshot `NAME`"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet: print nothing but errors and the list"},
		},
		Action: snapshotAction,
	}
}

func snapshotAction(c *cli.Context) error {
	opts := img.SnapshotOptions{Format: c.String("f"), Op: img.SnapshotListOp}
	n := 0
	if c.Bool("l") {
		n++
	}
	for _, f := range []string{"c", "a", "d"} {
		if c.IsSet(f) {
			n++
			opts.Op, opts.Name = img.SnapshotOp(f[0]), c.String(f)
		}
	}
	if n > 1 {
		return errors.New("Cannot mix '-l', '-a', '-c', '-d'")
	}
	if c.NArg() != 1 {
		return errors.New("Expecting one image file name")
	}
	opts.Filename = c.Args().First()
	return runCo(func(co *coroutine.Co) error {
		return img.Snapshot(co, opts, c.App.Writer)
	})
}
