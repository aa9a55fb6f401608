package jobs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Snapshot takes a live external snapshot (QEMU's blockdev-snapshot-sync):
// it creates overlay, a new qcow2 image backed by the image the device
// serves, and switches the device to it; the old image becomes the
// overlay's backing file, read-only and unchanged from then on. The device
// pauses only while the image is flushed and reopened and the overlay put
// in its place.
//
// Order, and what a failure (or the death of the process) at each step
// leaves:
//
//  1. create the overlay (header written and flushed) and open it: the
//     device still serves the image; an overlay left by a crash is an
//     empty file nobody uses;
//  2. pause, flush the image: everything acknowledged is in it;
//  3. close the image and open it read-only: it is consistent on disk
//     (qcow2: clean, bitmaps stored) before anything else happens;
//  4. pivot(overlay): the caller records the overlay as the device's
//     image before any write reaches it, so a server that dies from now
//     on is recovered onto the overlay;
//  5. serve the overlay, resume.
//
// A failure in 2-4 removes the overlay and serves the image again
// (reopened read-write after 3). The overlay is opened with options
// derived from the image's (overlayOptions), which pivot is given.
func Snapshot(ctx context.Context, dev Device, overlay string, o OpenOptions, pivot PivotFunc) error {
	base, err := activeImage(dev, "live snapshot", false)
	if err != nil {
		return err
	}
	if err := checkNew(overlay, "overlay"); err != nil {
		return err
	}
	abs, err := filepath.Abs(overlay)
	if err != nil {
		return err
	}
	backing, err := filepath.Abs(base.Filename)
	if err != nil {
		return err
	}
	create, topOpts, err := overlayOptions(base, o.Image)
	if err != nil {
		return err
	}
	create["backing_file"], create["backing_fmt"] = backing, base.Format.Name
	return coroutine.Run(func(co *coroutine.Co) error {
		req := &bdrv.CreateRequest{Filename: abs, Size: base.Length(), Options: create}
		if err := bdrv.Create(co, "qcow2", req); err != nil {
			return fmt.Errorf("creating the overlay: %w", err)
		}
		top, err := bdrv.Open(co, bdrv.Spec{Filename: abs, Format: "qcow2", Cache: o.Cache, Options: topOpts.Merge(o.Options),
			NoUnmap: !base.Unmap, NoBacking: true})
		if err != nil {
			os.Remove(abs)
			return fmt.Errorf("opening the overlay: %w", err)
		}
		fail := func(err error) error {
			top.Backing = nil
			top.Close(co)
			os.Remove(abs)
			return err
		}
		if err := pause(co, ctx, dev); err != nil {
			return fail(err)
		}
		defer dev.Resume()
		if err := base.Flush(co); err != nil {
			return fail(fmt.Errorf("flushing the image: %w", err))
		}
		ro, err := switchMode(co, dev, base, true, o, o.Image)
		if err != nil {
			return fail(err)
		}
		top.Backing = ro
		if err := pivot(abs, "qcow2", topOpts); err != nil {
			top.Backing = nil
			if _, rerr := switchMode(co, dev, ro, false, o, o.Image); rerr != nil {
				err = errors.Join(err, rerr)
			}
			return fail(err)
		}
		dev.SetNode(top)
		return nil
	})
}

// overlayCarried are the options of the device's image that its overlay
// is opened with too: how the device caches, discards and detects zeros.
// The format's own options stay with the image, which the overlay's
// "backing." options open.
var overlayCarried = []string{bdrv.OptCacheDirect, bdrv.OptCacheNoFlush, bdrv.OptDiscard, bdrv.OptDetectZeroes}

// overlayOptions returns the create options of a live snapshot's overlay
// over base, an image opened with options opts (OpenOptions.Image), and
// the options to open it with (nil when opts are nil): those of
// overlayCarried, the "file." ones (the overlay is a file next to base),
// and opts as "backing." ones, which reopen base with its secret and
// format options. An encrypted base (qcow2 with encrypt.key-secret, luks
// with key-secret) gets an overlay encrypted with LUKS under the same
// secret: what the device is written from then on is not stored in
// clear either. (QEMU's blockdev-snapshot-sync creates a plain overlay;
// with blockdev-create and blockdev-snapshot it can be encrypted as here.)
// Options that make base read differently from what its file name says,
// raw's offset and size, are refused: the overlay's header can only name
// base's file.
func overlayOptions(base *bdrv.Node, opts bdrv.Options) (create, open bdrv.Options, err error) {
	create = bdrv.Options{}
	if opts == nil {
		return create, nil, nil
	}
	if base.Format.Name == "raw" {
		for _, k := range []string{"offset", "size"} {
			if _, ok := opts[k]; ok {
				return nil, nil, fmt.Errorf("live snapshot: '%s' is opened with the raw option %s, which the overlay's backing file name cannot carry", base.Filename, k)
			}
		}
	}
	open = bdrv.Options{}
	for k, v := range opts {
		if strings.HasPrefix(k, "file.") || slices.Contains(overlayCarried, k) {
			open[k] = v
		}
		open["backing."+k] = v
	}
	if secret := opts[secretOption(base.Format.Name)]; secret != "" {
		luksOptions(create, secret, overlayIterTime)
		open[secretOption("qcow2")] = secret
	}
	return create, open, nil
}

// overlayIterTime is the encrypt.iter-time of an encrypted overlay, ""
// for QEMU's default (2 s of key derivation, at the creation and again at
// the open, both before the device pauses); the tests shorten it.
var overlayIterTime = ""

// switchMode closes image n, which the device serves (paused) or which
// is the backing file of the node it serves, and opens it again read-only
// or read-write. The device serves the reopened image when it served n.
// When the reopen fails, n is opened again in its former mode; the error
// says what happened.
func switchMode(co *coroutine.Co, dev Device, n *bdrv.Node, readOnly bool, o OpenOptions, opts bdrv.Options) (*bdrv.Node, error) {
	served := dev.Node() == n
	if err := n.Close(co); err != nil {
		return nil, fmt.Errorf("closing '%s': %w", n.Filename, err)
	}
	m, err := reopen(co, n, readOnly, o, opts)
	if err != nil {
		mode := "read-write"
		if readOnly {
			mode = "read-only"
		}
		err = fmt.Errorf("reopening '%s' %s: %w", n.Filename, mode, err)
		back, berr := reopen(co, n, n.ReadOnly, o, opts)
		if berr != nil {
			return nil, errors.Join(err, fmt.Errorf("and again as before: %w", berr))
		}
		m = back
		if served {
			dev.SetNode(m)
		}
		return m, err
	}
	if served {
		dev.SetNode(m)
	}
	return m, nil
}
