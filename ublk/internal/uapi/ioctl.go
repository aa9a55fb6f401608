package uapi

import (
	"fmt"
	"unsafe"
)

// The asm-generic _IOC layout (include/uapi/asm-generic/ioctl.h), used by
// amd64 and arm64: nr in bits 0-7, type in 8-15, size in 16-29, direction in
// 30-31.
const (
	iocNRShift   = 0
	iocTypeShift = 8
	iocSizeShift = 16
	iocDirShift  = 30

	iocSizeMask = 1<<14 - 1

	iocWrite = 1 // _IOC_WRITE
	iocRead  = 2 // _IOC_READ

	// ioctlType is the ioctl type byte of every ublk command, 'u'.
	ioctlType = 'u'
)

// Payload sizes the ioctl-encoded opcodes carry in their size bits.
const (
	sizeofCtrlCmdPayload = CmdOp(unsafe.Sizeof(CtrlCmd{})) // struct ublksrv_ctrl_cmd
	sizeofIOCmdPayload   = CmdOp(unsafe.Sizeof(IOCmd{}))   // struct ublksrv_io_cmd
	sizeofBatchIO        = CmdOp(16)                       // struct ublk_batch_io (7.0, not mirrored)
)

// Constant-expression forms of _IOR('u', 0, T) and _IOWR('u', 0, T); OR in
// the command number to get the full opcode.
const (
	iorCtrl  = iocRead<<iocDirShift | sizeofCtrlCmdPayload<<iocSizeShift | ioctlType<<iocTypeShift
	iowrCtrl = (iocRead|iocWrite)<<iocDirShift | sizeofCtrlCmdPayload<<iocSizeShift | ioctlType<<iocTypeShift
	iowrIO   = (iocRead|iocWrite)<<iocDirShift | sizeofIOCmdPayload<<iocSizeShift | ioctlType<<iocTypeShift
	iowrBat  = (iocRead|iocWrite)<<iocDirShift | sizeofBatchIO<<iocSizeShift | ioctlType<<iocTypeShift
)

// IOR returns _IOR('u', nr, T) for a payload T of size bytes, the encoding the
// header uses for the "get" control commands.
func IOR(nr uint8, size uintptr) CmdOp {
	return CmdOp(iocRead<<iocDirShift | (uint32(size)&iocSizeMask)<<iocSizeShift |
		ioctlType<<iocTypeShift | uint32(nr)<<iocNRShift)
}

// IOWR returns _IOWR('u', nr, T) for a payload T of size bytes, the encoding
// of every other control command and of every I/O command.
func IOWR(nr uint8, size uintptr) CmdOp {
	return CmdOp((iocRead|iocWrite)<<iocDirShift | (uint32(size)&iocSizeMask)<<iocSizeShift |
		ioctlType<<iocTypeShift | uint32(nr)<<iocNRShift)
}

// CmdOp is a ublk command number: the value of the SQE's cmd_op field for an
// IORING_OP_URING_CMD on /dev/ublk-control (control commands) or /dev/ublkcN
// (I/O commands). It is either a legacy number (the Cmd* and IO* constants)
// or an ioctl-encoded one (the UCmd* and UIO* constants).
//
// Linux 6.1-6.3 accept only legacy numbers. 6.4 and later dispatch on the
// command number (_IOC_NR) and accept both forms as long as
// CONFIG_BLKDEV_UBLK_LEGACY_OPCODES is set (the default, and Debian's);
// without it only encoded numbers work. Use the encoded form whenever
// GET_FEATURES succeeds and fall back with [CmdOp.Legacy] when it fails with
// ENODEV or EOPNOTSUPP (docs/ublk-uapi.md §1.1).
type CmdOp uint32

// Legacy control command numbers (UBLK_CMD_*), ublk_cmd.h. The header calls
// these "don't use in new application"; they are the only form 6.1-6.3
// understand. Since 6.0 unless stated otherwise.
const (
	CmdGetQueueAffinity  CmdOp = 0x01 // UBLK_CMD_GET_QUEUE_AFFINITY
	CmdGetDevInfo        CmdOp = 0x02 // UBLK_CMD_GET_DEV_INFO
	CmdAddDev            CmdOp = 0x04 // UBLK_CMD_ADD_DEV
	CmdDelDev            CmdOp = 0x05 // UBLK_CMD_DEL_DEV
	CmdStartDev          CmdOp = 0x06 // UBLK_CMD_START_DEV
	CmdStopDev           CmdOp = 0x07 // UBLK_CMD_STOP_DEV
	CmdSetParams         CmdOp = 0x08 // UBLK_CMD_SET_PARAMS
	CmdGetParams         CmdOp = 0x09 // UBLK_CMD_GET_PARAMS
	CmdStartUserRecovery CmdOp = 0x10 // UBLK_CMD_START_USER_RECOVERY (6.1)
	CmdEndUserRecovery   CmdOp = 0x11 // UBLK_CMD_END_USER_RECOVERY (6.1)
	CmdGetDevInfo2       CmdOp = 0x12 // UBLK_CMD_GET_DEV_INFO2 (6.2)
)

