package uring

import (
	"testing"
	"unsafe"
)

// TestSizes checks every mirrored struct against the size the kernel ABI
// fixes (include/uapi/linux/io_uring.h).
func TestSizes(t *testing.T) {
	for _, tc := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"io_uring_sqe", unsafe.Sizeof(SQE{}), sizeofSQE},
		{"io_uring_cqe", unsafe.Sizeof(CQE{}), sizeofCQE},
		{"io_sqring_offsets", unsafe.Sizeof(sqringOffsets{}), 40},
		{"io_cqring_offsets", unsafe.Sizeof(cqringOffsets{}), 40},
		{"io_uring_params", unsafe.Sizeof(params{}), sizeofParams},
		{"io_uring_rsrc_update", unsafe.Sizeof(rsrcUpdate{}), sizeofRsrcUpdate},
		{"io_uring_probe_op", unsafe.Sizeof(probeOp{}), sizeofProbeOp},
		{"io_uring_probe", unsafe.Sizeof(probeHdr{}), sizeofProbeHdr},
		{"io_uring_getevents_arg", unsafe.Sizeof(geteventsArg{}), sizeofGeteventsArg},
	} {
		if tc.got != tc.want {
			t.Errorf("sizeof(struct %s) = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
	if sizeofParams != 120 || sizeofSQE != 64 || sizeofCQE != 16 {
		t.Fatal("ABI size constants changed")
	}
}

// TestOffsets checks field offsets against struct io_uring_sqe, io_uring_cqe,
// io_uring_params and the ring offset structs.
func TestOffsets(t *testing.T) {
	var s SQE
	var c CQE
	var p params
	var sq sqringOffsets
	var cq cqringOffsets
	var g geteventsArg
	var u rsrcUpdate
	var po probeOp
	var ph probeHdr
	for _, tc := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"sqe.opcode", unsafe.Offsetof(s.Opcode), 0},
		{"sqe.flags", unsafe.Offsetof(s.Flags), 1},
		{"sqe.ioprio", unsafe.Offsetof(s.Ioprio), 2},
		{"sqe.fd", unsafe.Offsetof(s.Fd), 4},
		{"sqe.off", unsafe.Offsetof(s.Off), 8},
		{"sqe.addr", unsafe.Offsetof(s.Addr), 16},
		{"sqe.len", unsafe.Offsetof(s.Len), 24},
		{"sqe.rw_flags", unsafe.Offsetof(s.OpFlags), 28},
		{"sqe.user_data", unsafe.Offsetof(s.UserData), 32},
		{"sqe.buf_index", unsafe.Offsetof(s.BufIndex), 40},
		{"sqe.personality", unsafe.Offsetof(s.Personality), 42},
		{"sqe.splice_fd_in", unsafe.Offsetof(s.SpliceFdIn), 44},
		{"sqe.addr3", unsafe.Offsetof(s.Addr3), 48},
		{"sqe.cmd", unsafe.Offsetof(s.Addr3), cmdOffset},
		{"sqe.__pad2", unsafe.Offsetof(s.Pad2), 56},
		{"cqe.user_data", unsafe.Offsetof(c.UserData), 0},
		{"cqe.res", unsafe.Offsetof(c.Res), 8},
		{"cqe.flags", unsafe.Offsetof(c.Flags), 12},
		{"params.sq_entries", unsafe.Offsetof(p.SQEntries), 0},
		{"params.cq_entries", unsafe.Offsetof(p.CQEntries), 4},
		{"params.flags", unsafe.Offsetof(p.Flags), 8},
		{"params.sq_thread_cpu", unsafe.Offsetof(p.SQThreadCPU), 12},
		{"params.sq_thread_idle", unsafe.Offsetof(p.SQThreadIdle), 16},
		{"params.features", unsafe.Offsetof(p.Features), 20},
		{"params.wq_fd", unsafe.Offsetof(p.WQFd), 24},
		{"params.resv", unsafe.Offsetof(p.Resv), 28},
		{"params.sq_off", unsafe.Offsetof(p.SQOff), 40},
		{"params.cq_off", unsafe.Offsetof(p.CQOff), 80},
		{"sq_off.head", unsafe.Offsetof(sq.Head), 0},
		{"sq_off.tail", unsafe.Offsetof(sq.Tail), 4},
		{"sq_off.ring_mask", unsafe.Offsetof(sq.RingMask), 8},
		{"sq_off.ring_entries", unsafe.Offsetof(sq.RingEntries), 12},
		{"sq_off.flags", unsafe.Offsetof(sq.Flags), 16},
		{"sq_off.dropped", unsafe.Offsetof(sq.Dropped), 20},
		{"sq_off.array", unsafe.Offsetof(sq.Array), 24},
		{"sq_off.resv1", unsafe.Offsetof(sq.Resv1), 28},
		{"sq_off.user_addr", unsafe.Offsetof(sq.UserAddr), 32},
		{"cq_off.head", unsafe.Offsetof(cq.Head), 0},
		{"cq_off.tail", unsafe.Offsetof(cq.Tail), 4},
		{"cq_off.ring_mask", unsafe.Offsetof(cq.RingMask), 8},
		{"cq_off.ring_entries", unsafe.Offsetof(cq.RingEntries), 12},
		{"cq_off.overflow", unsafe.Offsetof(cq.Overflow), 16},
		{"cq_off.cqes", unsafe.Offsetof(cq.CQEs), 20},
		{"cq_off.flags", unsafe.Offsetof(cq.Flags), 24},
		{"cq_off.resv1", unsafe.Offsetof(cq.Resv1), 28},
		{"cq_off.user_addr", unsafe.Offsetof(cq.UserAddr), 32},
		{"getevents_arg.sigmask", unsafe.Offsetof(g.Sigmask), 0},
		{"getevents_arg.sigmask_sz", unsafe.Offsetof(g.SigmaskSz), 8},
		{"getevents_arg.min_wait_usec", unsafe.Offsetof(g.MinWaitUs), 12},
		{"getevents_arg.ts", unsafe.Offsetof(g.Ts), 16},
		{"rsrc_update.offset", unsafe.Offsetof(u.Offset), 0},
		{"rsrc_update.data", unsafe.Offsetof(u.Data), 8},
		{"probe_op.op", unsafe.Offsetof(po.Op), 0},
		{"probe_op.flags", unsafe.Offsetof(po.Flags), 2},
		{"probe.last_op", unsafe.Offsetof(ph.LastOp), 0},
		{"probe.ops_len", unsafe.Offsetof(ph.OpsLen), 1},
		{"probe.resv2", unsafe.Offsetof(ph.Resv2), 4},
	} {
		if tc.got != tc.want {
			t.Errorf("offsetof(%s) = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
}

// TestConstants pins a few values against the kernel header, where an
// off-by-one in an iota block would silently renumber everything after it.
func TestConstants(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uint64
	}{
		{"IORING_OP_READ", uint64(OpRead), 22},
		{"IORING_OP_WRITE", uint64(OpWrite), 23},
		{"IORING_OP_MSG_RING", uint64(OpMsgRing), 40},
		{"IORING_OP_URING_CMD", uint64(OpURingCmd), 46},
		{"IORING_OP_READ_MULTISHOT", uint64(OpReadMultishot), 49},
		{"IORING_OP_RECV_ZC", uint64(OpRecvZC), 58},
		{"IORING_OP_EPOLL_WAIT", uint64(OpEpollWait), 59},
		{"IORING_OP_PIPE", uint64(OpPipe), 62},
		{"IORING_SETUP_SQE128", uint64(SetupSQE128), 1 << 10},
		{"IORING_SETUP_DEFER_TASKRUN", uint64(SetupDeferTaskrun), 1 << 13},
		{"IORING_SETUP_NO_SQARRAY", uint64(SetupNoSQArray), 1 << 16},
		{"IOSQE_CQE_SKIP_SUCCESS", uint64(SQECQESkipSuccess), 1 << 6},
		{"IORING_FEAT_EXT_ARG", uint64(FeatExtArg), 1 << 8},
		{"IORING_CQE_F_NOTIF", uint64(CQEFNotif), 1 << 3},
		{"IORING_ENTER_REGISTERED_RING", uint64(EnterRegisteredRing), 1 << 4},
		{"IORING_OFF_SQES", offSQEs, 0x10000000},
		{"cmd payload (SQE128)", CmdSize, 80},
		{"cmd payload (SQE64)", CmdSize64, 16},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
}
