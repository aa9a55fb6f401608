package uring

import "structs"

// SetupFlags are the IORING_SETUP_* flags of io_uring_setup(2)
// (struct io_uring_params.flags).
type SetupFlags uint32

// io_uring_setup(2) flags, include/uapi/linux/io_uring.h IORING_SETUP_*.
const (
	SetupIOPoll           SetupFlags = 1 << 0  // IORING_SETUP_IOPOLL: io_context is polled
	SetupSQPoll           SetupFlags = 1 << 1  // IORING_SETUP_SQPOLL: SQ poll thread
	SetupSQAff            SetupFlags = 1 << 2  // IORING_SETUP_SQ_AFF: sq_thread_cpu is valid
	SetupCQSize           SetupFlags = 1 << 3  // IORING_SETUP_CQSIZE: app defines CQ size
	SetupClamp            SetupFlags = 1 << 4  // IORING_SETUP_CLAMP: clamp SQ/CQ ring sizes
	SetupAttachWQ         SetupFlags = 1 << 5  // IORING_SETUP_ATTACH_WQ: attach to existing wq
	SetupRDisabled        SetupFlags = 1 << 6  // IORING_SETUP_R_DISABLED: start with ring disabled
	SetupSubmitAll        SetupFlags = 1 << 7  // IORING_SETUP_SUBMIT_ALL: continue submit on error
	SetupCoopTaskrun      SetupFlags = 1 << 8  // IORING_SETUP_COOP_TASKRUN: no IPI for task work (5.19)
	SetupTaskrunFlag      SetupFlags = 1 << 9  // IORING_SETUP_TASKRUN_FLAG: set IORING_SQ_TASKRUN when work is pending
	SetupSQE128           SetupFlags = 1 << 10 // IORING_SETUP_SQE128: SQEs are 128 bytes
	SetupCQE32            SetupFlags = 1 << 11 // IORING_SETUP_CQE32: CQEs are 32 bytes (not supported by Ring)
	SetupSingleIssuer     SetupFlags = 1 << 12 // IORING_SETUP_SINGLE_ISSUER: only one task submits (6.0)
	SetupDeferTaskrun     SetupFlags = 1 << 13 // IORING_SETUP_DEFER_TASKRUN: run task work only on GETEVENTS (6.1)
	SetupNoMmap           SetupFlags = 1 << 14 // IORING_SETUP_NO_MMAP: application provides ring memory (not supported by Ring)
	SetupRegisteredFdOnly SetupFlags = 1 << 15 // IORING_SETUP_REGISTERED_FD_ONLY: return a registered ring index (not supported by Ring)
	SetupNoSQArray        SetupFlags = 1 << 16 // IORING_SETUP_NO_SQARRAY: no SQ index array (6.6)
	SetupHybridIOPoll     SetupFlags = 1 << 17 // IORING_SETUP_HYBRID_IOPOLL: hybrid poll for IOPOLL (6.13)
)

// Op is an SQE opcode, enum io_uring_op in include/uapi/linux/io_uring.h.
type Op uint8

