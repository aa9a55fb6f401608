package main

import (
	"errors"
	"fmt"

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
			"one (by ID or name), -d NAME deletes one (by name).\n" +
			"--live DEV OVERLAY takes an external snapshot of an attached device while it is\n" +
			"in use: OVERLAY, a new qcow2 image backed by the device's image, becomes the\n" +
			"device's image, and the old image its read-only backing file.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.BoolFlag{Name: "l", Usage: "list the snapshots"},
			&cli.StringFlag{Name: "c", Usage: "create snapshot `NAME`"},
			&cli.StringFlag{Name: "a", Usage: "apply snapshot `NAME`"},
			&cli.StringFlag{Name: "d", Usage: "delete snapshot `NAME`"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet: print nothing but errors and the list"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: list the snapshots of an image another process uses (-l only)"},
			&cli.BoolFlag{Name: "live", Usage: "external snapshot of an attached device: ublkimg snapshot --live DEV OVERLAY"},
		},
		Action: snapshotAction,
	}
}

func snapshotAction(c *cli.Context) error {
	if c.Bool("live") {
		if f := setFlag(c, "l", "c", "a", "d", "f", "U", "image-opts"); f != "" {
			return fmt.Errorf("snapshot --live: %s does not apply to a live snapshot", f)
		}
		return liveSnapshot(c)
	}
	opts := img.SnapshotOptions{Format: c.String("f"), Op: img.SnapshotListOp, ForceShare: c.Bool("U")}
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
