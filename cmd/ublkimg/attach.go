package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
	"ublkimg/ublk"
)

// readyFDEnv names the file descriptor on which a background server
// (attach re-executed with --foreground) reports to the attach command
// that started it: one line, "ready DEVICE" or "error MESSAGE".
const readyFDEnv = "UBLKIMG_READY_FD"

// objectsFDEnv names the file descriptor from which a background server
// reads the --object definitions of the command that started it (NUL
// separated): they hold passphrases, which must not sit in the server's
// command line for as long as it runs, where any user can read them.
const objectsFDEnv = "UBLKIMG_OBJECTS_FD"

func init() { registerCommands(attachCommand, detachCommand, listCommand, recoverCommand) }

func attachCommand() *cli.Command {
	return &cli.Command{
		Name:      "attach",
		Usage:     "serve an image as a block device, /dev/ublkbN",
		ArgsUsage: "IMG",
		Description: "Attaches IMG to a new ublk device and prints its path once it is live. The server\n" +
			"runs on in the background until `ublkimg detach` (or SIGTERM); with --foreground it\n" +
			"stays attached to the caller (for systemd: it reports READY=1 to NOTIFY_SOCKET).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "f", Usage: "image `FORMAT` (probed when omitted)"},
			&cli.IntFlag{Name: "queues", Usage: "hardware queues, one thread each, 1..4096; the kernel gives at most one per CPU (default: CPUs, at most 4)"},
			&cli.IntFlag{Name: "depth", Value: ublk.DefaultDepth, Usage: "requests in flight per queue, 1..4096"},
			&cli.StringFlag{Name: "t", Usage: "`CACHE` mode: none, writeback, writethrough, directsync, unsafe (default: none, or writeback where O_DIRECT is refused)"},
			&cli.BoolFlag{Name: "read-only", Aliases: []string{"r"}, Usage: "export the device read-only"},
			&cli.StringFlag{Name: "discard", Value: "unmap", Usage: "discard requests: unmap (deallocate in the image) or ignore"},
			&cli.IntFlag{Name: "id", Value: -1, Usage: "device number N of /dev/ublkbN (-1: the first free)"},
			&cli.IntFlag{Name: "block-size", Value: ublk.DefaultBlockSize, Usage: "logical block size: 512 or 4096"},
			&cli.BoolFlag{Name: "user-copy", DefaultText: "on for a raw image in tmpfs, where the kernel has it; else off",
				Usage: "move data with UBLK_F_USER_COPY instead of per-tag buffers"},
			&cli.BoolFlag{Name: "no-user-copy", Usage: "keep a raw image in tmpfs in copy mode too: with user copy its READs map the image's pages, which then count in the server's RSS and OOM score"},
			&cli.DurationFlag{Name: "poll-max", Value: ublk.DefaultPollMax, Usage: "let queue threads poll for up to `DURATION` before sleeping (adaptive: only while requests come faster): lower latency, more CPU while busy; 0 never polls"},
			&cli.BoolFlag{Name: "recovery", Usage: "keep the device when the server dies (I/O waits) so that ublkimg recover can serve it again; a qcow2 image then writes the metadata a write changed back before acknowledging it (x-crash-safe-metadata=on)"},
			&cli.BoolFlag{Name: "foreground", Usage: "serve in this process until SIGTERM or SIGINT"},
		},
		Action: attachAction,
	}
}

// attachOptions are attach's flags, checked, or what recover takes from
// the device's record.
type attachOptions struct {
	image     string
	format    string
	options   bdrv.Options // from --image-opts
	imageOpts string       // the --image-opts string, for the record
	cache     bdrv.CacheMode
	cacheSet  bool
	cfg       ublk.Config
	recover   bool // recover device cfg.ID instead of adding one
	// handover (with recover): the device's server runs; it is asked to
	// hand the device over, and waited for, first (restart).
	handover    bool
	handoverPID int      // that server's process
	readyFile   *os.File // background server: where to report readiness
}

