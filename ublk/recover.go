package ublk

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/ublk/internal/uapi"
)

var (
	// ErrNotRecoverable means the device was created without
	// UBLK_F_USER_RECOVERY (attach without --recovery): its server cannot
	// be replaced.
	ErrNotRecoverable = errors.New("it was not attached with recovery")
	// ErrNotQuiesced means the device is not waiting for a new server: it
	// is live (its server runs) or stopped.
	ErrNotQuiesced = errors.New("it is not quiesced")
)

// recoverWait bounds the waits of Recover for the kernel to finish with the
// dead server: its rings are torn down asynchronously, and until then the
// device may still be LIVE, and START_USER_RECOVERY fails with EBUSY while
// the dead server's /dev/ublkcN is not yet released.
const recoverWait = 5 * time.Second

// recoverPoll is the interval of those waits: short, since a restart
// (Handover) waits through them with the device's I/O held.
const recoverPoll = 2 * time.Millisecond

// Recover attaches a new server to device cfg.ID, whose server died while
// the device was created with Config.Recovery (state QUIESCED: the kernel
// kept /dev/ublkbN and holds its requests). It runs the kernel's recovery
// sequence: START_USER_RECOVERY, open /dev/ublkcN, map and create the
// queues as they were (queue count, depth and buffer size come from the
// kernel), FETCH every tag, END_USER_RECOVERY. It returns once the device
// is LIVE again; the held requests, and those the dead server had not
// completed (REISSUE), then reach node.
//
// node must be the image the device served, of the same size. Of cfg, only
// ID, ReadOnly, Discard and Logf are used. The Device owns node as Start's
// does, and Close stops and deletes the device. When Recover fails before
// any tag was armed, the device stays QUIESCED for another attempt; after
// that, only stopping it ends the queues, so it is deleted.
func Recover(cfg Config, node *bdrv.Node) (*Device, error) {
	return launch(cfg, node, (*Device).recover)
}

// recover runs the recovery sequence; Close undoes what part of it
// succeeded.
func (d *Device) recover() error {
	id := d.cfg.ID
	if id < 0 {
		return fmt.Errorf("recover: a device id is needed, not %d", id)
	}
	d.info.ID = id // for Close's messages
	info, err := waitQuiesced(d.ctrl, id)
	if err != nil {
		return err
	}
	params, err := d.ctrl.getParams(id)
	if err != nil {
		return err
	}
	cfg := &d.cfg
	cfg.Queues, cfg.Depth, cfg.MaxIOBytes = info.Queues, info.Depth, info.MaxIOBufBytes
	cfg.BlockSize = 1 << params.Basic.LogicalBSShift
	cfg.UserCopy = info.Flags.Has(FeatureUserCopy)
	bs := int64(cfg.BlockSize)
	if got, want := uint64(d.node.Length()/bs*bs)>>9, params.Basic.DevSectors; got != want {
		return fmt.Errorf("/dev/ublkb%d: the image has %d sectors, the device %d: not the image it served", id, got, want)
	}
	devRO := params.Basic.Attrs&uapi.AttrReadOnly != 0
	if d.node.ReadOnly && !devRO {
		return fmt.Errorf("/dev/ublkb%d is writable: it cannot be served from a read-only image", id)
	}
	cfg.ReadOnly = devRO
	deadline := time.Now().Add(recoverWait)
	for {
		err = d.ctrl.startRecovery(id)
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			break
		}
		time.Sleep(recoverPoll)
	}
	if errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("/dev/ublkb%d: the dead server's /dev/ublkc%d is still held after %v: %w", id, id, recoverWait, err)
	}
	if err != nil {
		return err
	}
	d.info = info
	d.userCopy = cfg.UserCopy
	if d.charFd, err = openCharDev(d.CharPath()); err != nil {
		return err
	}
	return d.startQueues("ending recovery", d.ctrl.endRecovery)
}

// WaitRecoverable returns nil once device id can be recovered, waiting a
// few seconds while the kernel tears a killed server down, or the one-line
// reason it cannot: no such device, created without recovery, live with a
// running server, stopped.
func WaitRecoverable(c *Ctrl, id int) error {
	_, err := waitQuiesced(c, id)
	return err
}

// waitQuiesced returns device id's info once it is QUIESCED (or FAIL_IO,
// 6.13+), waiting up to recoverWait while it is still LIVE with its server
// gone: the kernel quiesces it only when it tears the dead server's rings
// down. A device created without recovery, a stopped one and one whose
// server runs are refused, each with one line.
func waitQuiesced(c *Ctrl, id int) (DevInfo, error) {
	deadline := time.Now().Add(recoverWait)
	for {
		info, err := c.DevInfo(id)
		if err != nil {
			return info, err
		}
		if !info.Flags.Has(FeatureUserRecovery) {
			return info, fmt.Errorf("cannot recover /dev/ublkb%d: %w", id, ErrNotRecoverable)
		}
		switch info.State {
		case StateQuiesced, StateFailIO:
			return info, nil
		case StateLive:
			if info.PID > 0 && procStart(info.PID) != 0 {
				return info, fmt.Errorf("cannot recover /dev/ublkb%d: %w: it is live, served by process %d", id, ErrNotQuiesced, info.PID)
			}
			if time.Now().Before(deadline) {
				time.Sleep(recoverPoll)
				continue
			}
		}
		return info, fmt.Errorf("cannot recover /dev/ublkb%d: %w (state %s)", id, ErrNotQuiesced, info.State)
	}
}
