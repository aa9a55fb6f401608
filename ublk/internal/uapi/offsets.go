package uapi

import "os"

// Offsets and limits, ublk_cmd.h. The bit-layout names (IO_BUF, TAG, QID)
// appear in the 6.4+ header; the values hold for every version.
const (
	// SrvCmdBufOffset is UBLKSRV_CMD_BUF_OFFSET: mmap offset of queue 0's
	// descriptor area on /dev/ublkcN. See [DescAreaOffset].
	SrvCmdBufOffset = 0
	// SrvIOBufOffset is UBLKSRV_IO_BUF_OFFSET: start of the USER_COPY
	// window on /dev/ublkcN. See [UserCopyOffset].
	SrvIOBufOffset = 0x80000000

	// MaxQueueDepth is UBLK_MAX_QUEUE_DEPTH, the largest queue_depth.
	MaxQueueDepth = 4096

	// IOBufOff is UBLK_IO_BUF_OFF, the bit where the byte offset inside a
	// request starts in a USER_COPY position.
	IOBufOff = 0
	// IOBufBits is UBLK_IO_BUF_BITS: a request's data is addressed with 25
	// bits, so at most 32 MiB per request.
	IOBufBits = 25
	// IOBufBitsMask is UBLK_IO_BUF_BITS_MASK.
	IOBufBitsMask = 1<<IOBufBits - 1

	// TagOff is UBLK_TAG_OFF, the bit where the tag starts in a USER_COPY
	// position.
	TagOff = IOBufBits
	// TagBits is UBLK_TAG_BITS.
	TagBits = 16
	// TagBitsMask is UBLK_TAG_BITS_MASK.
	TagBitsMask = 1<<TagBits - 1

	// QIDOff is UBLK_QID_OFF, the bit where the queue id starts in a
	// USER_COPY position.
	QIDOff = TagOff + TagBits
	// QIDBits is UBLK_QID_BITS.
	QIDBits = 12
	// QIDBitsMask is UBLK_QID_BITS_MASK.
	QIDBitsMask = 1<<QIDBits - 1

	// MaxNrQueues is UBLK_MAX_NR_QUEUES, the largest nr_hw_queues.
	MaxNrQueues = 1 << QIDBits

	// SrvIOBufTotalBits is UBLKSRV_IO_BUF_TOTAL_BITS.
	SrvIOBufTotalBits = QIDOff + QIDBits
	// SrvIOBufTotalSize is UBLKSRV_IO_BUF_TOTAL_SIZE, the size of the
	// USER_COPY window.
	SrvIOBufTotalSize = 1 << SrvIOBufTotalBits

	// IntegrityFlagOff is UBLK_INTEGRITY_FLAG_OFF (7.0~).
	IntegrityFlagOff = 62
	// SrvIOIntegrityFlag is UBLKSRV_IO_INTEGRITY_FLAG (7.0~): OR it into a
	// USER_COPY position to address the integrity buffer instead of data.
	SrvIOIntegrityFlag = 1 << IntegrityFlagOff

	// FeaturesLen is UBLK_FEATURES_LEN: GET_FEATURES requires CtrlCmd.Len
	// to be exactly this.
	FeaturesLen = 8

	// MinSegmentSize is UBLK_MIN_SEGMENT_SIZE (6.15~), the floor for
	// ParamSegment.MaxSegmentSize and SegBoundaryMask+1.
	MinSegmentSize = 4096
)

// Auto buffer registration (6.16~), ublk_cmd.h.
const (
	// AutoBufRegFallback is UBLK_AUTO_BUF_REG_FALLBACK: if registration
	// fails, deliver the request anyway with [IOFNeedRegBuf] set instead
	// of failing it.
	AutoBufRegFallback = 1 << 0
	// AutoBufRegFMask is UBLK_AUTO_BUF_REG_F_MASK, every defined flag.
	AutoBufRegFMask = AutoBufRegFallback
)

// AutoBufRegAddr returns the sqe->addr value for FETCH_REQ and
// COMMIT_AND_FETCH_REQ under [FAutoBufReg]: struct ublk_auto_buf_reg packed
// as ublk_auto_buf_reg_to_sqe_addr does, index in bits 0-15, flags in 16-23,
// reserved bits zero.
func AutoBufRegAddr(index uint16, flags uint8) uint64 {
	return uint64(index) | uint64(flags)<<16
}

// UserCopyOffset returns the file position on /dev/ublkcN that addresses
// byte off of the request currently assigned to (qid, tag), for pread (the
// data of a WRITE) and pwrite (the data of a READ) under [FUserCopy]:
//
//	UBLKSRV_IO_BUF_OFFSET + qid<<UBLK_QID_OFF + tag<<UBLK_TAG_OFF + off
//
// The caller guarantees qid < [MaxNrQueues] and off < 1<<[IOBufBits]
// (32 MiB, and in practice below the request's length): an out-of-range off
// would silently address the next tag. See docs/ublk-uapi.md §9.2.
func UserCopyOffset(qid, tag uint16, off uint32) int64 {
	return SrvIOBufOffset + int64(qid)<<QIDOff + int64(tag)<<TagOff + int64(off)
}

// DescAreaOffset returns the mmap offset of queue qid's descriptor area on
// /dev/ublkcN. Queues are spaced by the area size of a maximal queue,
// round_up(UBLK_MAX_QUEUE_DEPTH * 24, PAGE_SIZE) (98304 bytes with 4 KiB
// pages), whatever the device's actual depth; the kernel derives the queue
// from the offset that way (docs/ublk-uapi.md §4). It uses the running system's
// page size.
func DescAreaOffset(qid uint16) int64 {
	return descAreaOffset(qid, os.Getpagesize())
}

func descAreaOffset(qid uint16, pageSize int) int64 {
	return SrvCmdBufOffset + int64(qid)*int64(roundUp(MaxQueueDepth*SizeofIODesc, pageSize))
}

// DescAreaLen returns the length to mmap for one queue's descriptor area,
// round_up(depth * 24, pageSize). The kernel rejects any other length with
// EINVAL. Map it PROT_READ and MAP_SHARED; PROT_WRITE gets EPERM.
func DescAreaLen(depth uint16, pageSize int) int {
	return roundUp(int(depth)*SizeofIODesc, pageSize)
}

// roundUp rounds n up to a multiple of the power of two align.
func roundUp(n, align int) int {
	return (n + align - 1) &^ (align - 1)
}