// Opcodes, enum io_uring_op (include/uapi/linux/io_uring.h), numbered as the kernel does.
const (
	OpNop            Op = iota // IORING_OP_NOP
	OpReadv                    // IORING_OP_READV
	OpWritev                   // IORING_OP_WRITEV
	OpFsync                    // IORING_OP_FSYNC
	OpReadFixed                // IORING_OP_READ_FIXED
	OpWriteFixed               // IORING_OP_WRITE_FIXED
	OpPollAdd                  // IORING_OP_POLL_ADD
	OpPollRemove               // IORING_OP_POLL_REMOVE
	OpSyncFileRange            // IORING_OP_SYNC_FILE_RANGE
	OpSendmsg                  // IORING_OP_SENDMSG
	OpRecvmsg                  // IORING_OP_RECVMSG
	OpTimeout                  // IORING_OP_TIMEOUT
	OpTimeoutRemove            // IORING_OP_TIMEOUT_REMOVE
	OpAccept                   // IORING_OP_ACCEPT
	OpAsyncCancel              // IORING_OP_ASYNC_CANCEL
	OpLinkTimeout              // IORING_OP_LINK_TIMEOUT
	OpConnect                  // IORING_OP_CONNECT
	OpFallocate                // IORING_OP_FALLOCATE
	OpOpenat                   // IORING_OP_OPENAT
	OpClose                    // IORING_OP_CLOSE
	OpFilesUpdate              // IORING_OP_FILES_UPDATE
	OpStatx                    // IORING_OP_STATX
	OpRead                     // IORING_OP_READ
	OpWrite                    // IORING_OP_WRITE
	OpFadvise                  // IORING_OP_FADVISE
	OpMadvise                  // IORING_OP_MADVISE
	OpSend                     // IORING_OP_SEND
	OpRecv                     // IORING_OP_RECV
	OpOpenat2                  // IORING_OP_OPENAT2
	OpEpollCtl                 // IORING_OP_EPOLL_CTL
	OpSplice                   // IORING_OP_SPLICE
	OpProvideBuffers           // IORING_OP_PROVIDE_BUFFERS
	OpRemoveBuffers            // IORING_OP_REMOVE_BUFFERS
	OpTee                      // IORING_OP_TEE
	OpShutdown                 // IORING_OP_SHUTDOWN
	OpRenameat                 // IORING_OP_RENAMEAT
	OpUnlinkat                 // IORING_OP_UNLINKAT
	OpMkdirat                  // IORING_OP_MKDIRAT
	OpSymlinkat                // IORING_OP_SYMLINKAT
	OpLinkat                   // IORING_OP_LINKAT
	OpMsgRing                  // IORING_OP_MSG_RING (40)
	OpFsetxattr                // IORING_OP_FSETXATTR
	OpSetxattr                 // IORING_OP_SETXATTR
	OpFgetxattr                // IORING_OP_FGETXATTR
	OpGetxattr                 // IORING_OP_GETXATTR
	OpSocket                   // IORING_OP_SOCKET
	OpURingCmd                 // IORING_OP_URING_CMD (46)
	OpSendZC                   // IORING_OP_SEND_ZC
	OpSendmsgZC                // IORING_OP_SENDMSG_ZC
	OpReadMultishot            // IORING_OP_READ_MULTISHOT
	OpWaitid                   // IORING_OP_WAITID
	OpFutexWait                // IORING_OP_FUTEX_WAIT
	OpFutexWake                // IORING_OP_FUTEX_WAKE
	OpFutexWaitv               // IORING_OP_FUTEX_WAITV
	OpFixedFdInstall           // IORING_OP_FIXED_FD_INSTALL
	OpFtruncate                // IORING_OP_FTRUNCATE
	OpBind                     // IORING_OP_BIND
	OpListen                   // IORING_OP_LISTEN
	OpRecvZC                   // IORING_OP_RECV_ZC
	OpEpollWait                // IORING_OP_EPOLL_WAIT (59)
	OpReadvFixed               // IORING_OP_READV_FIXED
	OpWritevFixed              // IORING_OP_WRITEV_FIXED
	OpPipe                     // IORING_OP_PIPE
)

// SQE flags (struct io_uring_sqe.flags), include/uapi/linux/io_uring.h IOSQE_*.
const (
	SQEFixedFile      uint8 = 1 << 0 // IOSQE_FIXED_FILE: fd is an index into the registered files
	SQEIODrain        uint8 = 1 << 1 // IOSQE_IO_DRAIN: issue after all in-flight requests
	SQEIOLink         uint8 = 1 << 2 // IOSQE_IO_LINK: link the next SQE
	SQEIOHardlink     uint8 = 1 << 3 // IOSQE_IO_HARDLINK: link that survives errors
	SQEAsync          uint8 = 1 << 4 // IOSQE_ASYNC: always go async
	SQEBufferSelect   uint8 = 1 << 5 // IOSQE_BUFFER_SELECT: select a buffer from sqe.buf_group
	SQECQESkipSuccess uint8 = 1 << 6 // IOSQE_CQE_SKIP_SUCCESS: no CQE when the request succeeds
)

// Fsync flags (sqe.fsync_flags), include/uapi/linux/io_uring.h.
const (
	FsyncDatasync uint32 = 1 << 0 // IORING_FSYNC_DATASYNC
)

// MSG_RING command types (stored in sqe.addr), enum io_uring_msg_ring_flags.
const (
	MsgData   uint64 = 0 // IORING_MSG_DATA: post sqe.len as res and sqe.off as user_data
	MsgSendFd uint64 = 1 // IORING_MSG_SEND_FD: send a registered fd to another ring
)

// MSG_RING flags (sqe.msg_ring_flags), include/uapi/linux/io_uring.h.
const (
	MsgRingCQESkip   uint32 = 1 << 0 // IORING_MSG_RING_CQE_SKIP: no CQE on the target ring
	MsgRingFlagsPass uint32 = 1 << 1 // IORING_MSG_RING_FLAGS_PASS: pass sqe.file_index to the target cqe.flags
)

