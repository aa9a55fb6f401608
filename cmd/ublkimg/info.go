package main

import (
	"errors"

	"github.com/urfave/cli/v2"

	"ublkimg/coroutine"
	"ublkimg/img"
)

func infoCommand() *cli.Command {
	return &cli.Command{
		Name:      "info",
		Usage:     "show information about a disk image",
		ArgsUsage: "FILE",
		Description: "Prints FILE's format, virtual size, disk size (host space used), cluster size,\n" +
			"backing file and format-specific details, as qemu-img info does. --output json\n" +
			"prints the same data with qemu-img's JSON field names and layout.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Usage: "`FMT` of the image (default: probed)"},
			&cli.StringFlag{Name: "output", Value: "human", Usage: "output `FORMAT`: human or json"},
			&cli.BoolFlag{Name: "backing-chain", Usage: "also show every image of the backing chain"},
			&cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "force share: open the image even if another process uses it"},
		},
		Action: infoAction,
	}
}

func infoAction(c *cli.Context) error {
	json, err := jsonOutput(c)
	if err != nil {
		return err
	}
	if c.NArg() != 1 {
		return errors.New("Expecting one image file name")
	}
	chain := c.Bool("backing-chain")
	var infos []*img.ImageInfo
	err = runCo(func(co *coroutine.Co) error {
		var err error
		infos, err = img.Info(co, img.InfoOptions{
			Filename:     c.Args().First(),
			Format:       c.String("f"),
			BackingChain: chain,
			ForceShare:   c.Bool("U"),
		})
		return err
	})
	if err != nil {
		return err
	}
	if json {
		return img.WriteInfoJSON(c.App.Writer, infos, chain)
	}
	return img.WriteInfoHuman(c.App.Writer, infos)
}
