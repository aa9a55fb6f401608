package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/img"
)

// --object and --image-opts, as qemu-img takes them: secret objects hold
// passphrases (encrypt.key-secret=ID names one), and --image-opts names an
// image by its open options ("driver=qcow2,file.filename=X,
// encrypt.key-secret=ID") instead of a file name.

// objectVerbs are the verbs that accept --object (every qemu-img verb that
// opens or creates an image, attach, recover and restart).
var objectVerbs = []string{"amend", "attach", "bench", "bitmap", "check", "commit", "compare", "convert", "create",
	"dd", "info", "map", "measure", "rebase", "recover", "resize", "restart", "snapshot"}

// imageOptsVerbs are the verbs whose image operands may be --image-opts
// strings.
var imageOptsVerbs = []string{"amend", "attach", "bench", "bitmap", "check", "commit", "compare", "convert", "dd", "info", "map",
	"measure", "rebase", "recover", "resize", "snapshot"}

// addObjectFlags gives c the --object flag (and --image-opts where it
// applies). The secrets exist while c runs, and are forgotten and zeroed
// when it returns.
func addObjectFlags(c *cli.Command) {
	if slices.Contains(objectVerbs, c.Name) {
		c.Flags = append(c.Flags, &cli.StringSliceFlag{Name: "object",
			Usage: "`OBJECTDEF` secret,id=ID,data=STRING|file=PATH[,format=raw|base64]: a passphrase for encrypt.key-secret=ID; repeatable"})
		action := c.Action
		c.Action = func(ctx *cli.Context) error {
			if err := checkForegroundSecrets(ctx); err != nil {
				return err
			}
			defs, err := inheritedObjects()
			if err != nil {
				return err
			}
			for _, o := range append(defs, ctx.StringSlice("object")...) {
				id, err := bdrv.AddSecretObject(o)
				if err != nil {
					return err
				}
				defer bdrv.RemoveSecret(id)
			}
			return action(ctx)
		}
	}
	if slices.Contains(imageOptsVerbs, c.Name) {
		c.Flags = append(c.Flags, &cli.BoolFlag{Name: "image-opts",
			Usage: "image operands are option strings: driver=FMT,file.filename=FILE[,encrypt.key-secret=ID,...]"})
	}
	if c.Name == "convert" {
		c.Flags = append(c.Flags, &cli.BoolFlag{Name: "target-image-opts",
			Usage: "the target operand is an option string (with -n)"})
	}
}

// checkForegroundSecrets refuses a secret given with data= on the command
// line of a server that runs in the foreground (attach or recover
// --foreground): its command line, which any user can read in
// /proc/PID/cmdline, lasts as long as the server does. A background server
// gets its --object definitions through a pipe instead (objectsFDEnv).
func checkForegroundSecrets(ctx *cli.Context) error {
	if !ctx.Bool("foreground") {
		return nil
	}
	for _, def := range ctx.StringSlice("object") {
		_, rest, _ := strings.Cut(def, ",")
		o, err := bdrv.ParseOptionString(rest)
		if err != nil {
			continue // AddSecretObject reports it
		}
		if _, ok := o["data"]; ok {
			return fmt.Errorf("--object %s,data=...: with --foreground the passphrase would stay readable in the server's command line (/proc/PID/cmdline) for as long as it runs; give it with file=PATH instead", secretPrefix(def))
		}
	}
	return nil
}

// secretPrefix is the object definition def up to its options that may
// hold a passphrase, for messages: "secret,id=sec0".
func secretPrefix(def string) string {
	typ, rest, _ := strings.Cut(def, ",")
	o, _ := bdrv.ParseOptionString(rest)
	if id, ok := o["id"]; ok {
		return typ + ",id=" + id
	}
	return typ
}

// inheritedObjects reads the --object definitions a background server gets
// from the command that started it (attach.go, objectsFDEnv), or returns
// none.
func inheritedObjects() ([]string, error) {
	fd := os.Getenv(objectsFDEnv)
	if fd == "" {
		return nil, nil
	}
	os.Unsetenv(objectsFDEnv)
	n, err := strconv.Atoi(fd)
	if err != nil {
		return nil, fmt.Errorf("%s=%q: %w", objectsFDEnv, fd, err)
	}
	f := os.NewFile(uintptr(n), "objects")
	defer f.Close()
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("reading the --object definitions: %w", err)
	}
	if len(data) == 0 {
		return nil, nil
	}
	return strings.Split(string(data), "\x00"), nil
}

// markImageOpts rewrites the image operands of a normalized argument list
// (options, "--", operands) when --image-opts or --target-image-opts is
// among the options, so that the operations open them by their options.
func markImageOpts(verb string, args []string) ([]string, error) {
	sep := slices.Index(args, "--")
	if sep < 0 {
		return args, nil
	}
	opts, ops := args[:sep], slices.Clone(args[sep+1:])
	imageOpts := slices.Contains(opts, "--image-opts")
	targetOpts := verb == "convert" && slices.Contains(opts, "--target-image-opts")
	if targetOpts && !slices.Contains(opts, "-n") {
		return nil, errors.New("--target-image-opts requires use of -n flag")
	}
	if imageOpts && (slices.Contains(opts, "-f") || verb == "compare" && slices.Contains(opts, "-F")) {
		// The options name the driver: a format besides is refused, not
		// silently preferred to one of the two.
		err := errors.New("--image-opts and --format are mutually exclusive")
		if verb == "compare" {
			return nil, &exitError{img.CompareOpenError, err}
		}
		return nil, err
	}
	for i, a := range ops {
		last := i == len(ops)-1
		switch {
		case verb == "dd":
			if v, ok := strings.CutPrefix(a, "if="); ok && imageOpts {
				ops[i] = "if=" + img.ImageOptsName(v)
			}
		case verb == "recover":
			// recover DEV [IMG]: the device is no image.
			if i == 1 && imageOpts {
				ops[i] = img.ImageOptsName(a)
			}
		case verb == "bitmap":
			// bitmap FILE BITMAP: the bitmap is no image (and -b's
			// source is a file name, as in qemu-img).
			if i == 0 && imageOpts {
				ops[i] = img.ImageOptsName(a)
			}
		case verb == "convert" && last:
			if targetOpts {
				ops[i] = img.ImageOptsName(a)
			}
		case imageOpts:
			ops[i] = img.ImageOptsName(a)
		}
	}
	return append(append(slices.Clone(opts), "--"), ops...), nil
}
