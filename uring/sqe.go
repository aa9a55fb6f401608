package uring

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The Prep* builders fill the fields of one request and leave UserData,
// Flags (except where noted) and the remaining fields alone: they expect a
// zeroed SQE as GetSQE returns. Set UserData (and Flags such as SQEFixedFile
// or SQEIOLink) before or after the call.
//
// Memory lifetime: buffers, iovec arrays and timespecs are passed to the
// kernel by address, converted to integers the compiler cannot follow. The
// caller owns that memory and must keep it unmoved and alive until the
// request's CQE has been reaped: mmap'd memory, or heap memory held in a
// live structure and pinned with runtime.Pinner; never a Go stack variable
// (see "Memory passed to the kernel" in the package documentation).

// addrOf returns the address of b's first byte, or 0 for an empty slice.
func addrOf(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}

// iovAddr returns the address of the first iovec, or 0.
func iovAddr(iovs []unix.Iovec) uint64 {
	if len(iovs) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(iovs))))
}

// prepRW fills the fields shared by the read/write family (io_uring_prep_rw).
func (s *SQE) prepRW(op Op, fd int32, addr uint64, n uint32, off uint64) {
	s.Opcode = uint8(op)
	s.Fd = fd
	s.Addr = addr
	s.Len = n
	s.Off = off
}

// PrepNop prepares IORING_OP_NOP: completes with res 0.
func (s *SQE) PrepNop() {
	s.Opcode = uint8(OpNop)
	s.Fd = -1
}

// PrepRead prepares IORING_OP_READ: pread(fd, buf, off). Off = ^uint64(0)
// reads at the file position.
func (s *SQE) PrepRead(fd int32, buf []byte, off uint64) {
	s.prepRW(OpRead, fd, addrOf(buf), uint32(len(buf)), off)
}

// PrepWrite prepares IORING_OP_WRITE: pwrite(fd, buf, off).
func (s *SQE) PrepWrite(fd int32, buf []byte, off uint64) {
	s.prepRW(OpWrite, fd, addrOf(buf), uint32(len(buf)), off)
}

// PrepReadFixed prepares IORING_OP_READ_FIXED: a read into buf, which must
// lie within registered buffer bufIndex (see RegisterBuffers).
func (s *SQE) PrepReadFixed(fd int32, buf []byte, off uint64, bufIndex uint16) {
	s.prepRW(OpReadFixed, fd, addrOf(buf), uint32(len(buf)), off)
	s.BufIndex = bufIndex
}

// PrepWriteFixed prepares IORING_OP_WRITE_FIXED: a write from buf, which
// must lie within registered buffer bufIndex.
func (s *SQE) PrepWriteFixed(fd int32, buf []byte, off uint64, bufIndex uint16) {
	s.prepRW(OpWriteFixed, fd, addrOf(buf), uint32(len(buf)), off)
	s.BufIndex = bufIndex
}

// PrepReadv prepares IORING_OP_READV: preadv(fd, iovs, off). The iovec
// array and the buffers it points to must stay alive and unmoved until
// completion: a []unix.Iovec built in a local variable is not (it may live
// on the goroutine stack). Coroutines use Co.Readv, which owns the array.
func (s *SQE) PrepReadv(fd int32, iovs []unix.Iovec, off uint64) {
	s.prepRW(OpReadv, fd, iovAddr(iovs), uint32(len(iovs)), off)
}

// PrepWritev prepares IORING_OP_WRITEV: pwritev(fd, iovs, off), with the
// same lifetime rules as PrepReadv.
func (s *SQE) PrepWritev(fd int32, iovs []unix.Iovec, off uint64) {
	s.prepRW(OpWritev, fd, iovAddr(iovs), uint32(len(iovs)), off)
}

// PrepFsync prepares IORING_OP_FSYNC of the whole file; flags is 0 (fsync)
// or FsyncDatasync (fdatasync).
func (s *SQE) PrepFsync(fd int32, flags uint32) {
	s.Opcode = uint8(OpFsync)
	s.Fd = fd
	s.OpFlags = flags
}

// PrepFallocate prepares IORING_OP_FALLOCATE: fallocate(fd, mode, off,
// length). The kernel takes mode in sqe.len and length in sqe.addr.
func (s *SQE) PrepFallocate(fd int32, mode uint32, off, length uint64) {
	s.prepRW(OpFallocate, fd, length, mode, off)
}

