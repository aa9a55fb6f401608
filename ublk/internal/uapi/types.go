package uapi

import (
	"structs"
	"unsafe"
)

// Struct sizes in bytes, from ublk_cmd.h as laid out by the C compiler on
// amd64/arm64. The compile-time checks below keep the Go mirrors at exactly
// these sizes.
const (
	SizeofCtrlCmd     = 32 // sizeof(struct ublksrv_ctrl_cmd)
	SizeofCtrlDevInfo = 64 // sizeof(struct ublksrv_ctrl_dev_info)
	SizeofIODesc      = 24 // sizeof(struct ublksrv_io_desc)
	SizeofIOCmd       = 16 // sizeof(struct ublksrv_io_cmd)

	SizeofParamBasic    = 32 // sizeof(struct ublk_param_basic)
	SizeofParamDiscard  = 20 // sizeof(struct ublk_param_discard)
	SizeofParamDevt     = 16 // sizeof(struct ublk_param_devt)
	SizeofParamZoned    = 32 // sizeof(struct ublk_param_zoned)
	SizeofParamDMAAlign = 8  // sizeof(struct ublk_param_dma_align)
	SizeofParamSegment  = 16 // sizeof(struct ublk_param_segment)

	// SizeofParams is sizeof(struct ublk_params) in the 6.15-6.19 layout
	// that [Params] mirrors (basic through seg). Send this as Params.Len to
	// any kernel: the kernel clamps len to its own size.
	SizeofParams = 136
	// SizeofParams612 is sizeof(struct ublk_params) in 6.6-6.14, which
	// includes the 6.12 baseline (basic, discard, devt, zoned).
	SizeofParams612 = 112
	// SizeofParams62 is sizeof(struct ublk_params) in 6.2-6.5 (basic,
	// discard, devt).
	SizeofParams62 = 80
	// SizeofParams60 is sizeof(struct ublk_params) in 6.0-6.1 (basic,
	// discard).
	SizeofParams60 = 64
)

// Compile-time size checks: each line fails to compile (negative array
// length or constant overflow) if a mirror's size differs from its C size.
var (
	_ [unsafe.Sizeof(CtrlCmd{}) - SizeofCtrlCmd]struct{}
	_ [SizeofCtrlCmd - unsafe.Sizeof(CtrlCmd{})]struct{}
	_ [unsafe.Sizeof(CtrlDevInfo{}) - SizeofCtrlDevInfo]struct{}
	_ [SizeofCtrlDevInfo - unsafe.Sizeof(CtrlDevInfo{})]struct{}
	_ [unsafe.Sizeof(IODesc{}) - SizeofIODesc]struct{}
	_ [SizeofIODesc - unsafe.Sizeof(IODesc{})]struct{}
	_ [unsafe.Sizeof(IOCmd{}) - SizeofIOCmd]struct{}
	_ [SizeofIOCmd - unsafe.Sizeof(IOCmd{})]struct{}
	_ [unsafe.Sizeof(Params{}) - SizeofParams]struct{}
	_ [SizeofParams - unsafe.Sizeof(Params{})]struct{}
)

// CtrlCmd mirrors struct ublksrv_ctrl_cmd (ublk_cmd.h, 32 bytes), the payload
// of every control command, carried in the SQE's cmd area (which is why the
// control ring needs IORING_SETUP_SQE128). Encode it with [CtrlCmd.Encode].
//
// The 6.0/6.1 header declares data[2] where 6.2+ has data[1], dev_path_len,
// pad and reserved; the size and the first 24 bytes are the same. Leave
// bytes 24-31 zero unless sending a device path (docs/ublk-uapi.md §2.2, §2.3).
type CtrlCmd struct {
	_ structs.HostLayout
	// DevID (dev_id, @0) is the target device. For ADD_DEV it must equal
	// CtrlDevInfo.DevID; 0xFFFFFFFF ([DevIDAny]) lets the kernel choose.
	DevID uint32
	// QueueID (queue_id, @4) must be 0xFFFF ([QueueIDNone]) for ADD_DEV and
	// is otherwise unused.
	QueueID uint16
	// Len (len, @6) is the length of the buffer at Addr.
	Len uint16
	// Addr (addr, @8) is the user address of the command's IN or OUT
	// buffer. The memory must stay valid and pinned until the CQE arrives.
	Addr uint64
	// Data (data[0], @16) is the inline argument (pid, queue id, size,
	// timeout ...).
	Data uint64
	// DevPathLen (dev_path_len, @24, 6.2) is the length of the device path
	// at the start of Addr, NUL included, for unprivileged devices and
	// GET_DEV_INFO2.
	DevPathLen uint16
	_          uint16 // pad, @26
	_          uint32 // reserved, @28
}

