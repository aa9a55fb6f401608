package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/img"
	"ublkimg/jobs"
	"ublkimg/ublk"
)

// The verbs that act on a served device through its server's control
// socket: snapshot --live, commit --live, backup, and bitmap and resize of
// an attached image.

func init() { registerCommands(backupCommand) }

// attachedDevice returns the device arg names: a ublk device
// (/dev/ublkbN, ublkbN), or an image file that a running server serves.
// ok is false for a file no server serves.
func attachedDevice(arg string) (id int, ok bool, err error) {
	if strings.HasPrefix(arg, "/dev/ublk") || strings.HasPrefix(arg, "ublkb") {
		id, err := ublk.ParseDeviceID(arg)
		return id, err == nil, err
	}
	abs, err := filepath.Abs(arg)
	if err != nil {
		return 0, false, nil
	}
	ids, _ := ublk.RecordIDs()
	for _, id := range ids {
		if r, err := ublk.ReadRecord(id); err == nil && r.Image == abs && r.ServerAlive() {
			return id, true, nil
		}
	}
	return 0, false, nil
}

// callDevice runs a control command on device id's server, until it ends
// or SIGINT/SIGTERM cancels it. With progress set, the job's progress goes
// to the terminal as qemu-img -p prints it.
func callDevice(c *cli.Context, id int, command string, args, result any, progress bool) error {
	client, err := ublk.ConnectDevice(id)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGINT, unix.SIGTERM)
	defer stop()
	var p *img.Progress
	if progress {
		p = img.NewProgress(c.App.Writer, 1)
		p.Print(0, 0)
	}
	err = client.Call(ctx, command, args, result, func(name string, data json.RawMessage) error {
		var d progressData
		if name != "progress" || p == nil || json.Unmarshal(data, &d) != nil || d.Total <= 0 {
			return nil
		}
		p.Print(float32(float64(d.Done)/float64(d.Total)*100), 0)
		return nil
	})
	if p != nil {
		if err == nil {
			p.Print(100, 0)
		}
		p.End()
	}
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("/dev/ublkb%d: %s interrupted", id, command)
	}
	return err
}

// absPath makes a path absolute for the server, which runs from /.
func absPath(p string) (string, error) {
	if p == "" {
		return "", nil
	}
	return filepath.Abs(p)
}

// deviceArg parses the device operand of the live verbs.
func deviceArg(arg, verb string) (int, error) {
	id, ok, err := attachedDevice(arg)
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("%s: '%s' is not an attached device (/dev/ublkbN) or image", verb, arg)
	}
	return id, nil
}

// setFlag returns the first of flags that the command line sets, as it is
// written there ("-f", "--image-opts"), or "".
func setFlag(c *cli.Context, flags ...string) string {
	for _, f := range flags {
		if c.IsSet(f) {
			if len(f) == 1 {
				return "-" + f
			}
			return "--" + f
		}
	}
	return ""
}

// liveSnapshot is snapshot --live DEV OVERLAY.
func liveSnapshot(c *cli.Context) error {
	if c.NArg() != 2 {
		return errors.New("snapshot --live: expecting a device and the overlay to create (ublkimg snapshot --live DEV OVERLAY)")
	}
	id, err := deviceArg(c.Args().Get(0), "snapshot --live")
	if err != nil {
		return err
	}
	overlay, err := absPath(c.Args().Get(1))
	if err != nil {
		return err
	}
	return callDevice(c, id, "snapshot-live", snapshotArgs{Overlay: overlay}, nil, false)
}

// liveCommit is commit --live DEV.
func liveCommit(c *cli.Context) error {
	if c.NArg() != 1 {
		return errors.New("commit --live: expecting one device (ublkimg commit --live [-p] DEV)")
	}
	if f := setFlag(c, "b", "d", "t", "f", "r", "image-opts"); f != "" {
		return fmt.Errorf("commit --live: %s does not apply to a live commit", f)
	}
	id, err := deviceArg(c.Args().First(), "commit --live")
	if err != nil {
		return err
	}
	var res jobResult
	if err := callDevice(c, id, "commit-live", nil, &res, c.Bool("p") && !c.Bool("q")); err != nil {
		return err
	}
	if !c.Bool("q") {
		fmt.Fprintf(c.App.Writer, "Image committed: /dev/ublkb%d now serves %s.\n", id, res.Image)
	}
	return nil
}