// Encoded control commands (UBLK_U_CMD_*), ublk_cmd.h: _IOR or _IOWR('u', nr,
// struct ublksrv_ctrl_cmd). Available since 6.4; commands added later carry
// their version. The payload of each is described in docs/ublk-uapi.md §2.1.
const (
	// UCmdGetQueueAffinity is UBLK_U_CMD_GET_QUEUE_AFFINITY (0x80207501):
	// data[0] = queue id, addr/len = cpumask buffer.
	UCmdGetQueueAffinity = iorCtrl | CmdGetQueueAffinity
	// UCmdGetDevInfo is UBLK_U_CMD_GET_DEV_INFO (0x80207502): addr/len =
	// struct ublksrv_ctrl_dev_info.
	UCmdGetDevInfo = iorCtrl | CmdGetDevInfo
	// UCmdAddDev is UBLK_U_CMD_ADD_DEV (0xC0207504): addr/len = struct
	// ublksrv_ctrl_dev_info, read and written back negotiated.
	UCmdAddDev = iowrCtrl | CmdAddDev
	// UCmdDelDev is UBLK_U_CMD_DEL_DEV (0xC0207505); blocks until the last
	// reference to the device is gone.
	UCmdDelDev = iowrCtrl | CmdDelDev
	// UCmdStartDev is UBLK_U_CMD_START_DEV (0xC0207506): data[0] = server
	// pid; blocks until every tag of every queue is fetched and add_disk ran.
	UCmdStartDev = iowrCtrl | CmdStartDev
	// UCmdStopDev is UBLK_U_CMD_STOP_DEV (0xC0207507).
	UCmdStopDev = iowrCtrl | CmdStopDev
	// UCmdSetParams is UBLK_U_CMD_SET_PARAMS (0xC0207508): addr/len =
	// struct ublk_params.
	UCmdSetParams = iowrCtrl | CmdSetParams
	// UCmdGetParams is UBLK_U_CMD_GET_PARAMS (0x80207509): addr/len =
	// struct ublk_params with len set.
	UCmdGetParams = iorCtrl | CmdGetParams
	// UCmdStartUserRecovery is UBLK_U_CMD_START_USER_RECOVERY (0xC0207510).
	UCmdStartUserRecovery = iowrCtrl | CmdStartUserRecovery
	// UCmdEndUserRecovery is UBLK_U_CMD_END_USER_RECOVERY (0xC0207511):
	// data[0] = new server pid; blocks until every tag is fetched.
	UCmdEndUserRecovery = iowrCtrl | CmdEndUserRecovery
	// UCmdGetDevInfo2 is UBLK_U_CMD_GET_DEV_INFO2 (0x80207512): addr =
	// device path followed by struct ublksrv_ctrl_dev_info (docs/ublk-uapi.md §2.3).
	UCmdGetDevInfo2 = iorCtrl | CmdGetDevInfo2
	// UCmdGetFeatures is UBLK_U_CMD_GET_FEATURES (0x80207513, 6.5): addr =
	// u64, len = exactly [FeaturesLen]. It has no legacy number: the kernel
	// matches the full encoded value only.
	UCmdGetFeatures = iorCtrl | 0x13
	// UCmdDelDevAsync is UBLK_U_CMD_DEL_DEV_ASYNC (0x80207514, 6.9~):
	// DEL_DEV without waiting for the release.
	UCmdDelDevAsync = iorCtrl | 0x14
	// UCmdUpdateSize is UBLK_U_CMD_UPDATE_SIZE (0xC0207515, 6.16~): data[0]
	// = new size in 512-byte sectors; needs [FUpdateSize].
	UCmdUpdateSize = iowrCtrl | 0x15
	// UCmdQuiesceDev is UBLK_U_CMD_QUIESCE_DEV (0xC0207516, 6.16~): data[0]
	// = timeout in ms, 0 = forever; needs [FQuiesce].
	UCmdQuiesceDev = iowrCtrl | 0x16
	// UCmdTryStopDev is UBLK_U_CMD_TRY_STOP_DEV (0xC0207517, 7.0~): STOP_DEV
	// that fails with EBUSY while the disk is open; needs [FSafeStopDev].
	UCmdTryStopDev = iowrCtrl | 0x17
	// UCmdRegBuf is UBLK_U_CMD_REG_BUF (0xC0207518, 7.1~): registers a
	// shared-memory buffer; needs [FShmemZC]. Payload not mirrored (docs/ublk-uapi.md §14).
	UCmdRegBuf = iowrCtrl | 0x18
	// UCmdUnregBuf is UBLK_U_CMD_UNREG_BUF (0xC0207519, 7.1~): data[0] =
	// buffer index.
	UCmdUnregBuf = iowrCtrl | 0x19
)

// Legacy I/O command numbers (UBLK_IO_*), ublk_cmd.h, since 6.0.
const (
	IOFetchReq          CmdOp = 0x20 // UBLK_IO_FETCH_REQ
	IOCommitAndFetchReq CmdOp = 0x21 // UBLK_IO_COMMIT_AND_FETCH_REQ
	IONeedGetData       CmdOp = 0x22 // UBLK_IO_NEED_GET_DATA
)

