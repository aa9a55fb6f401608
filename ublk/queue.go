package ublk

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/ublk/internal/uapi"
	"ublkimg/uring"
)

var pageSize = os.Getpagesize()

// queue is one hardware queue of a device: a coroutine loop (one locked OS
// thread, one io_uring carrying both the ublk commands and the image I/O),
// the queue's descriptor area mapped from /dev/ublkcN, one buffer per tag
// outside the Go heap, and one long-lived coroutine per tag.
//
// Fields set before the loop starts serving are read-only afterwards; live
// and err are owned by the loop's thread.
type queue struct {
	dev  *Device
	id   uint16
	loop *coroutine.Loop
	desc uapi.DescArea // PROT_READ mapping of the descriptors
	bufs []byte        // anonymous mapping, depth * maxIO bytes; nil with user copy
	tags []tag
	// armed is set by the control goroutine before the tags start.
	armed bool
	// ended is set, under Device.loopsMu, before the loop is closed.
	ended bool

	// live counts tag coroutines that have not returned; the last one
	// closes done.
	live int
	done chan struct{}
	// err is the first unexpected command failure (not ENODEV).
	err error

	// gate holds new requests while the device is paused (pause.go).
	// Owned by the loop's thread.
	gate struct {
		paused bool
		// held are the tags whose request waits for the resume.
		held coroutine.Queue
		// idle, when set, is closed once no request is in flight.
		idle chan struct{}
	}
	// stats are written by the loop's thread only (stats.go).
	stats queueStats
}

// tag is the state of one tag: its buffer and its request vector, reused by
// every request so the hot path allocates nothing (TestHandleAllocs).
type tag struct {
	id  uint16
	buf []byte
	iov bdrv.IOVec // one element, resliced over buf per request
}

// ioFlusher marks the calling thread PR_SET_IO_FLUSHER: memory reclaim on
// it must not recurse into I/O, which could wait for this very device (the
// kernel's loop and nbd workers are marked the same way). Without
// CAP_SYS_RESOURCE it is skipped.
func ioFlusher() error {
	err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0)
	if err != nil && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", err)
	}
	return nil
}

// newQueue maps queue id's descriptors and tag buffers and starts its loop.
// The tags are not armed yet: see start.
func newQueue(d *Device, id uint16) (*queue, error) {
	depth := d.info.Depth
	q := &queue{dev: d, id: id, done: make(chan struct{})}
	desc, err := unix.Mmap(d.charFd, uapi.DescAreaOffset(id), uapi.DescAreaLen(uint16(depth), pageSize),
		unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mapping descriptors of queue %d: %w", id, err)
	}
	q.desc = desc
	maxIO := d.info.MaxIOBufBytes
	// One mapping for all tags: untouched pages cost no memory, so the
	// resident size follows the requests actually made.
	bufs, err := unix.Mmap(-1, 0, depth*maxIO, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		q.unmap()
		return nil, fmt.Errorf("allocating buffers of queue %d: %w", id, err)
	}
	q.bufs = bufs
	// Transparent huge pages would defeat that: where THP is "always"
	// (Debian's kernels), the first 4 KiB request of a tag faults in
	// 2 MiB. A kernel without THP refuses the advice (EINVAL).
	if err := unix.Madvise(bufs, unix.MADV_NOHUGEPAGE); err != nil && !errors.Is(err, unix.EINVAL) {
		q.unmap()
		return nil, fmt.Errorf("allocating buffers of queue %d: madvise: %w", id, err)
	}
	q.tags = make([]tag, depth)
	for i := range q.tags {
		t := &q.tags[i]
		t.id = uint16(i)
		t.buf = bufs[i*maxIO : (i+1)*maxIO : (i+1)*maxIO]
		t.iov = bdrv.IOVec{nil}
	}
	q.loop, err = coroutine.Start(coroutine.Config{
		// Room for every tag's ublk command plus image I/O.
		Entries:  uint32(min(max(2*depth, 64), 4096)),
		OnThread: ioFlusher,
		PollMax:  d.cfg.PollMax,
	})
	if err != nil {
		q.unmap()
		return nil, fmt.Errorf("starting queue %d: %w", id, err)
	}
	return q, nil
}

// unmap releases the mappings. The loop must be closed (no command in
// flight references them).
func (q *queue) unmap() {
	if q.desc != nil {
		unix.Munmap(q.desc)
		q.desc = nil
	}
	if q.bufs != nil {
		unix.Munmap(q.bufs)
		q.bufs = nil
	}
}

// start creates the tag coroutines, each of which queues its FETCH, and
// reports on fetched once the loop has submitted every FETCH (the error of
// a FETCH the kernel refused at once, or nil). From then on the loop sits in
// io_uring_enter waiting for requests, so START_DEV can be sent.
func (q *queue) start(fetched chan<- error) {
	q.loop.Post(func() {
		q.live = len(q.tags)
		for i := range q.tags {
			t := &q.tags[i]
			q.loop.Go(func(co *coroutine.Co) { q.serve(co, t) })
		}
		// This coroutine runs after every tag queued its FETCH; its NOP
		// goes out in the same io_uring_enter, behind them, so when it
		// completes every FETCH has been issued, and the CQE of any FETCH
		// refused inline has already been handled.
		q.loop.Go(func(co *coroutine.Co) {
			co.SQE().PrepNop()
			co.Wait()
			fetched <- q.err
		})
	})
}

// fail records the first unexpected error of the queue and tells the
// device, which stops.
func (q *queue) fail(err error) {
	if q.err == nil {
		q.err = err
		q.dev.failed(err)
	}
}