// Special values of CtrlCmd fields.
const (
	// DevIDAny asks ADD_DEV to pick a free device id (dev_id = -1).
	DevIDAny uint32 = 0xFFFFFFFF
	// QueueIDNone is the queue_id of commands not aimed at a queue; ADD_DEV
	// requires it.
	QueueIDNone uint16 = 0xFFFF
)

// CtrlDevInfo mirrors struct ublksrv_ctrl_dev_info (ublk_cmd.h, 64 bytes),
// the payload of ADD_DEV (in and out) and GET_DEV_INFO(2) (out).
// docs/ublk-uapi.md §2.4 says which fields the kernel sets and how ADD_DEV negotiates
// Flags.
type CtrlDevInfo struct {
	_ structs.HostLayout
	// NrHWQueues (nr_hw_queues, @0): 1..4096, clamped to the CPU count.
	NrHWQueues uint16
	// QueueDepth (queue_depth, @2): 1..[MaxQueueDepth].
	QueueDepth uint16
	// State (state, @4) is set by the kernel.
	State DevState
	_     uint16 // pad0, @6
	// MaxIOBufBytes (max_io_buf_bytes, @8): largest request in bytes;
	// rounded down to the page size by the kernel. No default: set it.
	MaxIOBufBytes uint32
	// DevID (dev_id, @12): requested id, or [DevIDAny]; the assigned id
	// after ADD_DEV (/dev/ublkcN, /dev/ublkbN).
	DevID uint32
	// UblksrvPID (ublksrv_pid, @16): the pid passed to START_DEV, -1 when
	// stopped.
	UblksrvPID int32
	_          uint32 // pad1, @20
	// Flags (flags, @24): requested UBLK_F_* flags, negotiated by ADD_DEV.
	Flags Features
	// UblksrvFlags (ublksrv_flags, @32) is opaque to the kernel: stored and
	// returned as is.
	UblksrvFlags uint64
	// OwnerUID (owner_uid, @40, 6.2) is set by the kernel at ADD_DEV. In
	// 6.0/6.1 bytes 40-47 are reserved0.
	OwnerUID uint32
	// OwnerGID (owner_gid, @44, 6.2) is set by the kernel at ADD_DEV.
	OwnerGID uint32
	_        uint64 // reserved1, @48
	_        uint64 // reserved2, @56
}

// IODesc mirrors struct ublksrv_io_desc (ublk_cmd.h, 24 bytes): the kernel's
// description of the request currently assigned to a tag, in the read-only
// descriptor area mmap'd from /dev/ublkcN. Read it with [DescArea.At] after
// reaping the tag's FETCH/COMMIT completion.
type IODesc struct {
	_ structs.HostLayout
	// OpFlags (op_flags, @0): bits 0-7 are the [IOOp], the rest
	// [IOFlags]; use [IODesc.Op] and [IODesc.Flags].
	OpFlags uint32
	// NrSectors (union nr_sectors / nr_zones, @4): request length in
	// 512-byte sectors; the number of zones for REPORT_ZONES.
	NrSectors uint32
	// StartSector (start_sector, @8): first 512-byte sector.
	StartSector uint64
	// Addr (addr, @16): in copy mode, the buffer the server supplied for
	// this tag; with [IOFShmemZC] (7.1~) an encoded index and offset.
	Addr uint64
}

