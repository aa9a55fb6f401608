package uapi

import (
	"fmt"
	"strings"
	"syscall"
)

// Features is a set of UBLK_F_* flags: the flags field of struct
// ublksrv_ctrl_dev_info (requested at ADD_DEV, negotiated by the kernel and
// written back) and the u64 GET_FEATURES returns. docs/ublk-uapi.md §6 gives
// each flag's constraints.
type Features uint64

// Feature flags (UBLK_F_*), ublk_cmd.h.
const (
	// FSupportZeroCopy is UBLK_F_SUPPORT_ZERO_COPY: defined since 6.0 but
	// cleared by every kernel before 6.15; from 6.15 it enables
	// REGISTER/UNREGISTER_IO_BUF and needs CAP_SYS_ADMIN.
	FSupportZeroCopy Features = 1 << 0
	// FURingCmdCompInTask is UBLK_F_URING_CMD_COMP_IN_TASK (6.0);
	// informational, always set by 6.12+.
	FURingCmdCompInTask Features = 1 << 1
	// FNeedGetData is UBLK_F_NEED_GET_DATA (6.0): WRITEs are first
	// delivered with [IOResNeedGetData] so the server can supply a buffer.
	FNeedGetData Features = 1 << 2
	// FUserRecovery is UBLK_F_USER_RECOVERY (6.1): the device survives
	// server exit (state QUIESCED) and can be recovered.
	FUserRecovery Features = 1 << 3
	// FUserRecoveryReissue is UBLK_F_USER_RECOVERY_REISSUE (6.1): with
	// FUserRecovery, requests the old server held are requeued.
	FUserRecoveryReissue Features = 1 << 4
	// FUnprivilegedDev is UBLK_F_UNPRIVILEGED_DEV (6.2): device owned by an
	// unprivileged user; commands must carry the device path.
	FUnprivilegedDev Features = 1 << 5
	// FCmdIoctlEncode is UBLK_F_CMD_IOCTL_ENCODE (6.4): informational, the
	// kernel accepts the UBLK_U_* opcodes.
	FCmdIoctlEncode Features = 1 << 6
	// FUserCopy is UBLK_F_USER_COPY (6.4): data moves with pread/pwrite on
	// /dev/ublkcN at [UserCopyOffset]; FETCH/COMMIT addr must be 0.
	FUserCopy Features = 1 << 7
	// FZoned is UBLK_F_ZONED (6.6): zoned device; needs FUserCopy.
	FZoned Features = 1 << 8
	// FUserRecoveryFailIO is UBLK_F_USER_RECOVERY_FAIL_IO (6.13): with
	// FUserRecovery, fail I/O instead of queueing it while no server runs.
	FUserRecoveryFailIO Features = 1 << 9
	// FUpdateSize is UBLK_F_UPDATE_SIZE (6.16~): enables [UCmdUpdateSize].
	FUpdateSize Features = 1 << 10
	// FAutoBufReg is UBLK_F_AUTO_BUF_REG (6.16~): the request buffer is
	// registered into the issuing ring; see [AutoBufRegAddr].
	FAutoBufReg Features = 1 << 11
	// FQuiesce is UBLK_F_QUIESCE (6.16~): enables [UCmdQuiesceDev]; needs
	// FUserRecovery.
	FQuiesce Features = 1 << 12
	// FPerIODaemon is UBLK_F_PER_IO_DAEMON (6.16~): each (queue, tag) may
	// be served by its own thread.
	FPerIODaemon Features = 1 << 13
	// FBufRegOffDaemon is UBLK_F_BUF_REG_OFF_DAEMON (6.17~):
	// (UN)REGISTER_IO_BUF may be issued from any task.
	FBufRegOffDaemon Features = 1 << 14
	// FBatchIO is UBLK_F_BATCH_IO (7.0~): batch PREP/COMMIT/FETCH commands
	// replace FETCH_REQ/COMMIT_AND_FETCH_REQ/NEED_GET_DATA.
	FBatchIO Features = 1 << 15
	// FIntegrity is UBLK_F_INTEGRITY (7.0~): requests may carry integrity
	// buffers; needs FUserCopy.
	FIntegrity Features = 1 << 16
	// FSafeStopDev is UBLK_F_SAFE_STOP_DEV (7.0~): enables [UCmdTryStopDev].
	FSafeStopDev Features = 1 << 17
	// FNoAutoPartScan is UBLK_F_NO_AUTO_PART_SCAN (7.0~): START_DEV skips
	// the partition scan.
	FNoAutoPartScan Features = 1 << 18
	// FShmemZC is UBLK_F_SHMEM_ZC (7.1~): shared-memory zero copy through
	// [UCmdRegBuf]; the UAPI is still changing.
	FShmemZC Features = 1 << 19
)

