package file

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

// Preadv implements bdrv.Driver. A read that ends early at end of file
// zero-fills the rest, as QEMU does.
func (d *driver) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	if d.needsBounce(iov) {
		buf := bdrv.AlignedBuffer(int(iov.Len()), int(d.align))
		if err := d.rw(co, false, off, bdrv.IOVec{buf}); err != nil {
			return err
		}
		iov.CopyFrom(buf, 0)
		return nil
	}
	return d.rw(co, false, off, iov)
}

// Pwritev implements bdrv.Driver.
func (d *driver) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	if !d.blockDev && off+iov.Len() > d.node.Length() {
		d.eof.RLock(co)
		defer d.eof.RUnlock(co)
	}
	if d.needsBounce(iov) {
		buf := bdrv.AlignedBuffer(int(iov.Len()), int(d.align))
		iov.CopyTo(buf, 0)
		iov = bdrv.IOVec{buf}
	}
	if err := d.rw(co, true, off, iov); err != nil {
		return err
	}
	d.wrote(off, iov.Len())
	return nil
}

// needsBounce reports whether O_DIRECT would reject iov's memory: every
// buffer must start and end on the alignment.
func (d *driver) needsBounce(iov bdrv.IOVec) bool {
	if d.align == 1 {
		return false
	}
	mask := uintptr(d.align - 1)
	for _, b := range iov {
		if len(b) == 0 {
			continue
		}
		if uintptr(len(b))&mask != 0 || addr(b)&mask != 0 {
			return true
		}
	}
	return false
}

// rw moves iov to or from the file at off through the ring, continuing after
// short transfers. Reads stopped by end of file leave zeros.
func (d *driver) rw(co *coroutine.Co, write bool, off int64, iov bdrv.IOVec) error {
	retries := 0
	for len(iov) > 0 {
		var res int32
		if d.inline || write && d.inlineWrite(off, iov) {
			res = d.rwInline(write, off, iov)
		} else {
			if write {
				co.Writev(int32(d.fd), iov, uint64(off))
			} else {
				co.Readv(int32(d.fd), iov, uint64(off))
			}
			res = co.Wait()
		}
		if res == -int32(unix.ECANCELED) && retries < maxCanceledRetries {
			retries++
			continue
		}
		if res < 0 {
			return uring.ResultError(res)
		}
		want := iov.Len()
		if int64(res) == want {
			return nil
		}
		if int64(res) > want {
			// Only a request the kernel read wrongly can do this.
			return fmt.Errorf("file: %d bytes transferred for a request of %d: %w", res, want, unix.EIO)
		}
		if res == 0 {
			if write {
				return unix.ENOSPC
			}
			iov.Zero(0, want)
			return nil
		}
		iov = iov.Slice(int64(res), want-int64(res))
		off += int64(res)
	}
	return nil
}

// inlineWrite reports whether a write goes out synchronously on a file
// system whose buffered writes io_uring would punt (d.inlineWrites): only
// whole pages, which the kernel fills without reading them first. A write
// of part of a page that is not in the page cache reads it from the disk,
// and that stays off the loop.
func (d *driver) inlineWrite(off int64, iov bdrv.IOVec) bool {
	return d.inlineWrites && (off|iov.Len())&(pageSize-1) == 0
}

var pageSize = int64(unix.Getpagesize())

// rwInline is one pread or pwrite (preadv, pwritev for several buffers) on
// the calling thread, for files in memory and whole-page writes
// (inlineWrite): its result as a CQE would carry it. The kernel is done
// with the buffers when it returns.
func (d *driver) rwInline(write bool, off int64, iov bdrv.IOVec) int32 {
	for {
		var n int
		var err error
		b, one := singleBuffer(iov)
		switch {
		case one && write:
			n, err = unix.Pwrite(d.fd, b, off)
		case one:
			n, err = unix.Pread(d.fd, b, off)
		case write:
			n, err = unix.Pwritev(d.fd, iov[:min(len(iov), iovMax)], off)
		default:
			n, err = unix.Preadv(d.fd, iov[:min(len(iov), iovMax)], off)
		}
		if err == unix.EINTR {
			continue
		}
		return result(n, err)
	}
}