func parseAttach(c *cli.Context) (*attachOptions, error) {
	if c.NArg() != 1 {
		return nil, errors.New("attach: expecting exactly one image (ublkimg attach [options] IMG)")
	}
	o := &attachOptions{image: c.Args().First(), format: c.String("f"), cache: bdrv.CacheNone}
	if c.Bool("image-opts") {
		name, format, opts, err := img.ResolveImageName(o.image)
		if err != nil {
			return nil, err
		}
		o.image, o.options = name, opts
		// The record keeps the string for recover. It names secrets
		// by ID only (their data comes from --object), and openImage
		// refuses options no driver takes, so that no value that is
		// not an open option, such as a passphrase put in by mistake,
		// ever reaches the record.
		o.imageOpts = strings.TrimPrefix(c.Args().First(), img.ImageOptsName(""))
		if format != "" {
			o.format = format
		}
	}
	if s := c.String("t"); s != "" {
		mode, err := bdrv.ParseCacheMode(s)
		if err != nil {
			return nil, err
		}
		o.cache, o.cacheSet = mode, true
	}
	discard, err := ublk.ParseDiscardMode(c.String("discard"))
	if err != nil {
		return nil, err
	}
	o.cfg = ublk.Config{
		ID:         c.Int("id"),
		Queues:     c.Int("queues"),
		Depth:      c.Int("depth"),
		BlockSize:  c.Int("block-size"),
		ReadOnly:   c.Bool("read-only"),
		Discard:    discard,
		UserCopy:   c.Bool("user-copy"),
		NoUserCopy: c.Bool("no-user-copy"),
		PollMax:    c.Duration("poll-max"),
		Recovery:   c.Bool("recovery"),
	}
	if o.cfg.UserCopy && o.cfg.NoUserCopy {
		return nil, errors.New("--user-copy and --no-user-copy exclude each other")
	}
	if o.cfg.PollMax < 0 || o.cfg.PollMax > time.Second {
		return nil, fmt.Errorf("invalid poll time %v (0 to 1s)", o.cfg.PollMax)
	}
	if o.cfg.Queues < 0 || (c.IsSet("queues") && o.cfg.Queues == 0) {
		return nil, fmt.Errorf("invalid queue count %d", o.cfg.Queues)
	}
	if o.cfg.Depth <= 0 {
		return nil, fmt.Errorf("invalid queue depth %d", o.cfg.Depth)
	}
	// The kernel's limits (queue count, depth, block size, device id):
	// the server must never act on a value ADD_DEV would refuse.
	if err := o.cfg.Check(); err != nil {
		return nil, err
	}
	return o, nil
}

func attachAction(c *cli.Context) error {
	o, err := parseAttach(c)
	if err != nil {
		return err
	}
	// Check what the caller can fix before starting a server, so each
	// mistake gets its own line from here.
	return runServer(c, o, c.Args().First(), func() error {
		if err := ublk.CheckCtrl(); err != nil {
			return err
		}
		// An image named by a protocol (rbd:pool/image), or by a
		// protocol's options alone (--image-opts driver=rbd,pool=...),
		// is no file: its open says what is wrong.
		if bdrv.HasProtocol(o.image) || o.image == "" && o.imageOpts != "" {
			return nil
		}
		if _, err := os.Stat(o.image); err != nil {
			return fmt.Errorf("Could not open '%s': %w", o.image, errnoText(err))
		}
		return nil
	})
}

// runServer runs the server of attach or recover: in this process with
// --foreground, else in the background once check passed. image is the image argument, "" if none
// (an --image-opts string is marked, img.ImageOptsName).
func runServer(c *cli.Context, o *attachOptions, image string, check func() error) error {
	if c.Bool("foreground") {
		return serveForeground(o)
	}
	if err := check(); err != nil {
		return err
	}
	return startBackground(c, image)
}