// Op returns the request's operation, op_flags & 0xff (ublksrv_get_op).
func (d *IODesc) Op() IOOp { return IOOp(d.OpFlags) }

// Flags returns the request's UBLK_IO_F_* flags: op_flags with the
// operation byte cleared, so they compare directly with the IOF* constants.
// (ublksrv_get_flags shifts them down by 8 instead; that form is not used
// here.)
func (d *IODesc) Flags() IOFlags { return IOFlags(d.OpFlags &^ 0xff) }

// IOCmd mirrors struct ublksrv_io_cmd (ublk_cmd.h, 16 bytes), the payload of
// every I/O command, carried in the SQE's cmd area. Encode it with
// [IOCmd.Encode].
type IOCmd struct {
	_ structs.HostLayout
	// QID (q_id, @0): the queue.
	QID uint16
	// Tag (tag, @2): 0..queue_depth-1.
	Tag uint16
	// Result (result, @4): COMMIT only; bytes done (>= 0) or -errno.
	Result int32
	// Addr (union addr / zone_append_lba, @8): the tag's buffer in copy
	// mode; 0 with USER_COPY or zero copy, except that a ZONE_APPEND
	// commit returns the written LBA here; the buffer-table index for
	// (UN)REGISTER_IO_BUF.
	Addr uint64
}

// ParamBasic mirrors struct ublk_param_basic (ublk_cmd.h, 32 bytes), the
// mandatory parameter block ([ParamTypeBasic]). Validation rules:
// docs/ublk-uapi.md §3.
type ParamBasic struct {
	_ structs.HostLayout
	// Attrs (attrs, @0): UBLK_ATTR_* bits ([AttrReadOnly] ...).
	Attrs uint32
	// LogicalBSShift (logical_bs_shift, @4): 9..PAGE_SHIFT.
	LogicalBSShift uint8
	// PhysicalBSShift (physical_bs_shift, @5): >= LogicalBSShift.
	PhysicalBSShift uint8
	// IOOptShift (io_opt_shift, @6): optimal I/O size is 1<<IOOptShift.
	IOOptShift uint8
	// IOMinShift (io_min_shift, @7): minimum I/O size is 1<<IOMinShift.
	IOMinShift uint8
	// MaxSectors (max_sectors, @8): <= MaxIOBufBytes>>9; 6.12+ also
	// requires >= PAGE_SIZE/512.
	MaxSectors uint32
	// ChunkSectors (chunk_sectors, @12): the zone size for zoned devices.
	ChunkSectors uint32
	// DevSectors (dev_sectors, @16): capacity in 512-byte sectors.
	DevSectors uint64
	// VirtBoundaryMask (virt_boundary_mask, @24).
	VirtBoundaryMask uint64
}

// ParamDiscard mirrors struct ublk_param_discard (ublk_cmd.h, 20 bytes),
// [ParamTypeDiscard].
type ParamDiscard struct {
	_ structs.HostLayout
	// DiscardAlignment (discard_alignment, @0).
	DiscardAlignment uint32
	// DiscardGranularity (discard_granularity, @4): must be non-zero.
	DiscardGranularity uint32
	// MaxDiscardSectors (max_discard_sectors, @8).
	MaxDiscardSectors uint32
	// MaxWriteZeroesSectors (max_write_zeroes_sectors, @12).
	MaxWriteZeroesSectors uint32
	// MaxDiscardSegments (max_discard_segments, @16): must be 1 when
	// MaxDiscardSectors is non-zero.
	MaxDiscardSegments uint16
	_                  uint16 // reserved0, @18
}