// Encoded I/O commands (UBLK_U_IO_*), ublk_cmd.h: _IOWR('u', nr, struct
// ublksrv_io_cmd), since 6.4 unless stated otherwise. Validity rules per
// command are in docs/ublk-uapi.md §7.2.
const (
	// UIOFetchReq is UBLK_U_IO_FETCH_REQ (0xC0107520): arms a tag once,
	// before START_DEV.
	UIOFetchReq = iowrIO | IOFetchReq
	// UIOCommitAndFetchReq is UBLK_U_IO_COMMIT_AND_FETCH_REQ (0xC0107521):
	// completes the tag's request with result and re-arms the tag.
	UIOCommitAndFetchReq = iowrIO | IOCommitAndFetchReq
	// UIONeedGetData is UBLK_U_IO_NEED_GET_DATA (0xC0107522): supplies the
	// buffer for a WRITE delivered with [IOResNeedGetData].
	UIONeedGetData = iowrIO | IONeedGetData
	// UIORegisterIOBuf is UBLK_U_IO_REGISTER_IO_BUF (0xC0107523, 6.15):
	// zero copy, addr = index in the ring's sparse buffer table.
	UIORegisterIOBuf = iowrIO | 0x23
	// UIOUnregisterIOBuf is UBLK_U_IO_UNREGISTER_IO_BUF (0xC0107524, 6.15).
	UIOUnregisterIOBuf = iowrIO | 0x24
	// UIOPrepIOCmds is UBLK_U_IO_PREP_IO_CMDS (0xC0107525, 7.0~):
	// BATCH_IO only; payload struct ublk_batch_io (16 B, not mirrored).
	UIOPrepIOCmds = iowrBat | 0x25
	// UIOCommitIOCmds is UBLK_U_IO_COMMIT_IO_CMDS (0xC0107526, 7.0~).
	UIOCommitIOCmds = iowrBat | 0x26
	// UIOFetchIOCmds is UBLK_U_IO_FETCH_IO_CMDS (0xC0107527, 7.0~),
	// multishot.
	UIOFetchIOCmds = iowrBat | 0x27
)

// NR returns the command number, _IOC_NR(op): the byte the 6.4+ driver
// dispatches on.
func (op CmdOp) NR() uint8 { return uint8(op >> iocNRShift) }

// Encoded reports whether op is ioctl-encoded (type 'u') rather than a legacy
// number.
func (op CmdOp) Encoded() bool { return uint8(op>>iocTypeShift) == ioctlType }

// Legacy returns the legacy form of op, its bare command number, which is
// what 6.1-6.3 kernels require. It is meaningful only for commands that
// existed then (the Cmd* and IO* constants); [UCmdGetFeatures] in particular
// has no legacy form.
func (op CmdOp) Legacy() CmdOp { return CmdOp(op.NR()) }

var cmdNames = map[uint8]string{
	0x01: "CMD_GET_QUEUE_AFFINITY",
	0x02: "CMD_GET_DEV_INFO",
	0x04: "CMD_ADD_DEV",
	0x05: "CMD_DEL_DEV",
	0x06: "CMD_START_DEV",
	0x07: "CMD_STOP_DEV",
	0x08: "CMD_SET_PARAMS",
	0x09: "CMD_GET_PARAMS",
	0x10: "CMD_START_USER_RECOVERY",
	0x11: "CMD_END_USER_RECOVERY",
	0x12: "CMD_GET_DEV_INFO2",
	0x13: "CMD_GET_FEATURES",
	0x14: "CMD_DEL_DEV_ASYNC",
	0x15: "CMD_UPDATE_SIZE",
	0x16: "CMD_QUIESCE_DEV",
	0x17: "CMD_TRY_STOP_DEV",
	0x18: "CMD_REG_BUF",
	0x19: "CMD_UNREG_BUF",
	0x20: "IO_FETCH_REQ",
	0x21: "IO_COMMIT_AND_FETCH_REQ",
	0x22: "IO_NEED_GET_DATA",
	0x23: "IO_REGISTER_IO_BUF",
	0x24: "IO_UNREGISTER_IO_BUF",
	0x25: "IO_PREP_IO_CMDS",
	0x26: "IO_COMMIT_IO_CMDS",
	0x27: "IO_FETCH_IO_CMDS",
}

// String returns the C name of op, UBLK_U_... for an encoded opcode and
// UBLK_... for a legacy one (for example "UBLK_U_CMD_ADD_DEV",
// "UBLK_IO_FETCH_REQ"), or "CmdOp(0x...)" for a number ublk_cmd.h does not
// define. It is meant for error messages.
func (op CmdOp) String() string {
	name, ok := cmdNames[op.NR()]
	switch {
	case ok && op.Encoded():
		return "UBLK_U_" + name
	case ok && op>>iocTypeShift == 0 && op.NR() < 0x13:
		return "UBLK_" + name
	case ok && op>>iocTypeShift == 0 && op.NR() >= 0x20 && op.NR() <= 0x22:
		return "UBLK_" + name
	}
	return fmt.Sprintf("CmdOp(%#x)", uint32(op))
}
