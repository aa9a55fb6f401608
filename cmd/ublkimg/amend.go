package main

import (
	"errors"

	"github.com/urfave/cli/v2"

	"ublkimg/coroutine"
	"ublkimg/img"
)

func init() { registerCommands(amendCommand) }

func amendCommand() *cli.Command {
	return &cli.Command{
		Name:      "amend",
		Usage:     "change format options of an existing image",
		ArgsUsage: "FILE",
		Description: "Changes qcow2 options in place as qemu-img amend does: compat=1.1 (upgrade\n" +
			"from 0.10), compat=0.10 (downgrade, zero clusters expanded),\n" +
			"refcount_bits=1|2|4|8|16|32|64 (new refcount structures, switched in one\n" +
			"header write), lazy_refcounts=on|off, size, data_file=NAME (images with a\n" +
			"data file only; empty removes the name), data_file_raw=off.\n" +
			"backing_file and backing_fmt may only repeat the current values (use\n" +
			"rebase to change them); options only meaningful at creation\n" +
			"(cluster_size, extended_l2, ...) are refused. LUKS key slots:\n" +
			"encrypt.state=active,encrypt.new-secret=ID[,encrypt.keyslot=N][,encrypt.iter-time=MS]\n" +
			"adds a passphrase (the image's key, from --image-opts, unlocks it);\n" +
			"encrypt.state=inactive with encrypt.keyslot=N or encrypt.old-secret=ID erases.\n" +
			"Changes are made in\n" +
			"qemu-img's order, so a failing combination stops at the same step.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.StringFlag{Name: "o", Usage: "`OPTIONS` to change, key=value,..."},
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet"},
			&cli.BoolFlag{Name: "force", Usage: "allow unsafe changes: overwrite an active key slot, erase the last ones"},
		},
		Action: amendAction,
	}
}

func amendAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return errors.New("Expecting one image file name")
	}
	opts := img.AmendOptions{Format: c.String("f"), Filename: c.Args().First(), Options: c.String("o"), Force: c.Bool("force")}
	if c.Bool("p") && !c.Bool("q") {
		opts.Progress = c.App.Writer
	}
	return runCo(func(co *coroutine.Co) error { return img.Amend(co, opts) })
}