// iovMax is the most buffers one preadv takes (UIO_MAXIOV); the rest is a
// short transfer, continued by rw.
const iovMax = 1024

// singleBuffer returns the only non-empty buffer of iov, if there is one
// at most.
func singleBuffer(iov bdrv.IOVec) ([]byte, bool) {
	var only []byte
	for _, b := range iov {
		if len(b) == 0 {
			continue
		}
		if only != nil {
			return nil, false
		}
		only = b
	}
	return only, true
}

// result turns a system call's outcome into a CQE result. unix returns
// its errors as a bare Errno (errors.As would move a target to the heap on
// every request).
func result(n int, err error) int32 {
	if err == nil {
		return int32(n)
	}
	if errno, ok := err.(unix.Errno); ok {
		return -int32(errno)
	}
	return -int32(unix.EIO)
}

// maxCanceledRetries bounds the resubmissions of a request the kernel
// cancelled although this driver cancels nothing: io_uring fails the work it
// meant to hand to a new io-wq worker with ECANCELED when creating that
// worker, which happens in the submitting thread, is interrupted by pending
// signals WORKER_INIT_LIMIT (3) times in a row (Linux 6.11+). Go signals its
// threads (SIGURG preemption, SIGCHLD); such a request never ran, so sending
// it again is safe, and the guest must not see an error for it.
const maxCanceledRetries = 8

// submit queues one request with prep, waits for it and returns its result,
// resubmitting it when the kernel cancelled it (see maxCanceledRetries).
func submit(co *coroutine.Co, prep func(*uring.SQE)) int32 {
	for retries := 0; ; retries++ {
		prep(co.SQE())
		res := co.Wait()
		if res != -int32(unix.ECANCELED) || retries == maxCanceledRetries {
			return res
		}
	}
}

// Flush implements bdrv.Driver with fdatasync.
func (d *driver) Flush(co *coroutine.Co) error {
	if d.inline {
		// Nothing to write back from memory: fdatasync only checks
		// for earlier writeback errors.
		return syscallErr(unix.Fdatasync(d.fd))
	}
	return uring.ResultError(submit(co, func(sqe *uring.SQE) { sqe.PrepFsync(int32(d.fd), uring.FsyncDatasync) }))
}

func (d *driver) fallocate(co *coroutine.Co, mode uint32, off, length int64) error {
	if d.inline {
		return syscallErr(unix.Fallocate(d.fd, mode, off, length))
	}
	return uring.ResultError(submit(co, func(sqe *uring.SQE) {
		sqe.PrepFallocate(int32(d.fd), mode, uint64(off), uint64(length))
	}))
}

// unsupported reports fallocate errors that mean "this file cannot do that
// mode", after which the generic fallback takes over.
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL)
}

// PwriteZeroes implements bdrv.ZeroWriter: punch a hole when unmapping is
// allowed (it reads back as zeros), else FALLOC_FL_ZERO_RANGE. Regular files
// grow when the range extends past their end.
func (d *driver) PwriteZeroes(co *coroutine.Co, off, bytes int64, flags bdrv.ReqFlags) error {
	end := off + bytes
	if flags&bdrv.ReqMayUnmap != 0 && !d.noPunch.Load() && (d.blockDev || end <= d.node.Length()) {
		err := d.fallocate(co, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, bytes)
		if err == nil {
			d.punched(off, bytes)
			return nil
		}
		if !unsupported(err) {
			return err
		}
		d.noPunch.Store(true)
	}
	if d.noZeroRange.Load() {
		return bdrv.ErrNotSupported
	}
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE)
	if d.blockDev {
		mode |= unix.FALLOC_FL_KEEP_SIZE
	}
	if !d.blockDev && end > d.node.Length() {
		d.eof.Lock(co)
		defer d.eof.Unlock(co)
	}
	err := d.fallocate(co, mode, off, bytes)
	if err != nil && unsupported(err) {
		d.noZeroRange.Store(true)
		return bdrv.ErrNotSupported
	}
	return err
}