// serveForeground is the server of attach and recover --foreground: the
// background server reports to the command that started it on the file
// descriptor readyFDEnv names.
func serveForeground(o *attachOptions) error {
	if fd := os.Getenv(readyFDEnv); fd != "" {
		n, err := strconv.Atoi(fd)
		if err != nil {
			return fmt.Errorf("%s=%q: %w", readyFDEnv, fd, err)
		}
		o.readyFile = os.NewFile(uintptr(n), "ready")
		os.Unsetenv(readyFDEnv)
	}
	return serveImage(o)
}

// startBackground re-executes ublkimg as `attach --foreground` with the same
// arguments in a new session, detached from the terminal, and waits for its
// report: the device path once the device is live, or why it failed. (Go
// cannot fork without exec.)
func startBackground(c *cli.Context, image string) error {
	return startServer(c, absImageArg(foregroundArgs(withoutObjects(os.Args[1:]), c.Command.Name), image))
}

// startServer starts ublkimg with args (a server in the foreground) as
// startBackground describes, giving it the caller's --object definitions.
func startServer(c *cli.Context, args []string) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("attach: finding ublkimg itself: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	objR, objW, err := os.Pipe()
	if err != nil {
		r.Close()
		w.Close()
		return fmt.Errorf("attach: %w", err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3", objectsFDEnv+"=4")
	cmd.ExtraFiles = []*os.File{w, objR}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	err = cmd.Start()
	w.Close()
	objR.Close()
	if err != nil {
		r.Close()
		objW.Close()
		return fmt.Errorf("%s: starting the server: %w", c.Command.Name, err)
	}
	// A write error means the server died at once; its report (or its
	// exit) below says why.
	objW.WriteString(strings.Join(c.StringSlice("object"), "\x00"))
	objW.Close()
	line, _ := bufio.NewReader(r).ReadString('\n')
	r.Close()
	kind, msg, _ := strings.Cut(strings.TrimSpace(line), " ")
	switch kind {
	case "ready":
		cmd.Process.Release()
		fmt.Fprintln(c.App.Writer, msg)
		return nil
	case "error":
		cmd.Wait()
		return errors.New(msg)
	}
	err = cmd.Wait()
	return fmt.Errorf("%s: the server exited before the device was ready (%v)", c.Command.Name, err)
}

// absImageArg returns args with the image argument image (as
// startBackground takes it) naming its file by its absolute name: the
// server runs from /, so that it keeps no directory busy. In an
// --image-opts string, the file name is made absolute and the string
// rewritten.
func absImageArg(args []string, image string) []string {
	from, to := image, image
	if s, ok := strings.CutPrefix(image, img.ImageOptsName("")); ok {
		from, to = s, absImageOpts(s)
	} else if abs, err := absImage(image); err == nil && image != "" {
		to = abs
	}
	for i := len(args) - 1; i >= 0 && from != to; i-- {
		if args[i] == from {
			args[i] = to
			break
		}
	}
	return args
}

// absImageOpts returns the --image-opts string s with a relative file name
// made absolute, or s as it is when it names none or cannot be parsed (the
// server then reports the error).
func absImageOpts(s string) string {
	o, err := bdrv.ParseOptionString(s)
	if err != nil {
		return s
	}
	changed := false
	for _, k := range []string{"file.filename", "filename"} {
		if v, ok := o[k]; ok && v != "" && !filepath.IsAbs(v) && !bdrv.HasProtocol(v) {
			if abs, err := filepath.Abs(v); err == nil {
				o[k], changed = abs, true
			}
		}
	}
	if !changed {
		return s
	}
	return optionString(o)
}

// optionString writes options o as an option string, sorted by name, a
// comma in a value doubled.
func optionString(o bdrv.Options) string {
	parts := make([]string, 0, len(o))
	for _, k := range slices.Sorted(maps.Keys(o)) {
		parts = append(parts, k+"="+strings.ReplaceAll(o[k], ",", ",,"))
	}
	return strings.Join(parts, ",")
}

// withoutObjects returns args without its --object options (both the
// "--object DEF" and the "--object=DEF" forms): startBackground hands
// their definitions to the server through a pipe.
func withoutObjects(args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return append(out, args[i:]...)
		case a == "--object" || a == "-object":
			i++ // and its value
		case strings.HasPrefix(a, "--object=") || strings.HasPrefix(a, "-object="):
		default:
			out = append(out, a)
		}
	}
	return out
}