// serve is the life of one tag: FETCH, then handle the request the kernel
// delivered and COMMIT_AND_FETCH its result, until the kernel ends the tag
// with ENODEV (the device is stopping).
func (q *queue) serve(co *coroutine.Co, t *tag) {
	defer func() {
		q.live--
		if q.live == 0 {
			close(q.done)
		}
	}()
	op := uapi.UIOFetchReq
	var result int32
	for {
		res := q.command(co, op, t, result)
		switch res {
		case uapi.IOResOK:
		case uapi.IOResAbort:
			return
		default:
			q.fail(fmt.Errorf("queue %d tag %d: %s: %w", q.id, t.id, cmdName(op), uring.ResultError(res)))
			return
		}
		d := q.desc.At(t.id)
		result = q.handle(co, t, &d)
		op = uapi.UIOCommitAndFetchReq
	}
}

// command queues a FETCH or COMMIT_AND_FETCH for t and waits for its
// completion, which is the next request for the tag (or its end).
func (q *queue) command(co *coroutine.Co, op uapi.CmdOp, t *tag, result int32) int32 {
	if q.dev.ctrl.legacy {
		op = op.Legacy()
	}
	cmd := uapi.IOCmd{QID: q.id, Tag: t.id, Result: result}
	if !q.dev.userCopy {
		cmd.Addr = uint64(uintptrOf(t.buf))
	}
	sqe := co.SQE()
	sqe.PrepURingCmd(int32(q.dev.charFd), uint32(op), nil)
	cmd.Encode(sqe.Cmd()[:])
	return co.Wait()
}

// handle serves one request: it waits while the device is paused, performs
// the request and counts it, and returns the COMMIT result: the bytes
// transferred, 0, or -errno.
func (q *queue) handle(co *coroutine.Co, t *tag, d *uapi.IODesc) int32 {
	for q.gate.paused {
		q.gate.held.Wait(co, nil)
	}
	loop := co.Loop()
	start := loop.WokeAt()
	q.stats.inFlight++
	res := q.perform(co, t, d)
	q.stats.inFlight--
	q.stats.record(statOpOf(d.Op()), int64(d.NrSectors)<<9, res, uint64(loop.WokeAt()-start))
	if q.gate.idle != nil && q.stats.inFlight == 0 {
		close(q.gate.idle)
		q.gate.idle = nil
	}
	return res
}

// perform does one request on the image and returns its COMMIT result.
func (q *queue) perform(co *coroutine.Co, t *tag, d *uapi.IODesc) int32 {
	node := q.dev.node
	off := int64(d.StartSector) << 9
	n := int64(d.NrSectors) << 9
	var err error
	switch d.Op() {
	case uapi.IOOpRead, uapi.IOOpWrite:
		if n > int64(len(t.buf)) {
			return -int32(unix.EINVAL)
		}
		if d.Op() == uapi.IOOpRead && q.dev.userCopy && q.readMapped(t, node, off, n) {
			return int32(n)
		}
		t.iov[0] = t.buf[:n]
		if d.Op() == uapi.IOOpRead {
			err = node.Preadv(co, off, t.iov, 0)
			if err == nil && q.dev.userCopy {
				err = q.userCopy(t, true, t.buf[:n])
			}
		} else {
			if q.dev.userCopy {
				err = q.userCopy(t, false, t.buf[:n])
			}
			var flags bdrv.ReqFlags
			if d.Flags()&uapi.IOFFUA != 0 {
				flags |= bdrv.ReqFUA
			}
			if err == nil {
				err = node.Pwritev(co, off, t.iov, flags)
			}
		}
		t.iov[0] = nil
		if err == nil {
			return int32(n)
		}
	case uapi.IOOpFlush:
		err = node.Flush(co)
	case uapi.IOOpDiscard:
		err = node.Pdiscard(co, off, n)
	case uapi.IOOpWriteZeroes:
		var flags bdrv.ReqFlags
		if d.Flags()&uapi.IOFNoUnmap == 0 && q.dev.cfg.Discard == DiscardUnmap {
			flags |= bdrv.ReqMayUnmap
		}
		err = node.PwriteZeroes(co, off, n, flags)
	default:
		return -int32(unix.EOPNOTSUPP)
	}
	if err != nil {
		q.dev.ioError(d.Op(), off, n, err)
	}
	return resultOf(err)
}

// readMapped serves a READ with user copy from the image's own memory when
// the node hands it out (bdrv.Node.MappedRange: a raw image in tmpfs): one
// copy, from the file's pages into the request's, instead of a read into
// t.buf and a copy from there. It reports whether it did; a copy that
// failed (EFAULT: the file shrank under the mapping) leaves the request
// to the usual path, whose errors are the ones to report.
func (q *queue) readMapped(t *tag, node *bdrv.Node, off, n int64) bool {
	b := node.MappedRange(off, n)
	return b != nil && q.userCopy(t, true, b) == nil
}

// userCopy moves a request's data between b and the kernel's request pages
// with pwrite (toKernel: a READ's data) or pread (a WRITE's data) on
// /dev/ublkcN at the request's USER_COPY position. The calls are made on
// the queue's thread: they copy between memory and never wait for a
// device, and io_uring would hand them to an io-wq worker (the character
// device cannot do non-blocking I/O), a thread hop per request.
func (q *queue) userCopy(t *tag, toKernel bool, b []byte) error {
	fd := q.dev.charFd
	for done := 0; done < len(b); {
		pos := uapi.UserCopyOffset(q.id, t.id, uint32(done))
		var res int
		var err error
		if toKernel {
			res, err = unix.Pwrite(fd, b[done:], pos)
		} else {
			res, err = unix.Pread(fd, b[done:], pos)
		}
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return err
		case res == 0:
			return unix.EIO
		}
		done += res
	}
	return nil
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