// Pdiscard implements bdrv.Discarder by punching a hole.
func (d *driver) Pdiscard(co *coroutine.Co, off, bytes int64) error {
	if d.noPunch.Load() {
		return bdrv.ErrNotSupported
	}
	if !d.blockDev {
		// Never extend the file for a discard past its end.
		bytes = min(bytes, d.node.Length()-off)
		if bytes <= 0 {
			return nil
		}
	}
	err := d.fallocate(co, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, bytes)
	if err != nil && unsupported(err) {
		d.noPunch.Store(true)
		return bdrv.ErrNotSupported
	}
	if err == nil {
		d.punched(off, bytes)
	}
	return err
}

// BlockStatus implements bdrv.BlockStatuser from SEEK_DATA/SEEK_HOLE, as
// QEMU's find_allocation: data is DATA, a hole is ZERO, both at the same
// offset in this file. Without wantZero everything is reported as data,
// which is always correct and costs nothing.
func (d *driver) BlockStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (bdrv.Status, error) {
	st := bdrv.Status{Flags: bdrv.StatusData | bdrv.StatusOffsetValid, Pnum: bytes, Map: off, File: d.node}
	if !wantZero || d.blockDev {
		return st, nil
	}
	// lseek may read extent metadata from disk: keep it off the loop.
	var data, hole int64
	var err error
	co.Offload(func() { data, hole, err = d.findAllocation(off) })
	if err != nil {
		// Unknown: data is the safe answer.
		return st, nil
	}
	if data == off {
		st.Pnum = min(bytes, hole-off)
	} else {
		st.Flags = bdrv.StatusZero | bdrv.StatusOffsetValid
		st.Pnum = min(bytes, data-off)
	}
	return st, nil
}

// findAllocation returns the next data start at or after off and the hole
// that follows it; past the last data both are "infinite".
func (d *driver) findAllocation(off int64) (data, hole int64, err error) {
	const inf = int64(1) << 62
	data, err = unix.Seek(d.fd, off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return inf, inf, nil // only a hole from off to the end
	}
	if err != nil {
		return 0, 0, err
	}
	if data > off {
		return data, data, nil
	}
	hole, err = unix.Seek(d.fd, off, unix.SEEK_HOLE)
	if errors.Is(err, unix.ENXIO) {
		return off, inf, nil
	}
	return data, hole, err
}

// Truncate implements bdrv.Truncater.
func (d *driver) Truncate(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc) error {
	cur := d.node.Length()
	if d.blockDev {
		if size > cur || (exact && size != cur) {
			return errors.New("cannot resize a block device")
		}
		return nil
	}
	if size < cur {
		if prealloc != bdrv.PreallocOff {
			return errors.New("preallocation can only be used when growing an image")
		}
		if !exact {
			return nil
		}
	}
	if err := d.grow(co, cur, size, prealloc); err != nil {
		return err
	}
	d.node.SetLength(size)
	d.resized(cur, size)
	return nil
}

// grow resizes the file from cur to size bytes, preallocating the new part
// as asked: falloc reserves blocks, full writes zeros.
func (d *driver) grow(co *coroutine.Co, cur, size int64, prealloc bdrv.Prealloc) error {
	switch prealloc {
	case bdrv.PreallocOff:
		var err error
		co.Offload(func() { err = unix.Ftruncate(d.fd, size) })
		return syscallErr(err)
	case bdrv.PreallocFalloc:
		if size <= cur {
			return nil
		}
		err := d.fallocate(co, 0, cur, size-cur)
		if unsupported(err) {
			return errors.New("could not preallocate data: fallocate is not supported by the file system")
		}
		return err
	case bdrv.PreallocFull:
		if size <= cur {
			return nil
		}
		zeros := bdrv.AlignedBuffer(1<<20, 4096)
		for off := cur; off < size; {
			n := min(int64(len(zeros)), size-off)
			if err := d.rw(co, true, off, bdrv.IOVec{zeros[:n]}); err != nil {
				return err
			}
			off += n
		}
		return nil
	}
	return errors.New("unsupported preallocation mode " + prealloc.String())
}

func addr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