// foregroundArgs returns the arguments of the background server: the
// caller's, with --foreground after the command name.
func foregroundArgs(args []string, name string) []string {
	out := make([]string, 0, len(args)+1)
	done := false
	for _, a := range args {
		out = append(out, a)
		if !done && a == name {
			out = append(out, "--foreground")
			done = true
		}
	}
	return out
}

// serveImage is the server: it opens the image, starts the device,
// announces it and serves until SIGTERM, SIGINT or SIGHUP, or until the
// device is stopped from outside.
func serveImage(o *attachOptions) (err error) {
	logger := log.New(os.Stderr, "ublkimg: ", log.LstdFlags)
	o.cfg.Logf = logger.Printf
	report := func(kind, msg string) bool {
		if o.readyFile == nil {
			return true
		}
		_, err := fmt.Fprintf(o.readyFile, "%s %s\n", kind, oneLine(msg))
		o.readyFile.Close()
		o.readyFile = nil
		return err == nil
	}
	defer func() {
		if err != nil {
			report("error", err.Error())
		}
	}()
	// Signals are caught from the start, so that a detach during start-up
	// still ends in an orderly close.
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	defer stop()

	setMaxProcs(o.cfg.Queues)
	var dev *ublk.Device
	var takeover time.Time
	var handedOver string
	if o.handover {
		takeover = time.Now()
		if handedOver, err = takeOver(ctx, o.cfg.ID, o.handoverPID); err != nil {
			return err
		}
	}
	node, cache, err := openImage(o)
	if err == nil {
		o.cfg = deviceConfig(o.cfg, node)
		start := ublk.Start
		if o.recover {
			start = ublk.Recover
		}
		dev, err = start(o.cfg, node)
	}
	if err != nil {
		if o.handover {
			err = fmt.Errorf("%w (its old server is gone: the device waits, its I/O held, for ublkimg recover %d)", err, o.cfg.ID)
		}
		return err
	}
	cfg := dev.Config()
	abs, _ := absImage(o.image)
	rec := ublk.Record{
		ID: dev.ID(), Device: dev.Path(), Image: abs, Format: node.Format.Name, ImageOpts: o.imageOpts,
		Queues: dev.Info().Queues, Depth: dev.Info().Depth, BlockSize: cfg.BlockSize,
		ReadOnly: cfg.ReadOnly, Cache: recordedCache(cache, o.cache), Discard: cfg.Discard.String(),
		UserCopy: cfg.UserCopy, PollMax: cfg.PollMax, Recovery: dev.Info().Flags.Has(ublk.FeatureUserRecovery),
		Started: time.Now().UTC().Truncate(time.Second),
	}
	if err := ublk.WriteRecord(rec); err != nil {
		return errors.Join(err, dev.Close())
	}
	live := newLiveServer(dev, o, rec, logger.Printf)
	ctl, err := live.listen()
	if err != nil {
		return errors.Join(err, dev.Close(), ublk.RemoveRecord(dev.ID(), os.Getpid()))
	}
	// Last, the server says how it ended, for detach to report; a server
	// that handed its device over leaves the record to its successor.
	defer func() {
		if errors.Is(err, ublk.ErrHandedOver) {
			err = nil
			return
		}
		if serr := ublk.WriteExitStatus(dev.ID(), err); serr != nil {
			logger.Printf("%s: %v", dev.Path(), serr)
		}
		ublk.RemoveRecord(dev.ID(), os.Getpid())
	}()
	if o.readyFile != nil {
		logToFile(logger, dev.ID())
	}
	if o.handover {
		logger.Printf("%s: restarted: %s; served again %v after the handover began", dev.Path(), handedOver,
			time.Since(takeover).Round(time.Microsecond))
	}
	if o.readyFile != nil {
		if !report("ready", dev.Path()) {
			// The attach command is gone (interrupted): nobody learnt
			// of the device, so it must not stay.
			return errors.Join(errors.New("attach: the caller went away before the device was announced"), dev.Close())
		}
	} else {
		fmt.Println(dev.Path())
	}
	sdNotify("READY=1\nMAINPID=" + strconv.Itoa(os.Getpid()) + "\nSTATUS=serving " + abs + " as " + dev.Path())

	select {
	case <-ctx.Done():
		logger.Printf("%s: stopping", dev.Path())
	case <-dev.Done():
		if e := dev.Err(); e != nil {
			logger.Printf("%s: failed: %v", dev.Path(), e)
		} else {
			logger.Printf("%s: stopped from outside", dev.Path())
		}
	case <-live.handedOver:
		// restart: the image is closed, the next server recovers the
		// device once this process is gone.
		ctl.Close()
		logger.Printf("%s: exiting for the next server", dev.Path())
		return ublk.ErrHandedOver
	}
	sdNotify("STOPPING=1")
	// Jobs end (cancelled) before the device closes.
	cerr := ctl.Close()
	err = errors.Join(dev.Err(), cerr, dev.Close())
	if err == nil {
		ublk.RemoveLog(dev.ID())
	} else {
		logger.Printf("%s: %v", dev.Path(), err)
	}
	return err
}

