package uring

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// RegisterFiles registers fds as the ring's fixed file table
// (IORING_REGISTER_FILES); an SQE with SQEFixedFile then names a file by its
// index in fds. Entries of -1 are empty slots to fill with UpdateFiles.
func (r *Ring) RegisterFiles(fds []int32) error {
	if len(fds) == 0 {
		return fmt.Errorf("uring: register files: empty table: %w", unix.EINVAL)
	}
	if err := r.register(registerFiles, unsafe.Pointer(unsafe.SliceData(fds)), uint32(len(fds))); err != nil {
		return fmt.Errorf("uring: register %d files: %w", len(fds), err)
	}
	return nil
}

// UnregisterFiles drops the fixed file table (IORING_UNREGISTER_FILES).
func (r *Ring) UnregisterFiles() error {
	if err := r.register(unregisterFiles, nil, 0); err != nil {
		return fmt.Errorf("uring: unregister files: %w", err)
	}
	return nil
}

// UpdateFiles replaces fixed-file slots off..off+len(fds)-1
// (IORING_REGISTER_FILES_UPDATE with struct io_uring_rsrc_update); -1
// empties a slot.
func (r *Ring) UpdateFiles(off uint32, fds []int32) error {
	if len(fds) == 0 {
		return nil
	}
	// The kernel reads fds through a pointer inside the argument: copy
	// them to the heap so the address cannot be a moving stack slot.
	heap := make([]int32, len(fds))
	copy(heap, fds)
	up := &rsrcUpdate{Offset: off, Data: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(heap))))}
	err := r.register(registerFilesUpdate, unsafe.Pointer(up), uint32(len(fds)))
	runtime.KeepAlive(heap)
	if err != nil {
		return fmt.Errorf("uring: update files at %d: %w", off, err)
	}
	return nil
}

// RegisterBuffers registers bufs as the ring's fixed buffers
// (IORING_REGISTER_BUFFERS) for PrepReadFixed/PrepWriteFixed; buffer i has
// index i. The kernel pins the pages, so the memory must not move and must
// stay allocated (and referenced by the caller) until UnregisterBuffers or
// Close: mmap'd memory, or heap memory the caller keeps alive. Each buffer
// is at most 1 GiB.
func (r *Ring) RegisterBuffers(bufs [][]byte) error {
	if len(bufs) == 0 {
		return fmt.Errorf("uring: register buffers: empty table: %w", unix.EINVAL)
	}
	iovs := make([]unix.Iovec, len(bufs))
	for i, b := range bufs {
		iovs[i].Base = unsafe.SliceData(b)
		iovs[i].SetLen(len(b))
	}
	err := r.register(registerBuffers, unsafe.Pointer(unsafe.SliceData(iovs)), uint32(len(iovs)))
	runtime.KeepAlive(iovs)
	runtime.KeepAlive(bufs)
	if err != nil {
		return fmt.Errorf("uring: register %d buffers: %w", len(bufs), err)
	}
	return nil
}

// UnregisterBuffers drops the fixed buffers (IORING_UNREGISTER_BUFFERS).
func (r *Ring) UnregisterBuffers() error {
	if err := r.register(unregisterBuffers, nil, 0); err != nil {
		return fmt.Errorf("uring: unregister buffers: %w", err)
	}
	return nil
}

// RegisterEventfd makes the kernel signal eventfd fd whenever a CQE is
// posted (IORING_REGISTER_EVENTFD).
func (r *Ring) RegisterEventfd(fd int) error {
	v := new(int32)
	*v = int32(fd)
	if err := r.register(registerEventfd, unsafe.Pointer(v), 1); err != nil {
		return fmt.Errorf("uring: register eventfd %d: %w", fd, err)
	}
	return nil
}

// UnregisterEventfd removes the eventfd (IORING_UNREGISTER_EVENTFD).
func (r *Ring) UnregisterEventfd() error {
	if err := r.register(unregisterEventfd, nil, 0); err != nil {
		return fmt.Errorf("uring: unregister eventfd: %w", err)
	}
	return nil
}

// Probe is the result of IORING_REGISTER_PROBE: which opcodes the running
// kernel supports.
type Probe struct {
	lastOp    Op
	supported [256]bool
}

// Probe asks the kernel which opcodes it supports (IORING_REGISTER_PROBE,
// Linux 5.6).
func (r *Ring) Probe() (*Probe, error) {
	buf := make([]byte, sizeofProbeHdr+probeOps*sizeofProbeOp)
	if err := r.register(registerProbe, unsafe.Pointer(unsafe.SliceData(buf)), probeOps); err != nil {
		return nil, fmt.Errorf("uring: probe: %w", err)
	}
	hdr := (*probeHdr)(unsafe.Pointer(unsafe.SliceData(buf)))
	p := &Probe{lastOp: Op(hdr.LastOp)}
	ops := unsafe.Slice((*probeOp)(unsafe.Pointer(&buf[sizeofProbeHdr])), probeOps)
	for _, o := range ops[:min(int(hdr.OpsLen), probeOps)] {
		if o.Flags&opSupported != 0 {
			p.supported[o.Op] = true
		}
	}
	return p, nil
}

// Supported reports whether the kernel supports op (IO_URING_OP_SUPPORTED).
func (p *Probe) Supported(op Op) bool { return p.supported[op] }

// LastOp returns the highest opcode the kernel knows (io_uring_probe.last_op).
func (p *Probe) LastOp() Op { return p.lastOp }
