package main

import (
	"context"
	"errors"
	"os/signal"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"ublkimg/ublk"
)

func detachCommand() *cli.Command {
	return &cli.Command{
		Name:      "detach",
		Usage:     "stop serving a ublk device",
		ArgsUsage: "DEV|ID",
		Description: "Stops the server of /dev/ublkbN (or device number N) and returns once it has\n" +
			"flushed and closed its image and the device is gone. When the server failed to\n" +
			"(its final flush or close failed, or it was killed meanwhile), detach prints its\n" +
			"error and exits with status 1 (a background server's log stays, in\n" +
			"/run/ublkimg/ublkbN.log).\n" +
			"Only the process the device's record names, with the start time recorded, is\n" +
			"ever signalled; a device without a live server is deleted through the kernel.\n" +
			"A mounted device is refused unless --force is given.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "force", Usage: "detach even if the device is mounted or open exclusively"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return errors.New("detach: expecting exactly one device (ublkimg detach DEV|ID)")
			}
			id, err := ublk.ParseDeviceID(c.Args().First())
			if err != nil {
				return err
			}
			ctrl, err := ublk.OpenCtrl()
			if err != nil {
				return err
			}
			defer ctrl.Close()
			ctx, stop := signal.NotifyContext(context.Background(), unix.SIGINT, unix.SIGTERM)
			defer stop()
			return ublk.Detach(ctx, ctrl, id, c.Bool("force"))
		},
	}
}
