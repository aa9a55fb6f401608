// Command ublkimg serves disk images as Linux block devices through ublk
// and provides the image tools of qemu-img (create, info, convert, compare,
// bench, ...) with qemu-img's flags, output and exit codes.
//
// This file holds the application frame: the verb list, argument
// normalisation and the one rule for errors: a single line on stderr,
// "ublkimg: <message>", and a non-zero exit status.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"

	// The drivers register their formats with bdrv.
	_ "ublkimg/drivers/file"
	_ "ublkimg/drivers/luks"
	_ "ublkimg/drivers/null"
	_ "ublkimg/drivers/qcow2"
	_ "ublkimg/drivers/raw"
)

func main() {
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

// imageCommands are the qemu-img verbs defined in their own files without
// an init function, in the order help lists them; the others (amend,
// snapshot, bitmap and the device verbs) follow, as registerCommands added
// them.
func imageCommands() []*cli.Command {
	return []*cli.Command{
		createCommand(),
		infoCommand(),
		checkCommand(),
		mapCommand(),
		convertCommand(),
		compareCommand(),
		resizeCommand(),
		commitCommand(),
		rebaseCommand(),
		measureCommand(),
		ddCommand(),
		benchCommand(),
	}
}

// registered are verbs whose files add their constructors from an init
// function with registerCommands (amend, bitmap, snapshot and the ublk
// device verbs: attach, detach, list, recover).
var registered []func() *cli.Command

// registerCommands adds verbs to the application; call it from init.
func registerCommands(fns ...func() *cli.Command) {
	registered = append(registered, fns...)
}

// exitError carries a specific exit status (compare's 2, 3 and 4); other
// errors exit with 1.
type exitError struct {
	code int
	err  error // nil: exit silently (the verb already printed its result)
}

func (e *exitError) Error() string {
	if e.err == nil {
		return ""
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

func newApp(stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Name:  "ublkimg",
		Usage: "disk images as ublk block devices, and qemu-img's image tools",
		Description: "Image verbs take qemu-img's options and print qemu-img's output, so scripts\n" +
			"carry over: sizes take k, M, G, T, P, E suffixes; 'fmt' is an image format\n" +
			"(probed when omitted); 'cache' is none, writeback, writethrough, directsync\n" +
			"or unsafe.",
		Writer:                    stdout,
		ErrWriter:                 stderr,
		HideHelpCommand:           true,
		DisableSliceFlagSeparator: true, // -o values keep their commas
		// Errors are printed by run, on one line; urfave must not exit.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return err
		},
	}
	app.Commands = imageCommands()
	for _, fn := range registered {
		app.Commands = append(app.Commands, fn())
	}
	for _, c := range app.Commands {
		if c.OnUsageError == nil {
			c.OnUsageError = app.OnUsageError
		}
		addObjectFlags(c)
	}
	return app
}

// run is main without the exit, for tests.
func run(args []string, stdout, stderr io.Writer) int {
	app := newApp(stdout, stderr)
	args, err := normalize(app, args)
	if err == nil {
		err = app.Run(args)
	}
	if err == nil {
		return 0
	}
	code := 1
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
		if ee.err == nil {
			return code
		}
	}
	fmt.Fprintf(stderr, "ublkimg: %s\n", oneLine(err.Error()))
	// qemu-img prints an error's hint (error_append_hint) on its own
	// line: "Is another process using the image [x]?".
	var h interface{ Hint() string }
	if errors.As(err, &h) {
		fmt.Fprintln(stderr, h.Hint())
	}
	return code
}

// normalize applies getopt's rules (getoptArgs) to the arguments of every
// verb, the image verbs and the device verbs alike, so that options may
// follow the operands ("ublkimg attach a.img --queues 2").
func normalize(app *cli.App, args []string) ([]string, error) {
	if len(args) < 2 {
		return args, nil
	}
	if !strings.HasPrefix(args[1], "-") && app.Command(args[1]) == nil {
		return nil, errors.New("Command not found: " + args[1])
	}
	for _, c := range app.Commands {
		if c.Name != args[1] {
			continue
		}
		in, last := args[2:], []string(nil)
		if c.Name == "resize" {
			// qemu-img takes the size off the end before reading
			// options, so that "-1G" is a size, not an option.
			if len(in) < 2 {
				return nil, errors.New("Not enough arguments")
			}
			in, last = in[:len(in)-1], in[len(in)-1:]
		}
		rest, err := getoptArgs(c, in)
		if err != nil {
			return nil, err
		}
		if rest, err = markImageOpts(c.Name, rest); err != nil {
			return nil, err
		}
		return append(append([]string{args[0], args[1]}, rest...), last...), nil
	}
	return args, nil
}

// oneLine joins a multi-line message: every error is one line on stderr.
func oneLine(s string) string {
	return strings.TrimSpace(strings.ReplaceAll(s, "\n", " "))
}

// jsonOutput reads the --output flag the image verbs share, as qemu-img
// does: human (also when the flag is absent) or json; anything else is an
// error.
func jsonOutput(c *cli.Context) (bool, error) {
	switch c.String("output") {
	case "json":
		return true, nil
	case "human":
		return false, nil
	case "":
		if !c.IsSet("output") {
			return false, nil
		}
	}
	return false, errors.New("--output must be used with human or json as argument.")
}

// cacheOption sets *dst from the cache-mode flag (qemu-img's -t for the
// image written, -T for the source read) when it was given, and fails with
// qemu-img's message for that flag otherwise.
func cacheOption(c *cli.Context, flag string, dst *bdrv.CacheMode) error {
	s := c.String(flag)
	if s == "" {
		return nil
	}
	mode, err := bdrv.ParseCacheMode(s)
	if err != nil {
		if flag == "T" {
			return errors.New("Invalid source cache option: " + s)
		}
		return errors.New("Invalid cache option: " + s)
	}
	*dst = mode
	return nil
}

// runCo runs an operation as a coroutine on a private loop, turning a panic
// into an error so that even a bug ends in one line on stderr.
func runCo(fn func(co *coroutine.Co) error) error {
	return coroutine.Run(func(co *coroutine.Co) error {
		return img.Guard(func() error { return fn(co) })
	})
}

// quietWriter is w, or nil when -q asks for silence.
func quietWriter(w io.Writer, quiet bool) io.Writer {
	if quiet {
		return nil
	}
	return w
}