// POLL_ADD command flags (stored in sqe.len), include/uapi/linux/io_uring.h.
const (
	PollAddMulti       uint32 = 1 << 0 // IORING_POLL_ADD_MULTI: multishot poll
	PollUpdateEvents   uint32 = 1 << 1 // IORING_POLL_UPDATE_EVENTS
	PollUpdateUserData uint32 = 1 << 2 // IORING_POLL_UPDATE_USER_DATA
	PollAddLevel       uint32 = 1 << 3 // IORING_POLL_ADD_LEVEL: level-triggered poll
)

// Timeout flags (sqe.timeout_flags), include/uapi/linux/io_uring.h IORING_TIMEOUT_*.
const (
	TimeoutAbs          uint32 = 1 << 0 // IORING_TIMEOUT_ABS: absolute time
	TimeoutUpdate       uint32 = 1 << 1 // IORING_TIMEOUT_UPDATE
	TimeoutBoottime     uint32 = 1 << 2 // IORING_TIMEOUT_BOOTTIME: CLOCK_BOOTTIME
	TimeoutRealtime     uint32 = 1 << 3 // IORING_TIMEOUT_REALTIME: CLOCK_REALTIME
	LinkTimeoutUpdate   uint32 = 1 << 4 // IORING_LINK_TIMEOUT_UPDATE
	TimeoutETimeSuccess uint32 = 1 << 5 // IORING_TIMEOUT_ETIME_SUCCESS: complete with ETIME but do not break links
	TimeoutMultishot    uint32 = 1 << 6 // IORING_TIMEOUT_MULTISHOT
)

// ASYNC_CANCEL flags (sqe.cancel_flags), include/uapi/linux/io_uring.h IORING_ASYNC_CANCEL_*.
const (
	AsyncCancelAll      uint32 = 1 << 0 // IORING_ASYNC_CANCEL_ALL: cancel every match
	AsyncCancelFd       uint32 = 1 << 1 // IORING_ASYNC_CANCEL_FD: match on fd, not user_data
	AsyncCancelAny      uint32 = 1 << 2 // IORING_ASYNC_CANCEL_ANY: match any request
	AsyncCancelFdFixed  uint32 = 1 << 3 // IORING_ASYNC_CANCEL_FD_FIXED: fd is a registered index
	AsyncCancelUserData uint32 = 1 << 4 // IORING_ASYNC_CANCEL_USERDATA: match on user_data (default)
	AsyncCancelOp       uint32 = 1 << 5 // IORING_ASYNC_CANCEL_OP: match on opcode
)

// io_uring_enter(2) flags, include/uapi/linux/io_uring.h IORING_ENTER_*.
const (
	EnterGetEvents      uint32 = 1 << 0 // IORING_ENTER_GETEVENTS
	EnterSQWakeup       uint32 = 1 << 1 // IORING_ENTER_SQ_WAKEUP
	EnterSQWait         uint32 = 1 << 2 // IORING_ENTER_SQ_WAIT
	EnterExtArg         uint32 = 1 << 3 // IORING_ENTER_EXT_ARG: arg is struct io_uring_getevents_arg
	EnterRegisteredRing uint32 = 1 << 4 // IORING_ENTER_REGISTERED_RING
)

// SQ ring flags (sq_ring->flags), include/uapi/linux/io_uring.h IORING_SQ_*.
const (
	SQNeedWakeup uint32 = 1 << 0 // IORING_SQ_NEED_WAKEUP: SQPOLL thread needs a wake-up
	SQCQOverflow uint32 = 1 << 1 // IORING_SQ_CQ_OVERFLOW: CQ ring overflowed, enter with GETEVENTS to flush
	SQTaskrun    uint32 = 1 << 2 // IORING_SQ_TASKRUN: task work pending, enter the kernel
)