// recoveryOptions returns the open options of an image served with
// recovery (attach --recovery and recover): a killed server must lose no
// acknowledged write (ublk.Config.Recovery). The host kernel, and its page
// cache, outlive the server, so data written to the image file is safe; a
// qcow2 image's L2 and refcount updates sit in its metadata caches until
// written back, so bdrv.OptCrashSafeMetadata writes them back before a
// write that changed them completes. Rewrites of allocated clusters and
// reads cost nothing, and the cache mode stays the user's. Other formats
// ignore the option: raw keeps no metadata.
func recoveryOptions(opts bdrv.Options) bdrv.Options {
	return opts.Merge(bdrv.Options{bdrv.OptCrashSafeMetadata: "on"})
}

// setMaxProcs gives the runtime a P for every queue thread, one for the
// control loop and a spare, unless GOMAXPROCS is set. Queue threads are
// locked OS threads that sleep in io_uring_enter between requests; one
// that wakes needs a P, and when none is idle the runtime hands one over
// through another thread: two more context switches per request. In the
// test VM this saved about a quarter of the server's CPU time per request.
func setMaxProcs(queues int) {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	if queues == 0 {
		queues = ublk.DefaultQueues()
	}
	// The kernel clamps the queue count to the CPUs.
	queues = min(queues, runtime.NumCPU())
	if n := queues + 2; n > runtime.GOMAXPROCS(0) {
		runtime.GOMAXPROCS(n)
	}
}

// openImage opens the image with the requested cache mode, and returns the
// image's: the cache.direct and cache.no-flush options override -t's.
// Without -t it tries cache=none (O_DIRECT: the device's own page cache is
// the only one) and falls back to writeback where the file system refuses
// O_DIRECT. The options of an --image-opts string must all be used, as
// qemu-img wants; read-only=on opens the image read-only (deviceConfig
// then makes the device read-only), and --discard is the default of the
// discard option.
func openImage(o *attachOptions) (*bdrv.Node, bdrv.CacheMode, error) {
	opts := o.options
	if o.cfg.Recovery {
		opts = recoveryOptions(opts)
	}
	open := func(cache bdrv.CacheMode) (*bdrv.Node, error) {
		var node *bdrv.Node
		err := coroutine.Run(func(co *coroutine.Co) error {
			var err error
			node, err = bdrv.Open(co, bdrv.Spec{Filename: o.image, Format: o.format, Options: opts, Cache: cache,
				ReadOnly: o.cfg.ReadOnly, NoUnmap: o.cfg.Discard == ublk.DiscardIgnore})
			if err == nil && o.imageOpts != "" {
				// The recovery option is ours: only the user's are checked.
				if err = bdrv.CheckNodeOptions(node, o.options); err != nil {
					node.Close(co)
					node = nil
				}
			}
			return err
		})
		return node, err
	}
	node, err := openUnlocked(o.image, func() (*bdrv.Node, error) { return open(o.cache) })
	if err != nil && !o.cacheSet && errors.Is(err, unix.EINVAL) {
		o.cache = bdrv.CacheWriteback
		node, err = open(o.cache)
	}
	if err != nil {
		return nil, o.cache, err
	}
	return node, node.Cache, nil
}