// ParamDevt mirrors struct ublk_param_devt (ublk_cmd.h, 16 bytes, 6.2),
// [ParamTypeDevt]: read-only, filled by GET_PARAMS. The disk numbers are 0
// until START_DEV.
type ParamDevt struct {
	_ structs.HostLayout
	// CharMajor (char_major, @0) of /dev/ublkcN.
	CharMajor uint32
	// CharMinor (char_minor, @4) of /dev/ublkcN.
	CharMinor uint32
	// DiskMajor (disk_major, @8) of /dev/ublkbN.
	DiskMajor uint32
	// DiskMinor (disk_minor, @12) of /dev/ublkbN.
	DiskMinor uint32
}

// ParamZoned mirrors struct ublk_param_zoned (ublk_cmd.h, 32 bytes, 6.6),
// [ParamTypeZoned].
type ParamZoned struct {
	_ structs.HostLayout
	// MaxOpenZones (max_open_zones, @0): <= number of zones.
	MaxOpenZones uint32
	// MaxActiveZones (max_active_zones, @4): <= number of zones.
	MaxActiveZones uint32
	// MaxZoneAppendSectors (max_zone_append_sectors, @8): non-zero.
	MaxZoneAppendSectors uint32
	_                    [20]byte // reserved[20], @12
}

// ParamDMAAlign mirrors struct ublk_param_dma_align (ublk_cmd.h, 8 bytes,
// 6.15~), [ParamTypeDMAAlign].
type ParamDMAAlign struct {
	_ structs.HostLayout
	// Alignment (alignment, @0) is a mask: Alignment+1 must be a power of 2
	// below PAGE_SIZE. The kernel's default is 3.
	Alignment uint32
	_         [4]byte // pad[4], @4
}

// ParamSegment mirrors struct ublk_param_segment (ublk_cmd.h, 16 bytes,
// 6.15~), [ParamTypeSegment]. If any field is 0 the kernel's behaviour is
// undefined.
type ParamSegment struct {
	_ structs.HostLayout
	// SegBoundaryMask (seg_boundary_mask, @0): mask+1 must be a power of 2
	// and >= [MinSegmentSize].
	SegBoundaryMask uint64
	// MaxSegmentSize (max_segment_size, @8): >= [MinSegmentSize].
	MaxSegmentSize uint32
	// MaxSegments (max_segments, @12).
	MaxSegments uint16
	_           [2]byte // pad[2], @14
}

// Params mirrors struct ublk_params (ublk_cmd.h) in its 6.15-6.19 layout,
// 136 bytes: every block up to seg; the 7.0 integrity block that follows is
// not mirrored. The kernel passes it by address (CtrlCmd.Addr) for
// SET_PARAMS and GET_PARAMS.
//
// Length negotiation: set Len to the number of bytes sent, normally
// [SizeofParams], and CtrlCmd.Len to at least Len. The kernel requires
// 0 < Len <= CtrlCmd.Len, then silently clamps Len to its own
// sizeof(struct ublk_params) (112 on 6.12, [SizeofParams612]) and, for
// SET_PARAMS, masks Types to the blocks it knows. Sending the 136-byte
// struct to a 6.12 kernel is therefore safe: the DMA and segment blocks are
// ignored, and so are their type bits. GET_PARAMS copies back at most the
// kernel's size and rewrites Len and Types accordingly.
type Params struct {
	_ structs.HostLayout
	// Len (len, @0): total bytes passed; set it for GET_PARAMS too.
	Len uint32
	// Types (types, @4): UBLK_PARAM_TYPE_* bits of the valid blocks.
	Types uint32
	// Basic (basic, @8).
	Basic ParamBasic
	// Discard (discard, @40).
	Discard ParamDiscard
	// Devt (devt, @60, 6.2).
	Devt ParamDevt
	// Zoned (zoned, @76, 6.6).
	Zoned ParamZoned
	// DMA (dma, @108, 6.15~).
	DMA ParamDMAAlign
	_   [4]byte // padding inserted by C before the 8-byte-aligned seg, @116
	// Seg (seg, @120, 6.15~).
	Seg ParamSegment
}
