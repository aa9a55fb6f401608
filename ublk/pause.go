package ublk

import (
	"context"
	"errors"
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Pausing a device: the live jobs (external snapshot, active commit,
// backup) change the node a device serves, and a restart hands the device
// to another server. Both need a moment at which no request runs and none
// starts: QEMU's drained section.
//
// Each queue has a gate on its loop: while paused, a request the kernel
// hands a tag waits in the tag's coroutine (the kernel keeps it pending;
// the file system sees a slow disk, never an error) until the device
// resumes. Pause closes the gates of every queue on their loops, then waits
// until the requests already past the gate have completed. The gate costs
// the hot path one test of a flag on the queue's own thread.

// ErrDeviceClosed is matched by the error of a pause asked of a device
// that is closing.
var ErrDeviceClosed = errors.New("the device is closing")

// Pause holds the device's new requests and returns once no request is in
// flight, or with ctx's error (the device is then resumed). Pauses do not
// nest: a second Pause waits until the first one's Resume. Between Pause
// and Resume the caller may replace the node ([Device.SetNode]) or flush
// it; Close waits for the Resume, so a pause must be short.
func (d *Device) Pause(ctx context.Context) error {
	select {
	case d.pauseLock <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	d.state.Lock()
	closed := d.state.deviceState == stateClosed
	d.state.Unlock()
	if closed {
		<-d.pauseLock
		return fmt.Errorf("%s: %w", d.Path(), ErrDeviceClosed)
	}
	var idle []chan struct{}
	for _, q := range d.queues {
		ch := make(chan struct{})
		if !d.postQueue(q, func() {
			q.gate.paused = true
			if q.stats.inFlight == 0 {
				close(ch)
			} else {
				q.gate.idle = ch
			}
		}) {
			continue // the queue ended: nothing runs there
		}
		idle = append(idle, ch)
	}
	for _, ch := range idle {
		select {
		case <-ch:
		case <-ctx.Done():
			d.Resume()
			return ctx.Err()
		}
	}
	return nil
}

// Resume opens the gates Pause closed: the held requests go on, to the
// device's node as it is now.
func (d *Device) Resume() {
	for _, q := range d.queues {
		d.postQueue(q, func() {
			q.gate.paused = false
			q.gate.idle = nil
			q.gate.held.RestartAll(nil)
		})
	}
	<-d.pauseLock
}

// postQueue runs fn on q's loop unless the queue has ended (its loop is
// closed or closing), and reports whether it did.
func (d *Device) postQueue(q *queue, fn func()) bool {
	d.loopsMu.RLock()
	defer d.loopsMu.RUnlock()
	if q.ended || !q.armed {
		return false
	}
	q.loop.Post(fn)
	return true
}

// Node is the node the device serves now.
func (d *Device) Node() *bdrv.Node {
	d.nodeMu.Lock()
	defer d.nodeMu.Unlock()
	return d.node
}

// SetNode makes the device serve node from now on; the device must be
// paused. The device owns node (Close closes it); the node it replaces is
// the caller's.
func (d *Device) SetNode(node *bdrv.Node) {
	d.nodeMu.Lock()
	d.node = node
	d.nodeMu.Unlock()
}

// ErrHandedOver is what Close returns after Handover: the device was left
// to the next server.
var ErrHandedOver = errors.New("the device was handed over to another server")

// Handover prepares the device to be served by another process without the
// file system noticing (ublkimg restart): it pauses the device for good,
// flushes the node and closes it, releasing the image for the next server.
// The device stays in the kernel with its requests pending: the caller
// must then exit (or at least close every ring and /dev/ublkcN) without
// calling Close; the kernel quiesces the device (Config.Recovery), and the
// requests that were held here go to the server that recovers it
// (Recover), REISSUE sending again those whose result had not reached the
// kernel. A device without recovery is refused, as is one whose flush
// fails: it then goes on serving.
func (d *Device) Handover(ctx context.Context) error {
	if !d.info.Flags.Has(FeatureUserRecovery | FeatureUserRecoveryReissue) {
		return fmt.Errorf("cannot hand %s over: %w (attach --recovery)", d.Path(), ErrNotRecoverable)
	}
	if err := d.Pause(ctx); err != nil {
		return err
	}
	node := d.Node()
	if err := d.ctrl.loop.Call(func(co *coroutine.Co) error { return node.Flush(co) }); err != nil {
		d.Resume()
		return fmt.Errorf("cannot hand %s over: flushing the image: %w", d.Path(), err)
	}
	d.handover.Store(true)
	d.setState(stateClosed)
	// The image was flushed: what is acknowledged is in it. A failure to
	// close it now (storing bitmaps) leaves work for the next open, no
	// lost write; it is reported, and the handover goes on.
	if err := d.ctrl.loop.Call(func(co *coroutine.Co) error { return node.Close(co) }); err != nil {
		d.cfg.Logf("ublkb%d: closing the image for the next server: %v", d.info.ID, err)
	}
	return nil
}
