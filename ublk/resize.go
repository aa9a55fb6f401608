package ublk

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/coroutine"
	"ublkimg/ublk/internal/uapi"
)

// FeatureUpdateSize is UBLK_F_UPDATE_SIZE (6.16): the capacity of a live
// device can change (UPDATE_SIZE). Start asks for it where the kernel has
// it.
const FeatureUpdateSize = uapi.FUpdateSize

// CanResize returns nil when the device's capacity can change while it is
// live, or why not, naming the kernel it needs.
func (d *Device) CanResize() error {
	if d.info.Flags.Has(FeatureUpdateSize) {
		return nil
	}
	release := "this one"
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		release = unix.ByteSliceToString(u.Release[:])
	}
	if d.ctrl.features.Has(FeatureUpdateSize) {
		return fmt.Errorf("%s was created without UBLK_F_UPDATE_SIZE: detach and attach it again to resize it online", d.Path())
	}
	return fmt.Errorf("online resize of %s needs Linux 6.16 or later (UBLK_F_UPDATE_SIZE); the kernel is %s", d.Path(), release)
}

// Grow makes the image and the device size bytes (a multiple of the block
// size, larger than the image): the device pauses, the image grows, the
// kernel is told the new capacity (UPDATE_SIZE), the device resumes. A
// kernel without UPDATE_SIZE is refused before anything changes
// (CanResize).
func (d *Device) Grow(ctx context.Context, size int64) error {
	if err := d.CanResize(); err != nil {
		return err
	}
	bs := int64(d.cfg.BlockSize)
	node := d.Node()
	switch {
	case size%bs != 0:
		return fmt.Errorf("%s: the new size %d is not a multiple of the block size %d", d.Path(), size, bs)
	case size < node.Length():
		return fmt.Errorf("%s: shrinking an attached image is not supported (it is %d bytes)", d.Path(), node.Length())
	case size == node.Length():
		return nil
	}
	if err := d.Pause(ctx); err != nil {
		return err
	}
	defer d.Resume()
	node = d.Node()
	if err := d.ctrl.loop.Call(func(co *coroutine.Co) error { return node.Truncate(co, size, false, 0) }); err != nil {
		return fmt.Errorf("%s: growing the image to %d bytes: %w", d.Path(), size, err)
	}
	cc := uapi.CtrlCmd{DevID: devID(d.info.ID), Data: uint64(size) >> 9}
	if err := d.ctrl.run(ctx, uapi.UCmdUpdateSize, d.info.ID, cc, payload{}); err != nil {
		return fmt.Errorf("%s: the image is %d bytes, but the device did not grow: %w", d.Path(), size, err)
	}
	return nil
}
