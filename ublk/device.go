package ublk

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// deviceState is where a Device is in its life:
//
//	        Start: ADD_DEV, SET_PARAMS, open /dev/ublkcN,
//	        queues FETCH every tag, START_DEV
//	down ─────────────────────────────────────────────> up
//	  │                                                 │
//	  │ Start failed      Close (signal, detach, error, │
//	  │                   device stopped from outside)  │
//	  └───────────────────────> closed <────────────────┘
//	        STOP_DEV, queues end, image flushed and closed,
//	        /dev/ublkcN released, DEL_DEV
type deviceState int

const (
	stateDown deviceState = iota
	stateUp
	stateClosed
)

func (s deviceState) String() string {
	switch s {
	case stateDown:
		return "down"
	case stateUp:
		return "up"
	case stateClosed:
		return "closed"
	}
	return fmt.Sprintf("deviceState(%d)", int(s))
}

// Device is an image exported as /dev/ublkbN: the control-plane handle of
// one ublk device and its queues. It owns the image node it serves.
type Device struct {
	cfg  Config
	ctrl *Ctrl
	// node is the image served. The queues read it without a lock: it
	// changes only while the device is paused (SetNode), under nodeMu for
	// other readers.
	node     *bdrv.Node
	nodeMu   sync.Mutex
	info     DevInfo // as negotiated by ADD_DEV
	added    bool    // ADD_DEV succeeded: Close must stop and delete
	charFd   int     // /dev/ublkcN, -1 when not open
	userCopy bool
	queues   []*queue

	// stopping counts the routineQueue goroutines; Close waits for it.
	stopping sync.WaitGroup
	// loopsMu orders posts to the queues' loops (pause.go) before their
	// close: routineQueue sets queue.ended under it.
	loopsMu sync.RWMutex
	// pauseLock is held (a value in it) from Pause to Resume.
	pauseLock chan struct{}
	// started is when the device started serving, for the statistics.
	started time.Time

	// state is guarded by its mutex. deviceState is an advisory snapshot
	// (for String); the lifecycle itself is ordered by Start and
	// closeOnce.
	state struct {
		sync.Mutex
		deviceState
		// startCancel aborts a START_DEV in flight when a queue fails.
		startCancel context.CancelFunc
	}

	// done is closed when the device stops serving on its own: a queue
	// ended (the device was stopped or deleted by someone else) or failed.
	done     chan struct{}
	doneOnce sync.Once
	// failure is the error that closed done, if any.
	failure atomic.Pointer[error]

	ioErrors atomic.Int64
	// handover is set once Handover closed the node: Close must leave the
	// device to the next server.
	handover  atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// routineQueue accompanies one queue for its whole life. It is counted in
// d.stopping before it starts. It waits until every tag of the queue has
// ended (the device was stopped, by Close or from outside), then closes
// the queue's loop, which closes its ring.
func (d *Device) routineQueue(q *queue) {
	defer d.stopping.Done()
	d.cfg.Logf("ublkb%d: queue %d: serving %d tags", d.info.ID, q.id, len(q.tags))
	<-q.done
	d.loopsMu.Lock()
	q.ended = true
	d.loopsMu.Unlock()
	q.loop.Close()
	d.cfg.Logf("ublkb%d: queue %d: stopped", d.info.ID, q.id)
	d.markDone(nil)
}

// failed is called by a queue (on its loop) when the kernel refused a
// command: the device can no longer serve every tag, so it stops.
func (d *Device) failed(err error) {
	d.cfg.Logf("ublkb%d: %v", d.info.ID, err)
	d.markDone(err)
	d.state.Lock()
	cancel := d.state.startCancel
	d.state.Unlock()
	if cancel != nil {
		cancel()
	}
}

func (d *Device) markDone(err error) {
	d.doneOnce.Do(func() {
		if err != nil {
			d.failure.Store(&err)
		}
		close(d.done)
	})
}

// ioError reports a failed request; after the first few, only every
// thousandth is logged.
func (d *Device) ioError(op fmt.Stringer, off, n int64, err error) {
	c := d.ioErrors.Add(1)
	if c <= 10 || c%1000 == 0 {
		d.cfg.Logf("ublkb%d: %v of %d bytes at %d: %v (%d I/O errors so far)", d.info.ID, op, n, off, err, c)
	}
}

func (d *Device) setState(s deviceState) {
	d.state.Lock()
	d.state.deviceState = s
	d.state.Unlock()
}

// ID is the device number N.
func (d *Device) ID() int { return d.info.ID }

// Path is the block device, /dev/ublkbN.
func (d *Device) Path() string { return fmt.Sprintf("/dev/ublkb%d", d.info.ID) }

// CharPath is the device's character device, /dev/ublkcN.
func (d *Device) CharPath() string { return fmt.Sprintf("/dev/ublkc%d", d.info.ID) }

// Info is the device as ADD_DEV negotiated it (queues, depth, flags).
func (d *Device) Info() DevInfo { return d.info }

// Config is the configuration in effect, with defaults filled in.
func (d *Device) Config() Config { return d.cfg }

// Done is closed when the device stops serving by itself: it was stopped or
// deleted from outside (ublk tools, a kernel abort), or a queue failed. Err
// then says why. Call Close afterwards to release everything.
func (d *Device) Done() <-chan struct{} { return d.done }

// Err returns the failure that closed Done, or nil.
func (d *Device) Err() error {
	if f := d.failure.Load(); f != nil {
		return *f
	}
	return nil
}

// IOErrors is the number of requests that failed so far.
func (d *Device) IOErrors() int64 { return d.ioErrors.Load() }

// Stats returns the device's figures now: every queue's, and the format
// driver's counters of the node it serves (through filters).
func (d *Device) Stats() DeviceStats {
	node := d.Node()
	s := DeviceStats{ID: d.info.ID, Device: d.Path(), UptimeNs: uint64(time.Since(d.started))}
	for _, q := range d.queues {
		s.Queues = append(s.Queues, q.statsSnapshot(d))
	}
	if node != nil {
		img := bdrv.Unfiltered(node)
		s.Image, s.Format = img.Filename, img.Format.Name
		for _, c := range img.Counters() {
			s.FormatCounters = append(s.FormatCounters, Counter{Name: c.Name, Value: c.Value})
		}
	}
	return s
}

func (d *Device) String() string {
	d.state.Lock()
	defer d.state.Unlock()
	return fmt.Sprintf("ublkb%d (%s)", d.info.ID, d.state.deviceState)
}

// Close stops the device and releases everything, in this order, and
// returns the first errors met (each step runs regardless):
//
//  1. mark the device closed;
//  2. STOP_DEV: the kernel removes /dev/ublkbN once the requests in flight
//     completed (the queues keep serving until then) and ends every tag;
//  3. wait for the queues: each loop closes its ring when its tags ended;
//  4. drain, flush and close the image: nothing can send requests now;
//  5. unmap the queues' descriptors and buffers and close /dev/ublkcN,
//     the server's last references to the device;
//  6. DEL_DEV: removes /dev/ublkcN and waits until the kernel released
//     the device;
//  7. close the control device.
//
// Close may be called more than once and from any goroutine; later calls
// wait for the first and return its result.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		if d.handover.Load() {
			d.closeErr = ErrHandedOver
			return
		}
		d.closeErr = d.close()
	})
	return d.closeErr
}

