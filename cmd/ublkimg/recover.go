package main

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/img"
	"ublkimg/ublk"
)

func recoverCommand() *cli.Command {
	return &cli.Command{
		Name:      "recover",
		Usage:     "serve again a device whose server died (attached with --recovery)",
		ArgsUsage: "DEV|ID [IMG|OPTIONS]",
		Description: "Attaches a new server to /dev/ublkbN (or device number N), whose server died while\n" +
			"the kernel kept the device and held its I/O (attach --recovery; list shows it\n" +
			"\"quiesced\"). The image, its format, cache mode and discard mode come from the\n" +
			"device's record; IMG, if given, must be that image. Prints the device once it is\n" +
			"live again and serves it in the background, as attach does. An image attached\n" +
			"with --image-opts is reopened with its recorded option string, or with the\n" +
			"--image-opts string given, which must name the same file and format; the\n" +
			"secrets it names must be given again with --object.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "foreground", Usage: "serve in this process until SIGTERM or SIGINT"},
			// restart's server: the running server hands the device over.
			&cli.BoolFlag{Name: "handover", Hidden: true},
		},
		Action: recoverAction,
	}
}

func recoverAction(c *cli.Context) error {
	if c.NArg() < 1 || c.NArg() > 2 {
		return errors.New("recover: expecting a device and optionally its image (ublkimg recover DEV|ID [IMG])")
	}
	id, err := ublk.ParseDeviceID(c.Args().Get(0))
	if err != nil {
		return err
	}
	image := c.Args().Get(1)
	o, err := recoverOptions(id, image, c.Bool("handover"))
	if err != nil {
		return err
	}
	if o.handover {
		if !c.Bool("foreground") {
			return errors.New("recover: --handover is for the server restart starts")
		}
		return serveForeground(o)
	}
	// What the kernel says about the device comes first: the image may
	// well be locked by whoever replaced a device that cannot recover.
	return runServer(c, o, image, func() error {
		ctrl, err := ublk.OpenCtrl()
		if err != nil {
			return err
		}
		defer ctrl.Close()
		return ublk.WaitRecoverable(ctrl, id)
	})
}

// recoverOptions rebuilds the options of device id's server from its
// record, refusing an image other than the recorded one. image is "", a
// file name, or an --image-opts string (img.ImageOptsName) that replaces
// the recorded one. With handover (restart) the device's server must be
// running, and is asked to hand the device over; otherwise it must not.
func recoverOptions(id int, image string, handover bool) (*attachOptions, error) {
	dev := fmt.Sprintf("/dev/ublkb%d", id)
	rec, err := ublk.ReadRecord(id)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cannot recover %s: ublkimg has no record of it (%s)", dev, ublk.RecordDir)
	}
	if err != nil {
		return nil, err
	}
	if alive := rec.ServerAlive(); alive && !handover {
		return nil, fmt.Errorf("cannot recover %s: its server (process %d) is running", dev, rec.PID)
	} else if !alive && handover {
		return nil, fmt.Errorf("cannot restart %s: its server (process %d) is not running", dev, rec.PID)
	}
	imageOpts := rec.ImageOpts
	if image != "" {
		format := ""
		if s, ok := strings.CutPrefix(image, img.ImageOptsName("")); ok {
			var err error
			if image, format, _, err = img.ParseImageOpts(s); err != nil {
				return nil, err
			}
			imageOpts = s
		}
		abs, err := absImage(image)
		if err != nil {
			return nil, err
		}
		if abs != rec.Image {
			return nil, fmt.Errorf("cannot recover %s: it served %s, not %s", dev, rec.Image, abs)
		}
		if format != "" && format != rec.Format {
			return nil, fmt.Errorf("cannot recover %s: it served %s as %s, not %s", dev, rec.Image, rec.Format, format)
		}
	}
	var options bdrv.Options
	if imageOpts != "" {
		var err error
		if _, _, options, err = img.ParseImageOpts(imageOpts); err != nil {
			return nil, fmt.Errorf("record of %s: %w", dev, err)
		}
		if err := checkSecrets(options); err != nil {
			return nil, err
		}
	}
	cache, err := bdrv.ParseCacheMode(rec.Cache)
	if err != nil {
		return nil, fmt.Errorf("record of %s: %w", dev, err)
	}
	discard, err := ublk.ParseDiscardMode(rec.Discard)
	if err != nil {
		return nil, fmt.Errorf("record of %s: %w", dev, err)
	}
	o := &attachOptions{
		image: rec.Image, format: rec.Format, options: options, imageOpts: imageOpts,
		cache: cache, cacheSet: true, recover: true, handover: handover, handoverPID: rec.PID,
		cfg: ublk.Config{
			ID: id, Queues: rec.Queues, Depth: rec.Depth, BlockSize: rec.BlockSize,
			ReadOnly: rec.ReadOnly, Discard: discard, UserCopy: rec.UserCopy, PollMax: rec.PollMax, Recovery: true,
		},
	}
	if err := o.cfg.Check(); err != nil {
		return nil, fmt.Errorf("record of %s: %w", dev, err)
	}
	return o, nil
}

// checkSecrets fails, with QEMU's "No secret with id 'ID'", when a secret
// that opts name (encrypt.key-secret=ID, key-secret=ID, and the same for
// backing files) was not given with --object: before a server starts, so
// that the device stays quiesced for a recover that gives it.
func checkSecrets(opts bdrv.Options) error {
	for _, k := range slices.Sorted(maps.Keys(opts)) {
		if k != "key-secret" && !strings.HasSuffix(k, ".key-secret") {
			continue
		}
		b, err := bdrv.LookupSecret(opts[k])
		if err != nil {
			return err
		}
		clear(b)
	}
	return nil
}