// Feature bits (io_uring_params.features), include/uapi/linux/io_uring.h IORING_FEAT_*.
const (
	FeatSingleMmap     uint32 = 1 << 0  // IORING_FEAT_SINGLE_MMAP
	FeatNoDrop         uint32 = 1 << 1  // IORING_FEAT_NODROP
	FeatSubmitStable   uint32 = 1 << 2  // IORING_FEAT_SUBMIT_STABLE
	FeatRWCurPos       uint32 = 1 << 3  // IORING_FEAT_RW_CUR_POS
	FeatCurPersonality uint32 = 1 << 4  // IORING_FEAT_CUR_PERSONALITY
	FeatFastPoll       uint32 = 1 << 5  // IORING_FEAT_FAST_POLL
	FeatPoll32Bits     uint32 = 1 << 6  // IORING_FEAT_POLL_32BITS
	FeatSQPollNonfixed uint32 = 1 << 7  // IORING_FEAT_SQPOLL_NONFIXED
	FeatExtArg         uint32 = 1 << 8  // IORING_FEAT_EXT_ARG
	FeatNativeWorkers  uint32 = 1 << 9  // IORING_FEAT_NATIVE_WORKERS
	FeatRsrcTags       uint32 = 1 << 10 // IORING_FEAT_RSRC_TAGS
	FeatCQESkip        uint32 = 1 << 11 // IORING_FEAT_CQE_SKIP
	FeatLinkedFile     uint32 = 1 << 12 // IORING_FEAT_LINKED_FILE
	FeatRegRegRing     uint32 = 1 << 13 // IORING_FEAT_REG_REG_RING
	FeatRecvsendBundle uint32 = 1 << 14 // IORING_FEAT_RECVSEND_BUNDLE
	FeatMinTimeout     uint32 = 1 << 15 // IORING_FEAT_MIN_TIMEOUT
	FeatRWAttr         uint32 = 1 << 16 // IORING_FEAT_RW_ATTR
)

// CQE flags (io_uring_cqe.flags), include/uapi/linux/io_uring.h IORING_CQE_F_*.
const (
	CQEFBuffer       uint32 = 1 << 0 // IORING_CQE_F_BUFFER: upper 16 bits are the buffer ID
	CQEFMore         uint32 = 1 << 1 // IORING_CQE_F_MORE: the SQE will post more CQEs
	CQEFSockNonempty uint32 = 1 << 2 // IORING_CQE_F_SOCK_NONEMPTY
	CQEFNotif        uint32 = 1 << 3 // IORING_CQE_F_NOTIF: zero-copy notification
	CQEFBufMore      uint32 = 1 << 4 // IORING_CQE_F_BUF_MORE

	CQEBufferShift = 16 // IORING_CQE_BUFFER_SHIFT
)

// mmap(2) offsets, include/uapi/linux/io_uring.h IORING_OFF_*.
const (
	offSQRing = 0          // IORING_OFF_SQ_RING
	offCQRing = 0x8000000  // IORING_OFF_CQ_RING
	offSQEs   = 0x10000000 // IORING_OFF_SQES
)

// io_uring_register(2) opcodes, enum io_uring_register_op.
const (
	registerBuffers     = 0  // IORING_REGISTER_BUFFERS
	unregisterBuffers   = 1  // IORING_UNREGISTER_BUFFERS
	registerFiles       = 2  // IORING_REGISTER_FILES
	unregisterFiles     = 3  // IORING_UNREGISTER_FILES
	registerEventfd     = 4  // IORING_REGISTER_EVENTFD
	unregisterEventfd   = 5  // IORING_UNREGISTER_EVENTFD
	registerFilesUpdate = 6  // IORING_REGISTER_FILES_UPDATE
	registerProbe       = 8  // IORING_REGISTER_PROBE
	registerEnableRings = 12 // IORING_REGISTER_ENABLE_RINGS
)

// opSupported is IO_URING_OP_SUPPORTED (io_uring_probe_op.flags).
const opSupported = 1 << 0

// probeOps is the number of io_uring_probe_op slots asked for by Probe
// (the kernel caps it at IORING_OP_LAST).
const probeOps = 256

// nsigBytes is _NSIG/8 on Linux, the sigmask size the kernel expects in
// io_uring_getevents_arg.sigmask_sz.
const nsigBytes = 8