func (d *Device) close() error {
	var errs []error
	// 1. A pause in progress ends first: its held requests must reach
	// the node before STOP_DEV can complete. Later pauses see the state.
	d.setState(stateClosed)
	d.pauseLock <- struct{}{}
	<-d.pauseLock
	// 2. A device that was never started (or was stopped from outside)
	// takes it too: STOP_DEV always cancels the armed fetches.
	if d.added {
		if err := d.ctrl.StopDev(d.info.ID); err != nil && !errors.Is(err, ErrNoDevice) {
			errs = append(errs, fmt.Errorf("stopping ublkb%d: %w", d.info.ID, err))
		}
	}
	d.cfg.Logf("ublkb%d: stopped", d.info.ID)
	// 3. Queues whose tags were never armed have no routineQueue.
	for _, q := range d.queues {
		if !q.armed {
			q.loop.Close()
		}
	}
	d.stopping.Wait()
	// 4.
	if err := d.ctrl.loop.Call(func(co *coroutine.Co) error { return d.node.Close(co) }); err != nil {
		errs = append(errs, fmt.Errorf("closing the image: %w", err))
	}
	d.cfg.Logf("ublkb%d: image closed", d.info.ID)
	// 5.
	for _, q := range d.queues {
		q.unmap()
	}
	if d.charFd >= 0 {
		unix.Close(d.charFd)
		d.charFd = -1
	}
	// 6.
	if d.added {
		if err := d.ctrl.DelDev(d.info.ID); err != nil && !errors.Is(err, ErrNoDevice) {
			errs = append(errs, fmt.Errorf("deleting ublkb%d: %w", d.info.ID, err))
		}
	}
	d.cfg.Logf("ublkb%d: deleted", d.info.ID)
	// 7.
	d.ctrl.Close()
	d.markDone(nil)
	return errors.Join(errs...)
}

// Serve exports node as a ublk device and serves it until ctx ends or the
// device stops by itself (see Device.Done), then closes it; it is modelled
// on libublk's run_target. started, when not nil, is called once
// /dev/ublkbN is live (to announce it); an error from it stops the device.
// Serve owns node and returns the first error of starting, serving or
// closing.
func Serve(ctx context.Context, cfg Config, node *bdrv.Node, started func(*Device) error) error {
	d, err := Start(cfg, node)
	if err != nil {
		return err
	}
	if started != nil {
		if err := started(d); err != nil {
			return errors.Join(err, d.Close())
		}
	}
	select {
	case <-ctx.Done():
	case <-d.Done():
	}
	return errors.Join(d.Err(), d.Close())
}