// deviceConfig fits the device to the open image: a read-only image
// (read-only=on) makes a read-only device, and the image's discard option
// (discard=unmap or ignore, defaulting to --discard) decides whether the
// device takes discards and lets write-zeroes deallocate.
func deviceConfig(cfg ublk.Config, node *bdrv.Node) ublk.Config {
	cfg.ReadOnly = cfg.ReadOnly || node.ReadOnly
	cfg.Discard = ublk.DiscardIgnore
	if node.Unmap {
		cfg.Discard = ublk.DiscardUnmap
	}
	return cfg
}

// recordedCache is the cache mode the record names, which recover gives
// as -t, the options of the record's --image-opts string on top: the
// image's own, unless only options can make it (flushes ignored with
// O_DIRECT or write-through), then the one asked for.
func recordedCache(image, asked bdrv.CacheMode) string {
	if _, err := bdrv.ParseCacheMode(image.String()); err == nil {
		return image.String()
	}
	return asked.String()
}

// lockWait bounds how long openUnlocked waits for a dead server's lock.
const lockWait = 2 * time.Second

// openUnlocked calls open, and calls it again for up to lockWait while it
// fails because the image is locked and a ublkimg server that served it
// has died (its record says so): the kernel releases a killed process's
// io_uring, which holds the image file open, asynchronously, so its lock
// can outlive it briefly. A lock held by a live process fails at once.
func openUnlocked(image string, open func() (*bdrv.Node, error)) (*bdrv.Node, error) {
	node, err := open()
	if !errors.Is(err, bdrv.ErrLocked) {
		return node, err
	}
	abs, _ := absImage(image)
	rec, dead := ublk.DeadServerRecord(abs)
	if !dead {
		return node, err
	}
	deadline := time.Now().Add(lockWait)
	for errors.Is(err, bdrv.ErrLocked) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		node, err = open()
	}
	if errors.Is(err, bdrv.ErrLocked) {
		err = fmt.Errorf("%w (still held %v after its server of %s, process %d, died)", err, lockWait, rec.Device, rec.PID)
	}
	return node, err
}

// logToFile sends a background server's stderr (and so its log) to
// /run/ublkimg/ublkbN.log (ublk.OpenLog); the log of a device that
// detached cleanly is removed.
func logToFile(logger *log.Logger, id int) {
	f, err := ublk.OpenLog(id)
	if err != nil {
		logger.SetOutput(io.Discard)
		return
	}
	unix.Dup3(int(f.Fd()), 2, 0)
	f.Close()
}

// sdNotify sends state to systemd's notification socket when the service
// manager gave one (Type=notify units); otherwise it does nothing.
func sdNotify(state string) {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	if sock[0] == '@' {
		sock = "\x00" + sock[1:] // abstract socket
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return
	}
	conn.Write([]byte(state))
	conn.Close()
}

// errnoText unwraps a *PathError to its errno text, capitalised as
// qemu-img prints it ("No such file or directory").
func errnoText(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	s := err.Error()
	if s != "" && s[0] >= 'a' && s[0] <= 'z' {
		s = strings.ToUpper(s[:1]) + s[1:]
	}
	return errors.New(s)
}
