package rbd

import (
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

const enoent = unix.ENOENT

// Completions: librbd queues each finished aio request on the image and
// writes to an eventfd (rbd_set_image_notification); rbd_poll_io_events
// then hands them over. One image handle serves every queue of a device,
// so there is one eventfd for requests issued from several loops. Its
// reader, the poller, runs while requests are in flight, on the loop of
// the request that found none running: first that request's own coroutine
// (until its request completes), then a poller coroutine if others are
// still in flight (see lead). The poller keeps a READ of the
// eventfd armed on that loop's ring (an ordinary ring operation, no thread
// blocks), polls the finished requests when it completes, and sets each
// request's coroutine.Event, which wakes the issuing coroutine on its own
// loop (directly on the poller's loop, by an IORING_OP_MSG_RING completion
// on another queue's ring). The poller ends when nothing is in flight, so
// an idle device costs nothing and no read outlives the requests. The
// price: while requests keep coming, the poller stays on the loop that
// started it, and the other queues' completions take one MSG_RING hop from
// there (QEMU's rbd driver has one AioContext per image and no such hop,
// but no multiqueue either).

// events is the driver's completion state.
type events struct {
	efd    int
	efdBuf []byte    // the armed READ's 8-byte target, heap memory
	comps  []uintptr // rbd_poll_io_events's output array, heap memory

	mu       sync.Mutex
	reqs     []*request // by id (the completion's argument); nil = free
	free     []uintptr
	inflight int  // requests submitted and not yet polled
	polling  bool // a poller coroutine runs
	reqPool  sync.Pool
}

// request is one aio request. librbd keeps raw pointers to the iovec array
// and to the data buffers after the submitting call returns, until the
// completion: both stay valid and unmoved because (1) they are Go heap
// memory or mmap memory (bdrv hands the driver its buffers through the
// Driver interface, so none can live on a goroutine stack, and iov is
// allocated here), which the Go collector never moves; (2) they stay
// reachable from events.reqs until the poller takes the completion; and
// (3) the buffers are pinned (runtime.Pinner) for that time, which is what
// Go's rules ask of memory that C keeps.
type request struct {
	done   coroutine.Event
	reaped bool // taken by reap (under events.mu); lead polls until then
	ret    int64
	iov    []unix.Iovec
	bufs   bdrv.IOVec
	pin    runtime.Pinner
}

func (e *events) initEvents(d *driver) error {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return err
	}
	if r := call(lib.setImageNotification, d.image, uintptr(efd), eventTypeEventfd); r < 0 {
		unix.Close(efd)
		return errnoText(r)
	}
	e.efd, e.efdBuf, e.comps = efd, make([]byte, 8), make([]uintptr, 64)
	return nil
}

func (e *events) closeEvents() {
	if e.efd > 0 {
		unix.Close(e.efd)
		e.efd = -1
	}
}

// newRequest takes a request for buffers bufs (nil for requests without
// data) and registers it: its id is the completion's argument.
func (e *events) newRequest(bufs bdrv.IOVec) (*request, uintptr) {
	req, _ := e.reqPool.Get().(*request)
	if req == nil {
		req = &request{}
	}
	req.done.Reset()
	req.reaped = false
	req.bufs = bufs
	req.iov = req.iov[:0]
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		req.pin.Pin(&b[0])
		req.iov = append(req.iov, unix.Iovec{Base: &b[0], Len: uint64(len(b))})
	}
	e.mu.Lock()
	var id uintptr
	if n := len(e.free); n > 0 {
		id = e.free[n-1]
		e.free = e.free[:n-1]
		e.reqs[id] = req
	} else {
		id = uintptr(len(e.reqs))
		e.reqs = append(e.reqs, req)
	}
	e.mu.Unlock()
	return req, id
}

// release unregisters a finished request and recycles it.
func (e *events) release(id uintptr, req *request) {
	req.pin.Unpin()
	req.bufs = nil
	e.mu.Lock()
	e.reqs[id] = nil
	e.free = append(e.free, id)
	e.mu.Unlock()
	e.reqPool.Put(req)
}

// submit runs one aio request: start issues it with completion comp and
// returns librbd's result. It waits for the completion and returns the
// request's result (bytes, or a negative errno).
func (d *driver) submit(co *coroutine.Co, bufs bdrv.IOVec, start func(req *request, comp uintptr) int) int64 {
	e := &d.events
	req, id := e.newRequest(bufs)
	var comp uintptr
	if r := call(lib.aioCreateCompletion, id, 0, uintptr(unsafe.Pointer(&comp))); r < 0 {
		e.release(id, req)
		return int64(r)
	}
	e.mu.Lock()
	e.inflight++
	startPoller := !e.polling
	e.polling = true
	e.mu.Unlock()
	r := start(req, comp)
	if r < 0 {
		// Not queued: no completion will come for it.
		call(lib.aioRelease, comp)
		e.mu.Lock()
		e.inflight--
		e.mu.Unlock()
		req.ret = int64(r)
	}
	switch {
	case startPoller:
		// After a failed start too: polling is set, so lead must run
		// to clear it or hand it on.
		d.lead(co, req, r >= 0)
	case r >= 0:
		req.done.Wait(co)
	}
	ret := req.ret
	e.release(id, req)
	return ret
}

