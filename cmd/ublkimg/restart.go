package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/urfave/cli/v2"

	"ublkimg/ublk"
)

func init() { registerCommands(restartCommand) }

func restartCommand() *cli.Command {
	return &cli.Command{
		Name:      "restart",
		Usage:     "replace the server of a device with this ublkimg, without downtime (attach --recovery)",
		ArgsUsage: "DEV|ID",
		Description: "Starts a new server of /dev/ublkbN (or device number N) from the ublkimg binary\n" +
			"running this command, for an upgrade, while the file system stays mounted: the\n" +
			"old server holds the device's new requests, waits for those in flight, flushes\n" +
			"and closes the image and exits without stopping the device; the kernel keeps the\n" +
			"requests pending (the device was attached with --recovery) and the new server\n" +
			"recovers the device and serves them. No request fails; the file system sees a\n" +
			"pause. The image and options come from the device's record; the secrets an\n" +
			"encrypted image names must be given again with --object. Prints the device once\n" +
			"the new server serves it; the record and the log follow the new server.",
		Action: restartAction,
	}
}

func restartAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return errors.New("restart: expecting exactly one device (ublkimg restart DEV|ID)")
	}
	id, err := ublk.ParseDeviceID(c.Args().First())
	if err != nil {
		return err
	}
	// Everything the new server needs is checked before the old one is
	// asked to stop serving: its options, its secrets, the control socket.
	o, err := restartOptions(id)
	if err != nil {
		return err
	}
	client, err := ublk.ConnectDevice(id)
	if err != nil {
		return fmt.Errorf("cannot restart %w", err)
	}
	client.Close()
	return startServer(c, []string{"recover", "--foreground", "--handover", strconv.Itoa(o.cfg.ID)})
}

// restartOptions are the options of the server that replaces device id's
// running server, refusing a device that cannot be restarted.
func restartOptions(id int) (*attachOptions, error) {
	dev := fmt.Sprintf("/dev/ublkb%d", id)
	rec, err := ublk.ReadRecord(id)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cannot restart %s: no such device served by ublkimg (no record in %s)", dev, ublk.RecordDir)
	}
	if err != nil {
		return nil, err
	}
	if !rec.ServerAlive() {
		return nil, fmt.Errorf("cannot restart %s: its server (process %d) is not running (ublkimg recover serves a device whose server died)", dev, rec.PID)
	}
	if !rec.Recovery {
		return nil, fmt.Errorf("cannot restart %s: it was not attached with --recovery", dev)
	}
	return recoverOptions(id, "", true)
}

// takeOver is the new server's first step of a restart: it asks the
// running server of device id (process pid) to hand the device over, and
// waits until that process has exited, which leaves the device quiesced
// for Recover. It returns what happened, for the log.
func takeOver(ctx context.Context, id, pid int) (string, error) {
	rec, err := ublk.ReadRecord(id)
	if err != nil {
		return "", err
	}
	if rec.PID != pid || !rec.ServerAlive() {
		return "", fmt.Errorf("cannot restart /dev/ublkb%d: its server (process %d) is gone", id, pid)
	}
	client, err := ublk.ConnectDevice(id)
	if err != nil {
		return "", fmt.Errorf("cannot restart %w", err)
	}
	t0 := time.Now()
	err = client.Call(ctx, "handover", nil, nil, nil)
	client.Close()
	if err != nil {
		return "", fmt.Errorf("cannot restart /dev/ublkb%d: %w", id, err)
	}
	t1 := time.Now()
	if err := ublk.WaitServerExit(ctx, rec); err != nil {
		return "", err
	}
	return fmt.Sprintf("process %d handed the device over in %v and exited %v later", pid,
		t1.Sub(t0).Round(time.Microsecond), time.Since(t1).Round(time.Microsecond)), nil
}
