package main

import (
	"errors"
	"strings"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
)

func createCommand() *cli.Command {
	return &cli.Command{
		Name:      "create",
		Usage:     "create a new disk image",
		ArgsUsage: "FILE [SIZE]",
		Description: "Creates FILE, an image of format FMT (default raw) and SIZE bytes (k, M, G, T,\n" +
			"P or E suffixes: powers of 1024). SIZE may be left out when a backing file is\n" +
			"given: the new image then has the backing file's size. Prints\n" +
			"\"Formatting 'FILE', fmt=FMT size=N ...\" as qemu-img does.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Usage: "`FMT` of the new image (default: raw)"},
			&cli.StringSliceFlag{Name: "o", Usage: "format `OPTIONS`, k=v,...; repeatable ('-o help' lists them)"},
			&cli.StringFlag{Name: "b", Usage: "create a copy-on-write image over `BACKING_FILE`"},
			&cli.StringFlag{Name: "F", Usage: "`FMT` of the backing file (required with -b)"},
			&cli.BoolFlag{Name: "u", Usage: "unsafe: do not open the backing file (SIZE must then be given)"},
			&cli.BoolFlag{Name: "q", Usage: "quiet: print nothing but errors"},
		},
		Action: createAction,
	}
}

func createAction(c *cli.Context) error {
	opts, err := parseOptionList(c.StringSlice("o"))
	if err != nil {
		return err
	}
	args := c.Args().Slice()
	format := c.String("f")
	if format == "" {
		format = "raw"
	}
	if img.HasHelpOption(opts) {
		name := ""
		if len(args) > 0 {
			name = args[0]
		}
		return img.WriteCreateOptionsHelp(c.App.Writer, format, name)
	}
	if len(args) == 0 {
		return errors.New("Expecting image file name")
	}
	size := int64(-1)
	if len(args) > 1 {
		if size, err = img.ParseSizeArg("image size", args[1], 0, img.MaxImageSize); err != nil {
			return err
		}
	}
	if len(args) > 2 {
		return errors.New("Unexpected argument: " + args[2])
	}
	return runCo(func(co *coroutine.Co) error {
		return img.Create(co, img.CreateOptions{
			Filename:      args[0],
			Format:        format,
			Size:          size,
			Options:       opts,
			BackingFile:   c.String("b"),
			BackingFormat: c.String("F"),
			Unsafe:        c.Bool("u"),
			Quiet:         c.Bool("q"),
		}, c.App.Writer)
	})
}

// parseOptionList joins repeated -o lists as qemu-img does (with a comma)
// and parses them.
func parseOptionList(lists []string) (bdrv.Options, error) {
	for _, l := range lists {
		if l == "" || strings.HasPrefix(l, ",") || strings.HasSuffix(l, ",") && !strings.HasSuffix(l, ",,") {
			return nil, errors.New("Invalid option list: " + l)
		}
	}
	return bdrv.ParseOptionString(strings.Join(lists, ","))
}