// lead runs on co, whose request req found no poller running: until req
// completes (if it was queued), co is the poller, and then it hands the
// role on to a poller coroutine if other requests are in flight. So at
// depth 1 no coroutine is created per request (one was, with its stack
// growth and exit: about 5% of the process's CPU time).
func (d *driver) lead(co *coroutine.Co, req *request, queued bool) {
	for queued && !req.reaped {
		d.pollOnce(co)
	}
	if d.stillPolling() {
		co.Loop().Go(d.poll)
	}
}

// poll is the poller coroutine (see the comment at the top).
func (d *driver) poll(co *coroutine.Co) {
	for d.stillPolling() {
		d.pollOnce(co)
	}
}

// stillPolling reports whether requests are in flight, and ends the
// polling when none is.
func (d *driver) stillPolling() bool {
	e := &d.events
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.inflight == 0 {
		e.polling = false
		return false
	}
	return true
}

// pollOnce waits for the eventfd and reaps what finished.
func (d *driver) pollOnce(co *coroutine.Co) {
	co.Read(int32(d.efd), d.efdBuf, 0)
	co.Wait()
	d.reap(co)
}

// reap takes every finished request from librbd and wakes its coroutine.
func (d *driver) reap(co *coroutine.Co) {
	e := &d.events
	for {
		n := call(lib.pollIOEvents, d.image, uintptr(unsafe.Pointer(&e.comps[0])), uintptr(len(e.comps)))
		for _, c := range e.comps[:max(n, 0)] {
			id := callPtr(lib.aioGetArg, c)
			ret := call64(lib.aioGetReturnValue, c)
			call(lib.aioRelease, c)
			e.mu.Lock()
			req := e.reqs[id]
			e.inflight--
			req.reaped = true
			e.mu.Unlock()
			req.ret = ret
			req.done.Set(co)
		}
		if n < len(e.comps) {
			return
		}
	}
}

// Preadv implements bdrv.Driver with rbd_aio_readv; a short read (past the
// image's end) reads zeros, as in QEMU.
func (d *driver) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	n := iov.Len()
	r := d.submit(co, iov, func(req *request, comp uintptr) int {
		return call(lib.aioReadv, d.image, uintptr(unsafe.Pointer(&req.iov[0])), uintptr(len(req.iov)), uintptr(off), comp)
	})
	if r < 0 {
		return errnoText(int(r))
	}
	if r < n {
		iov.Zero(r, n-r)
	}
	return nil
}

// Pwritev implements bdrv.Driver with rbd_aio_writev, growing the image
// first when the write reaches past its end.
func (d *driver) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	if d.node.ReadOnly {
		return uring.NewErrno(unix.EROFS, true)
	}
	if end := off + iov.Len(); end > d.node.Length() {
		if err := d.grow(co, end); err != nil {
			return err
		}
	}
	r := d.submit(co, iov, func(req *request, comp uintptr) int {
		return call(lib.aioWritev, d.image, uintptr(unsafe.Pointer(&req.iov[0])), uintptr(len(req.iov)), uintptr(off), comp)
	})
	if r < 0 {
		return errnoText(int(r))
	}
	return nil
}

// Flush implements bdrv.Driver with rbd_aio_flush: librbd's cache (when
// on) is written to the OSDs, whose acknowledged writes are durable.
func (d *driver) Flush(co *coroutine.Co) error {
	if d.node.ReadOnly {
		return nil
	}
	r := d.submit(co, nil, func(req *request, comp uintptr) int {
		return call(lib.aioFlush, d.image, comp)
	})
	if r < 0 {
		return errnoText(int(r))
	}
	return nil
}

// Pdiscard implements bdrv.Discarder with rbd_aio_discard.
func (d *driver) Pdiscard(co *coroutine.Co, off, bytes int64) error {
	r := d.submit(co, nil, func(req *request, comp uintptr) int {
		return call(lib.aioDiscard, d.image, uintptr(off), uintptr(bytes), comp)
	})
	if r < 0 {
		return errnoText(int(r))
	}
	return nil
}

// writeZeroesThickProvision is RBD_WRITE_ZEROES_FLAG_THICK_PROVISION:
// write zeros instead of deallocating.
const writeZeroesThickProvision = 1

// PwriteZeroes implements bdrv.ZeroWriter with rbd_aio_write_zeroes, which
// deallocates when the caller allows it (ReqMayUnmap).
func (d *driver) PwriteZeroes(co *coroutine.Co, off, bytes int64, flags bdrv.ReqFlags) error {
	if end := off + bytes; end > d.node.Length() {
		if err := d.grow(co, end); err != nil {
			return err
		}
	}
	zflags := 0
	if flags&bdrv.ReqMayUnmap == 0 {
		zflags = writeZeroesThickProvision
	}
	r := d.submit(co, nil, func(req *request, comp uintptr) int {
		return call(lib.aioWriteZeroes, d.image, uintptr(off), uintptr(bytes), comp, uintptr(zflags), 0)
	})
	if r < 0 {
		return errnoText(int(r))
	}
	return nil
}