var featureNames = [...]string{
	"SUPPORT_ZERO_COPY",
	"URING_CMD_COMP_IN_TASK",
	"NEED_GET_DATA",
	"USER_RECOVERY",
	"USER_RECOVERY_REISSUE",
	"UNPRIVILEGED_DEV",
	"CMD_IOCTL_ENCODE",
	"USER_COPY",
	"ZONED",
	"USER_RECOVERY_FAIL_IO",
	"UPDATE_SIZE",
	"AUTO_BUF_REG",
	"QUIESCE",
	"PER_IO_DAEMON",
	"BUF_REG_OFF_DAEMON",
	"BATCH_IO",
	"INTEGRITY",
	"SAFE_STOP_DEV",
	"NO_AUTO_PART_SCAN",
	"SHMEM_ZC",
}

// String names the set flags by their C names without the UBLK_F_ prefix,
// lowest bit first, joined by "|" (for example "NEED_GET_DATA|USER_COPY");
// bits this package does not know are appended as one hex value. The empty
// set is "0".
func (f Features) String() string {
	return bitString(uint64(f), featureNames[:])
}

// Has reports whether every flag in want is set in f.
func (f Features) Has(want Features) bool { return f&want == want }

// bitString names the set bits of v from names (bit i is names[i], an empty
// name counts as unknown) and appends the unknown rest in hex.
func bitString(v uint64, names []string) string {
	if v == 0 {
		return "0"
	}
	var b strings.Builder
	var unknown uint64
	for i := 0; i < 64; i++ {
		bit := uint64(1) << i
		if v&bit == 0 {
			continue
		}
		if i >= len(names) || names[i] == "" {
			unknown |= bit
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		b.WriteString(names[i])
	}
	if unknown != 0 {
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		fmt.Fprintf(&b, "%#x", unknown)
	}
	return b.String()
}

// DevState is a device state (UBLK_S_DEV_*), the state field of struct
// ublksrv_ctrl_dev_info.
type DevState uint16

// Device states (UBLK_S_DEV_*), ublk_cmd.h.
const (
	// SDevDead is UBLK_S_DEV_DEAD: added but not started, or stopped.
	SDevDead DevState = 0
	// SDevLive is UBLK_S_DEV_LIVE: started, /dev/ublkbN exists.
	SDevLive DevState = 1
	// SDevQuiesced is UBLK_S_DEV_QUIESCED (6.1): server gone with
	// USER_RECOVERY; I/O waits for recovery.
	SDevQuiesced DevState = 2
	// SDevFailIO is UBLK_S_DEV_FAIL_IO (6.13): as SDevQuiesced, but new I/O
	// fails (USER_RECOVERY_FAIL_IO).
	SDevFailIO DevState = 3
)

// String returns "DEAD", "LIVE", "QUIESCED", "FAIL_IO" (the C names without
// UBLK_S_DEV_), or "DevState(n)".
func (s DevState) String() string {
	switch s {
	case SDevDead:
		return "DEAD"
	case SDevLive:
		return "LIVE"
	case SDevQuiesced:
		return "QUIESCED"
	case SDevFailIO:
		return "FAIL_IO"
	}
	return fmt.Sprintf("DevState(%d)", uint16(s))
}

// IOOp is a request operation (UBLK_IO_OP_*), bits 0-7 of
// ublksrv_io_desc.op_flags; see [IODesc.Op].
type IOOp uint8

// Request operations (UBLK_IO_OP_*), ublk_cmd.h. The kernel fails any other
// block operation before it reaches the server.
const (
	IOOpRead         IOOp = 0  // UBLK_IO_OP_READ
	IOOpWrite        IOOp = 1  // UBLK_IO_OP_WRITE
	IOOpFlush        IOOp = 2  // UBLK_IO_OP_FLUSH
	IOOpDiscard      IOOp = 3  // UBLK_IO_OP_DISCARD
	IOOpWriteSame    IOOp = 4  // UBLK_IO_OP_WRITE_SAME: defined, never generated
	IOOpWriteZeroes  IOOp = 5  // UBLK_IO_OP_WRITE_ZEROES
	IOOpZoneOpen     IOOp = 10 // UBLK_IO_OP_ZONE_OPEN (6.6)
	IOOpZoneClose    IOOp = 11 // UBLK_IO_OP_ZONE_CLOSE (6.6)
	IOOpZoneFinish   IOOp = 12 // UBLK_IO_OP_ZONE_FINISH (6.6)
	IOOpZoneAppend   IOOp = 13 // UBLK_IO_OP_ZONE_APPEND (6.6)
	IOOpZoneResetAll IOOp = 14 // UBLK_IO_OP_ZONE_RESET_ALL (6.6)
	IOOpZoneReset    IOOp = 15 // UBLK_IO_OP_ZONE_RESET (6.6)
	// IOOpReportZones is UBLK_IO_OP_REPORT_ZONES (6.6): reply with struct
	// blk_zone entries; the descriptor's NrSectors holds nr_zones.
	IOOpReportZones IOOp = 18
)

var ioOpNames = map[IOOp]string{
	IOOpRead:         "READ",
	IOOpWrite:        "WRITE",
	IOOpFlush:        "FLUSH",
	IOOpDiscard:      "DISCARD",
	IOOpWriteSame:    "WRITE_SAME",
	IOOpWriteZeroes:  "WRITE_ZEROES",
	IOOpZoneOpen:     "ZONE_OPEN",
	IOOpZoneClose:    "ZONE_CLOSE",
	IOOpZoneFinish:   "ZONE_FINISH",
	IOOpZoneAppend:   "ZONE_APPEND",
	IOOpZoneResetAll: "ZONE_RESET_ALL",
	IOOpZoneReset:    "ZONE_RESET",
	IOOpReportZones:  "REPORT_ZONES",
}

// String returns the C name without UBLK_IO_OP_ ("READ", "WRITE_ZEROES"), or
// "IOOp(n)".
func (op IOOp) String() string {
	if s, ok := ioOpNames[op]; ok {
		return s
	}
	return fmt.Sprintf("IOOp(%d)", uint8(op))
}

// IOFlags is the set of UBLK_IO_F_* flags of a request: ublksrv_io_desc.op_flags
// with the operation byte cleared, so the constants keep their C values
// (bit 8 and up). See [IODesc.Flags].
type IOFlags uint32

// Request flags (UBLK_IO_F_*), ublk_cmd.h.
const (
	IOFFailfastDev       IOFlags = 1 << 8  // UBLK_IO_F_FAILFAST_DEV
	IOFFailfastTransport IOFlags = 1 << 9  // UBLK_IO_F_FAILFAST_TRANSPORT
	IOFFailfastDriver    IOFlags = 1 << 10 // UBLK_IO_F_FAILFAST_DRIVER
	IOFMeta              IOFlags = 1 << 11 // UBLK_IO_F_META
	// IOFFUA is UBLK_IO_F_FUA: the write must be durable when it completes.
	IOFFUA IOFlags = 1 << 13
	// IOFNoUnmap is UBLK_IO_F_NOUNMAP: a WRITE_ZEROES that must not
	// deallocate.
	IOFNoUnmap IOFlags = 1 << 15
	IOFSwap    IOFlags = 1 << 16 // UBLK_IO_F_SWAP
	// IOFNeedRegBuf is UBLK_IO_F_NEED_REG_BUF (6.16~): auto buffer
	// registration failed and [AutoBufRegFallback] was requested.
	IOFNeedRegBuf IOFlags = 1 << 17
	// IOFIntegrity is UBLK_IO_F_INTEGRITY (7.0~): the request has an
	// integrity buffer.
	IOFIntegrity IOFlags = 1 << 18
	// IOFShmemZC is UBLK_IO_F_SHMEM_ZC (7.1~): IODesc.Addr encodes a shared
	// buffer index and offset instead of an address.
	IOFShmemZC IOFlags = 1 << 19
)

var ioFlagNames = [...]string{
	8:  "FAILFAST_DEV",
	9:  "FAILFAST_TRANSPORT",
	10: "FAILFAST_DRIVER",
	11: "META",
	13: "FUA",
	15: "NOUNMAP",
	16: "SWAP",
	17: "NEED_REG_BUF",
	18: "INTEGRITY",
	19: "SHMEM_ZC",
}

// String names the set flags by their C names without UBLK_IO_F_, joined by
// "|", unknown bits in hex; the empty set is "0".
func (f IOFlags) String() string {
	return bitString(uint64(f), ioFlagNames[:])
}

// Device attributes (UBLK_ATTR_*), ublk_cmd.h: bits of ParamBasic.Attrs.
const (
	AttrReadOnly      uint32 = 1 << 0 // UBLK_ATTR_READ_ONLY
	AttrRotational    uint32 = 1 << 1 // UBLK_ATTR_ROTATIONAL
	AttrVolatileCache uint32 = 1 << 2 // UBLK_ATTR_VOLATILE_CACHE: enables FLUSH
	AttrFUA           uint32 = 1 << 3 // UBLK_ATTR_FUA: only honoured with AttrVolatileCache
)

// Parameter block types (UBLK_PARAM_TYPE_*), ublk_cmd.h: bits of
// Params.Types saying which blocks are valid. SET_PARAMS masks out types the
// kernel does not know.
const (
	// ParamTypeBasic is UBLK_PARAM_TYPE_BASIC (6.0); required, START_DEV
	// fails with EINVAL without it.
	ParamTypeBasic uint32 = 1 << 0
	// ParamTypeDiscard is UBLK_PARAM_TYPE_DISCARD (6.0).
	ParamTypeDiscard uint32 = 1 << 1
	// ParamTypeDevt is UBLK_PARAM_TYPE_DEVT (6.2); read-only: GET_PARAMS
	// fills it, SET_PARAMS with it fails with EINVAL.
	ParamTypeDevt uint32 = 1 << 2
	// ParamTypeZoned is UBLK_PARAM_TYPE_ZONED (6.6); required iff FZoned.
	ParamTypeZoned uint32 = 1 << 3
	// ParamTypeDMAAlign is UBLK_PARAM_TYPE_DMA_ALIGN (6.15~).
	ParamTypeDMAAlign uint32 = 1 << 4
	// ParamTypeSegment is UBLK_PARAM_TYPE_SEGMENT (6.15~).
	ParamTypeSegment uint32 = 1 << 5
	// ParamTypeIntegrity is UBLK_PARAM_TYPE_INTEGRITY (7.0~); its block is
	// not mirrored by [Params].
	ParamTypeIntegrity uint32 = 1 << 6
)

// Results of FETCH_REQ / COMMIT_AND_FETCH_REQ / NEED_GET_DATA completions
// (UBLK_IO_RES_*), ublk_cmd.h, as found in cqe.res. Any other negative value
// is an immediate rejection of the command (docs/ublk-uapi.md §7.3).
const (
	// IOResOK is UBLK_IO_RES_OK: a new request for the tag is in its
	// descriptor.
	IOResOK int32 = 0
	// IOResNeedGetData is UBLK_IO_RES_NEED_GET_DATA: with FNeedGetData, a
	// WRITE arrived without data; answer with NEED_GET_DATA.
	IOResNeedGetData int32 = 1
	// IOResAbort is UBLK_IO_RES_ABORT, -ENODEV: the device or queue is
	// going away; the tag is finished and must not be re-armed. It is the
	// only result that means "no more fetches".
	IOResAbort = -int32(syscall.ENODEV)
)
