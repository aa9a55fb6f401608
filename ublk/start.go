package ublk

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// testHook, set only by tests, is called at the named points of start and
// can make it fail there, to exercise the cleanup of every partial start.
var testHook func(point string) error

func hook(point string) error {
	if testHook != nil {
		return testHook(point)
	}
	return nil
}

// Start exports node as a new ublk block device and returns once
// /dev/ublkbN is live. The device owns node from then on: Close flushes and
// closes it, and so does Start when it fails. Everything Start created in
// the kernel is deleted again when it fails. A read-only node makes the
// device read-only, and one that ignores discards makes it refuse them.
func Start(cfg Config, node *bdrv.Node) (*Device, error) {
	if node.ReadOnly {
		cfg.ReadOnly = true
	}
	if !node.Unmap {
		cfg.Discard = DiscardIgnore // the image ignores discards
	}
	return launch(cfg, node, (*Device).start)
}

// launch makes a Device of cfg (defaulted) and node, opens the control
// device and runs sequence (start or recover), closing what it did when it
// fails.
func launch(cfg Config, node *bdrv.Node, sequence func(*Device) error) (*Device, error) {
	d := &Device{node: node, charFd: -1, done: make(chan struct{}), pauseLock: make(chan struct{}, 1)}
	var err error
	if d.cfg, err = cfg.withDefaults(); err != nil {
		d.closeNodeOnly()
		return nil, err
	}
	if d.ctrl, err = OpenCtrl(); err != nil {
		d.closeNodeOnly()
		return nil, err
	}
	if err := sequence(d); err != nil {
		d.Close()
		return nil, err
	}
	d.started = time.Now()
	d.setState(stateUp)
	return d, nil
}

// closeNodeOnly closes the node when Start fails before anything else
// exists.
func (d *Device) closeNodeOnly() {
	coroutine.Run(func(co *coroutine.Co) error { return d.node.Close(co) })
}

// wantUserCopy says whether ADD_DEV asks for user copy, given the kernel's
// features: when cfg asks for it, and for a node that hands out its data
// as memory (a raw image in tmpfs) whenever the kernel has it, unless
// cfg.NoUserCopy: a READ is then one copy, from the image's pages into the
// request's (queue.readMapped).
func wantUserCopy(cfg *Config, mappable bool, features Features) (bool, error) {
	if cfg.UserCopy && !features.Has(FeatureUserCopy) {
		return false, &UnsupportedFeatureError{Name: "UBLK_F_USER_COPY"}
	}
	return cfg.UserCopy || !cfg.NoUserCopy && mappable && features.Has(FeatureUserCopy), nil
}

// start runs the start sequence of the state diagram; Close undoes
// whatever part of it succeeded.
func (d *Device) start() error {
	cfg := &d.cfg
	params, err := buildParams(cfg, d.node, cfg.MaxIOBytes)
	if err != nil {
		return err
	}
	var flags Features
	userCopy, err := wantUserCopy(cfg, d.node.Mappable(), d.ctrl.features)
	if err != nil {
		return err
	}
	if userCopy {
		flags |= FeatureUserCopy
	}
	if cfg.Recovery {
		flags |= FeatureUserRecovery | FeatureUserRecoveryReissue
	}
	// Where the kernel can change a live device's capacity (6.16), the
	// device may be resized online (Grow).
	flags |= d.ctrl.features & FeatureUpdateSize
	d.info, err = d.ctrl.AddDev(DevInfo{
		ID: cfg.ID, Queues: cfg.Queues, Depth: cfg.Depth,
		MaxIOBufBytes: cfg.MaxIOBytes, Flags: flags,
	})
	if err != nil {
		return err
	}
	d.added = true
	if err := hook("added"); err != nil {
		return err
	}
	d.userCopy = d.info.Flags.Has(FeatureUserCopy)
	if cfg.UserCopy && !d.userCopy {
		return &UnsupportedFeatureError{Name: "UBLK_F_USER_COPY"}
	}
	// The configuration says what the device does (Config, records).
	cfg.UserCopy = d.userCopy
	if cfg.Recovery && !d.info.Flags.Has(FeatureUserRecovery|FeatureUserRecoveryReissue) {
		// Unprivileged devices lose the recovery flags in ADD_DEV.
		return &UnsupportedFeatureError{Name: "UBLK_F_USER_RECOVERY_REISSUE"}
	}
	if err := d.ctrl.setParams(d.info.ID, params); err != nil {
		return fmt.Errorf("setting device parameters: %w", err)
	}
	if d.charFd, err = openCharDev(d.CharPath()); err != nil {
		return err
	}
	if err := hook("chardev"); err != nil {
		return err
	}
	return d.startQueues("starting the device", d.ctrl.startDev)
}

// startQueues creates the device's queues on the open /dev/ublkcN, arms
// every tag of every queue, then sends goLive (START_DEV, or
// END_USER_RECOVERY; what names it in its error), which returns once the
// kernel saw every FETCH. From
// the first armed tag on, only STOP_DEV ends the queues, so d.added is set
// then: Close must stop the device.
func (d *Device) startQueues(what string, goLive func(ctx context.Context, id int) error) error {
	for i := range d.info.Queues {
		q, err := newQueue(d, uint16(i))
		if err != nil {
			return err
		}
		d.queues = append(d.queues, q)
	}
	if err := hook("queues"); err != nil {
		return err
	}
	// Arm every tag of every queue. Each queue gets its routineQueue,
	// counted before it starts, which ends when the queue's tags do.
	d.added = true
	fetched := make(chan error, len(d.queues))
	for _, q := range d.queues {
		q.armed = true
		d.stopping.Add(1)
		go d.routineQueue(q)
		q.start(fetched)
	}
	for range d.queues {
		if err := <-fetched; err != nil {
			return err
		}
	}
	if err := hook("fetched"); err != nil {
		return err
	}
	// Every queue now waits in io_uring_enter, so it can serve the reads
	// of the partition scan START_DEV does before it returns (and the
	// requests END_USER_RECOVERY releases).
	ctx, cancel := context.WithCancel(context.Background())
	d.state.Lock()
	d.state.startCancel = cancel
	d.state.Unlock()
	if d.Err() != nil {
		cancel() // a queue failed before the cancel was in place
	}
	err := goLive(ctx, d.info.ID)
	cancel()
	if err != nil {
		if f := d.failure.Load(); f != nil {
			return *f
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	waitForNode(d.Path())
	return nil
}

// openCharDev opens /dev/ublkcN, waiting briefly while udev creates it
// (ENOENT) or a previous server of the same id still holds it (EBUSY).
func openCharDev(path string) (int, error) {
	deadline := time.Now().Add(3 * time.Second)
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			return fd, nil
		}
		if err == unix.EINTR {
			continue
		}
		if (err != unix.ENOENT && err != unix.EBUSY) || time.Now().After(deadline) {
			return -1, fmt.Errorf("opening %s: %w", path, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitForNode waits up to 5 s for a device node udev may still be creating.
func waitForNode(path string) {
	for range 250 {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