// PrepURingCmd prepares IORING_OP_URING_CMD with command cmdOp (sqe.cmd_op)
// and payload cmd copied into the command area at offset 48 (sqe.cmd).
//
// A 64-byte-SQE ring has room for CmdSize64 (16) bytes; 17..CmdSize (80)
// bytes need a ring created with SetupSQE128 (the SQE cannot know its ring:
// on a 64-byte ring a longer payload would overwrite the next SQE).
// PrepURingCmd panics if len(cmd) > CmdSize.
func (s *SQE) PrepURingCmd(fd int32, cmdOp uint32, cmd []byte) {
	if len(cmd) > CmdSize {
		panic("uring: PrepURingCmd: payload larger than 80 bytes")
	}
	s.Opcode = uint8(OpURingCmd)
	s.Fd = fd
	s.Off = 0
	*(*uint32)(unsafe.Pointer(&s.Off)) = cmdOp // cmd_op overlays the low half of off
	if len(cmd) > 0 {
		copy(unsafe.Slice((*byte)(unsafe.Add(unsafe.Pointer(s), cmdOffset)), len(cmd)), cmd)
	}
}

// CmdOp returns sqe.cmd_op (the union member overlaying off).
func (s *SQE) CmdOp() uint32 { return *(*uint32)(unsafe.Pointer(&s.Off)) }

// Cmd returns the uring_cmd payload area (sqe.cmd, offset 48). All 80 bytes
// are valid only for an SQE of a SetupSQE128 ring; on a 64-byte-SQE ring only
// the first 16 bytes belong to this SQE.
func (s *SQE) Cmd() *[CmdSize]byte {
	return (*[CmdSize]byte)(unsafe.Add(unsafe.Pointer(s), cmdOffset))
}

// PrepMsgRing prepares IORING_OP_MSG_RING with IORING_MSG_DATA: the kernel
// posts a CQE with res and userData on the ring targetRingFd. flags are
// MsgRing* flags (MsgRingCQESkip suppresses this ring's own CQE only when
// sending fds; MsgRingFlagsPass passes sqe.file_index as the target's
// cqe.flags). On a target created with SetupDeferTaskrun the CQE is posted
// only when the target's thread enters the kernel with GETEVENTS.
func (s *SQE) PrepMsgRing(targetRingFd int32, res uint32, userData uint64, flags uint32) {
	s.prepRW(OpMsgRing, targetRingFd, MsgData, res, userData)
	s.OpFlags = flags
}

// PrepPollAdd prepares IORING_OP_POLL_ADD for the poll(2) events mask on fd.
// With multishot the request stays armed and posts a CQE with CQEFMore for
// every event until it is removed or fails.
func (s *SQE) PrepPollAdd(fd int32, events uint32, multishot bool) {
	s.Opcode = uint8(OpPollAdd)
	s.Fd = fd
	s.OpFlags = events // poll32_events, little-endian word order
	if multishot {
		s.Len = PollAddMulti
	}
}

// PrepPollRemove prepares IORING_OP_POLL_REMOVE of the poll request whose
// user_data is userData.
func (s *SQE) PrepPollRemove(userData uint64) {
	s.Opcode = uint8(OpPollRemove)
	s.Fd = -1
	s.Addr = userData
}

// PrepTimeout prepares IORING_OP_TIMEOUT: completes with -ETIME after ts,
// or with 0 once count other completions have been posted (count 0: time
// only). flags are Timeout* flags. ts must stay alive and unmoved until
// completion (heap memory).
func (s *SQE) PrepTimeout(ts *unix.Timespec, count uint32, flags uint32) {
	s.prepRW(OpTimeout, -1, uint64(uintptr(unsafe.Pointer(ts))), 1, uint64(count))
	s.OpFlags = flags
}

// PrepLinkTimeout prepares IORING_OP_LINK_TIMEOUT for the previous SQE,
// which must carry SQEIOLink.
func (s *SQE) PrepLinkTimeout(ts *unix.Timespec, flags uint32) {
	s.prepRW(OpLinkTimeout, -1, uint64(uintptr(unsafe.Pointer(ts))), 1, 0)
	s.OpFlags = flags
}

// PrepTimeoutRemove prepares IORING_OP_TIMEOUT_REMOVE of the timeout whose
// user_data is userData.
func (s *SQE) PrepTimeoutRemove(userData uint64, flags uint32) {
	s.prepRW(OpTimeoutRemove, -1, userData, 0, 0)
	s.OpFlags = flags
}

// PrepCancel prepares IORING_OP_ASYNC_CANCEL of the request whose user_data
// is userData; flags are AsyncCancel* flags. The cancelled request completes
// with -ECANCELED; this one with 0, -ENOENT or -EALREADY.
func (s *SQE) PrepCancel(userData uint64, flags uint32) {
	s.prepRW(OpAsyncCancel, -1, userData, 0, 0)
	s.OpFlags = flags
}