// SQE mirrors struct io_uring_sqe (64 bytes). Unions are collapsed to the
// member this package uses; the other names are noted per field.
//
// On a ring set up with SetupSQE128 every slot is 128 bytes and the extra 64
// bytes extend the command area that starts at offset 48 (see Cmd).
type SQE struct {
	_           structs.HostLayout
	Opcode      uint8  // 0: opcode (an Op)
	Flags       uint8  // 1: IOSQE_* flags
	Ioprio      uint16 // 2: ioprio; also send/recv/accept flags
	Fd          int32  // 4: file descriptor, or registered index with SQEFixedFile
	Off         uint64 // 8: off / addr2 / {cmd_op, __pad1}
	Addr        uint64 // 16: addr / splice_off_in / {level, optname}
	Len         uint32 // 24: len: buffer size or number of iovecs
	OpFlags     uint32 // 28: rw_flags / fsync_flags / poll32_events / timeout_flags / msg_ring_flags / uring_cmd_flags ...
	UserData    uint64 // 32: user_data, returned in the CQE
	BufIndex    uint16 // 40: buf_index / buf_group
	Personality uint16 // 42: personality
	SpliceFdIn  int32  // 44: splice_fd_in / file_index / optlen / {addr_len, __pad3}
	Addr3       uint64 // 48: addr3 / attr_ptr / optval / start of cmd[]
	Pad2        uint64 // 56: __pad2[0] / attr_type_mask
}

// CQE mirrors struct io_uring_cqe (16 bytes). CQE32 rings are not supported,
// so the big_cqe[] flexible array is omitted.
type CQE struct {
	_        structs.HostLayout
	UserData uint64 // user_data of the SQE
	Res      int32  // result: >= 0 success, -errno on failure (see ResultError)
	Flags    uint32 // IORING_CQE_F_* flags
}

// sqringOffsets mirrors struct io_sqring_offsets.
type sqringOffsets struct {
	_           structs.HostLayout
	Head        uint32
	Tail        uint32
	RingMask    uint32
	RingEntries uint32
	Flags       uint32
	Dropped     uint32
	Array       uint32
	Resv1       uint32
	UserAddr    uint64
}

// cqringOffsets mirrors struct io_cqring_offsets.
type cqringOffsets struct {
	_           structs.HostLayout
	Head        uint32
	Tail        uint32
	RingMask    uint32
	RingEntries uint32
	Overflow    uint32
	CQEs        uint32
	Flags       uint32
	Resv1       uint32
	UserAddr    uint64
}

// params mirrors struct io_uring_params (120 bytes).
type params struct {
	_            structs.HostLayout
	SQEntries    uint32
	CQEntries    uint32
	Flags        uint32
	SQThreadCPU  uint32
	SQThreadIdle uint32
	Features     uint32
	WQFd         uint32
	Resv         [3]uint32
	SQOff        sqringOffsets
	CQOff        cqringOffsets
}

// rsrcUpdate mirrors struct io_uring_rsrc_update (also the deprecated
// struct io_uring_files_update), argument of IORING_REGISTER_FILES_UPDATE.
type rsrcUpdate struct {
	_      structs.HostLayout
	Offset uint32
	Resv   uint32
	Data   uint64 // __aligned_u64: pointer to an __s32 array
}

// probeOp mirrors struct io_uring_probe_op.
type probeOp struct {
	_     structs.HostLayout
	Op    uint8
	Resv  uint8
	Flags uint16 // IO_URING_OP_* flags
	Resv2 uint32
}

// probeHdr mirrors struct io_uring_probe without its flexible ops[] array.
type probeHdr struct {
	_      structs.HostLayout
	LastOp uint8 // last opcode supported
	OpsLen uint8 // length of ops[]
	Resv   uint16
	Resv2  [3]uint32
}

// geteventsArg mirrors struct io_uring_getevents_arg, the argument of
// io_uring_enter(2) with IORING_ENTER_EXT_ARG.
type geteventsArg struct {
	_         structs.HostLayout
	Sigmask   uint64
	SigmaskSz uint32
	MinWaitUs uint32 // min_wait_usec (6.12); 0 = unused
	Ts        uint64 // pointer to struct __kernel_timespec
}

// Sizes the kernel ABI fixes; checked against unsafe.Sizeof in sizes_test.go.
const (
	sizeofSQE          = 64
	sizeofSQE128       = 128
	sizeofCQE          = 16
	sizeofParams       = 120
	sizeofRsrcUpdate   = 16
	sizeofProbeOp      = 8
	sizeofProbeHdr     = 16
	sizeofGeteventsArg = 24

	// cmdOffset is offsetof(struct io_uring_sqe, cmd).
	cmdOffset = 48
	// CmdSize is the size of the uring_cmd payload on an SQE128 ring
	// (128 - 48 bytes); on a 64-byte-SQE ring only CmdSize64 bytes fit.
	CmdSize = sizeofSQE128 - cmdOffset
	// CmdSize64 is the size of the uring_cmd payload on a 64-byte-SQE ring.
	CmdSize64 = sizeofSQE - cmdOffset
)