func backupCommand() *cli.Command {
	return &cli.Command{
		Name:      "backup",
		Usage:     "copy a busy device as it is now (point in time), fully or incrementally",
		ArgsUsage: "DEV TARGET",
		Description: "Writes TARGET, a new image (-f qcow2, the default, or raw), holding the device's\n" +
			"content as it was when the command started, while the device goes on being\n" +
			"written: a guest write to data not copied yet first copies the old data.\n" +
			"--bitmap NAME names a persistent dirty bitmap of the image: it is cleared at the\n" +
			"backup's point in time, so that it records what changes after it. With\n" +
			"--incremental PREV only what the bitmap marks is copied, into a qcow2 image\n" +
			"backed by PREV, the previous backup (full or incremental). If the backup fails\n" +
			"or is interrupted, TARGET is removed and the bitmap keeps its marks.\n" +
			"The backup of an encrypted device (attached with --image-opts and its secret)\n" +
			"is encrypted with LUKS under the same secret (2 s of key derivation, QEMU's\n" +
			"default iter-time), its backing chain opened with it; the command prints the\n" +
			"--image-opts that open it. A raw backup of an encrypted device is refused:\n" +
			"--plaintext writes the backup in clear, only when asked (on a device in clear\n" +
			"it changes nothing, and a note on stderr says so).\n" +
			"DEV is /dev/ublkbN or an attached image.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Aliases: []string{"format"}, Value: "qcow2", Usage: "`FMT` of TARGET: qcow2 or raw"},
			&cli.StringFlag{Name: "bitmap", Usage: "persistent dirty bitmap `NAME` to reset at the backup's point in time"},
			&cli.StringFlag{Name: "incremental", Usage: "copy only what --bitmap marks, over the previous backup `PREV`"},
			&cli.BoolFlag{Name: "plaintext", Usage: "write the backup of an encrypted device in clear (unencrypted)"},
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "q", Aliases: []string{"quiet"}, Usage: "quiet: print nothing but errors"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 2 {
				return errors.New("backup: expecting a device and the image to create (ublkimg backup DEV TARGET)")
			}
			id, err := deviceArg(c.Args().Get(0), "backup")
			if err != nil {
				return err
			}
			target, err := absPath(c.Args().Get(1))
			if err != nil {
				return err
			}
			prev, err := absPath(c.String("incremental"))
			if err != nil {
				return err
			}
			a := backupArgs{Target: target, Format: c.String("f"), Bitmap: c.String("bitmap"), Incremental: prev,
				Plaintext: c.Bool("plaintext")}
			var res jobResult
			if err := callDevice(c, id, "backup", a, &res, c.Bool("p") && !c.Bool("q")); err != nil {
				return err
			}
			if !c.Bool("q") {
				printBackupKey(c.App.Writer, c.App.ErrWriter, res, c.Bool("plaintext"))
			}
			return nil
		},
	}
}

// printBackupKey tells the user what opens a backup of an encrypted
// device: its secret, or that it is in clear as asked. --plaintext
// (plaintext) on a device in clear changed nothing: a note on errW says
// so rather than let the user believe it did something, without failing
// the backup (a script may pass it for every device, encrypted or not).
func printBackupKey(w, errW io.Writer, res jobResult, plaintext bool) {
	if plaintext && !res.Plaintext {
		fmt.Fprintln(errW, "ublkimg: note: --plaintext changed nothing: the device's image is not encrypted, its backup is in clear anyway")
	}
	switch {
	case res.Secret != "":
		fmt.Fprintf(w, "Backup encrypted (LUKS) with the device's secret '%s': open it with --object secret,id=%s,... --image-opts '%s'\n",
			res.Secret, res.Secret, res.ImageOpts)
	case res.Plaintext:
		fmt.Fprintf(w, "Backup of an encrypted device written in clear (--plaintext): %s holds its data unencrypted\n", res.Image)
	}
	if res.Secret == "" && res.ImageOpts != "" {
		fmt.Fprintf(w, "Its backing chain is encrypted: open it with --image-opts '%s'\n", res.ImageOpts)
	}
}

// liveBitmap runs bitmap's operations on an attached image through its
// server; merges read the image's own bitmaps, or those of -b's image.
func liveBitmap(c *cli.Context, id int, name string, o img.BitmapOptions) error {
	if err := o.Check(); err != nil {
		return err
	}
	gran, err := img.ParseBitmapGranularity(o.Granularity)
	if err != nil {
		return err
	}
	src, err := absPath(o.SourceFile)
	if err != nil {
		return err
	}
	a := bitmapArgs{Name: name, Source: jobs.BitmapSource{File: src, Format: o.SourceFormat}}
	for _, op := range o.Ops {
		j := jobs.BitmapOp{Action: op.Action, Source: op.Source}
		if op.Action == bdrv.BitmapAdd {
			j.Granularity = gran
		}
		a.Ops = append(a.Ops, j)
	}
	return callDevice(c, id, "bitmap", a, nil, false)
}

// liveResize resizes an attached image through its server.
func liveResize(c *cli.Context, id int, size string) error {
	var res struct {
		Size int64 `json:"size"`
	}
	if err := callDevice(c, id, "resize", resizeArgs{Size: size}, &res, false); err != nil {
		return err
	}
	if !c.Bool("q") {
		fmt.Fprintln(c.App.Writer, "Image resized.")
	}
	return nil
}
