package uapi

import (
	"bytes"
	"os"
	"testing"
	"unsafe"
)

// Section numbers (§n) below are those of docs/ublk-uapi.md.

// image returns the in-memory bytes of *p, the way the C side sees a struct.
func image[T any](p *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(p)), unsafe.Sizeof(*p))
}

func TestConstants(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want int64
	}{
		// §5
		{"UBLK_IO_RES_OK", int64(IOResOK), 0},
		{"UBLK_IO_RES_NEED_GET_DATA", int64(IOResNeedGetData), 1},
		{"UBLK_IO_RES_ABORT", int64(IOResAbort), -19},
		{"UBLKSRV_CMD_BUF_OFFSET", SrvCmdBufOffset, 0},
		{"UBLKSRV_IO_BUF_OFFSET", SrvIOBufOffset, 0x80000000},
		{"UBLK_MAX_QUEUE_DEPTH", MaxQueueDepth, 4096},
		{"UBLK_IO_BUF_OFF", IOBufOff, 0},
		{"UBLK_IO_BUF_BITS", IOBufBits, 25},
		{"UBLK_IO_BUF_BITS_MASK", IOBufBitsMask, 32<<20 - 1},
		{"UBLK_TAG_OFF", TagOff, 25},
		{"UBLK_TAG_BITS", TagBits, 16},
		{"UBLK_TAG_BITS_MASK", TagBitsMask, 0xFFFF},
		{"UBLK_QID_OFF", QIDOff, 41},
		{"UBLK_QID_BITS", QIDBits, 12},
		{"UBLK_QID_BITS_MASK", QIDBitsMask, 0xFFF},
		{"UBLK_MAX_NR_QUEUES", MaxNrQueues, 4096},
		{"UBLKSRV_IO_BUF_TOTAL_BITS", SrvIOBufTotalBits, 53},
		{"UBLKSRV_IO_BUF_TOTAL_SIZE", SrvIOBufTotalSize, 1 << 53},
		{"UBLK_INTEGRITY_FLAG_OFF", IntegrityFlagOff, 62},
		{"UBLKSRV_IO_INTEGRITY_FLAG", SrvIOIntegrityFlag, 1 << 62},
		{"UBLK_FEATURES_LEN", FeaturesLen, 8},
		{"UBLK_MIN_SEGMENT_SIZE", MinSegmentSize, 4096},
		{"UBLK_AUTO_BUF_REG_FALLBACK", AutoBufRegFallback, 1},

		// §2.4 states
		{"UBLK_S_DEV_DEAD", int64(SDevDead), 0},
		{"UBLK_S_DEV_LIVE", int64(SDevLive), 1},
		{"UBLK_S_DEV_QUIESCED", int64(SDevQuiesced), 2},
		{"UBLK_S_DEV_FAIL_IO", int64(SDevFailIO), 3},

		// §3 attributes and parameter types
		{"UBLK_ATTR_READ_ONLY", int64(AttrReadOnly), 1},
		{"UBLK_ATTR_ROTATIONAL", int64(AttrRotational), 2},
		{"UBLK_ATTR_VOLATILE_CACHE", int64(AttrVolatileCache), 4},
		{"UBLK_ATTR_FUA", int64(AttrFUA), 8},
		{"UBLK_PARAM_TYPE_BASIC", int64(ParamTypeBasic), 1 << 0},
		{"UBLK_PARAM_TYPE_DISCARD", int64(ParamTypeDiscard), 1 << 1},
		{"UBLK_PARAM_TYPE_DEVT", int64(ParamTypeDevt), 1 << 2},
		{"UBLK_PARAM_TYPE_ZONED", int64(ParamTypeZoned), 1 << 3},
		{"UBLK_PARAM_TYPE_DMA_ALIGN", int64(ParamTypeDMAAlign), 1 << 4},
		{"UBLK_PARAM_TYPE_SEGMENT", int64(ParamTypeSegment), 1 << 5},
		{"UBLK_PARAM_TYPE_INTEGRITY", int64(ParamTypeIntegrity), 1 << 6},

		// §4 ops
		{"UBLK_IO_OP_READ", int64(IOOpRead), 0},
		{"UBLK_IO_OP_WRITE", int64(IOOpWrite), 1},
		{"UBLK_IO_OP_FLUSH", int64(IOOpFlush), 2},
		{"UBLK_IO_OP_DISCARD", int64(IOOpDiscard), 3},
		{"UBLK_IO_OP_WRITE_SAME", int64(IOOpWriteSame), 4},
		{"UBLK_IO_OP_WRITE_ZEROES", int64(IOOpWriteZeroes), 5},
		{"UBLK_IO_OP_ZONE_OPEN", int64(IOOpZoneOpen), 10},
		{"UBLK_IO_OP_ZONE_CLOSE", int64(IOOpZoneClose), 11},
		{"UBLK_IO_OP_ZONE_FINISH", int64(IOOpZoneFinish), 12},
		{"UBLK_IO_OP_ZONE_APPEND", int64(IOOpZoneAppend), 13},
		{"UBLK_IO_OP_ZONE_RESET_ALL", int64(IOOpZoneResetAll), 14},
		{"UBLK_IO_OP_ZONE_RESET", int64(IOOpZoneReset), 15},
		{"UBLK_IO_OP_REPORT_ZONES", int64(IOOpReportZones), 18},

		// §4 flags
		{"UBLK_IO_F_FAILFAST_DEV", int64(IOFFailfastDev), 1 << 8},
		{"UBLK_IO_F_FAILFAST_TRANSPORT", int64(IOFFailfastTransport), 1 << 9},
		{"UBLK_IO_F_FAILFAST_DRIVER", int64(IOFFailfastDriver), 1 << 10},
		{"UBLK_IO_F_META", int64(IOFMeta), 1 << 11},
		{"UBLK_IO_F_FUA", int64(IOFFUA), 1 << 13},
		{"UBLK_IO_F_NOUNMAP", int64(IOFNoUnmap), 1 << 15},
		{"UBLK_IO_F_SWAP", int64(IOFSwap), 1 << 16},
		{"UBLK_IO_F_NEED_REG_BUF", int64(IOFNeedRegBuf), 1 << 17},
		{"UBLK_IO_F_INTEGRITY", int64(IOFIntegrity), 1 << 18},
		{"UBLK_IO_F_SHMEM_ZC", int64(IOFShmemZC), 1 << 19},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

// TestFeatureBits pins every UBLK_F_* bit (§6) and its String name.
func TestFeatureBits(t *testing.T) {
	for i, tc := range []struct {
		f    Features
		name string
	}{
		{FSupportZeroCopy, "SUPPORT_ZERO_COPY"},
		{FURingCmdCompInTask, "URING_CMD_COMP_IN_TASK"},
		{FNeedGetData, "NEED_GET_DATA"},
		{FUserRecovery, "USER_RECOVERY"},
		{FUserRecoveryReissue, "USER_RECOVERY_REISSUE"},
		{FUnprivilegedDev, "UNPRIVILEGED_DEV"},
		{FCmdIoctlEncode, "CMD_IOCTL_ENCODE"},
		{FUserCopy, "USER_COPY"},
		{FZoned, "ZONED"},
		{FUserRecoveryFailIO, "USER_RECOVERY_FAIL_IO"},
		{FUpdateSize, "UPDATE_SIZE"},
		{FAutoBufReg, "AUTO_BUF_REG"},
		{FQuiesce, "QUIESCE"},
		{FPerIODaemon, "PER_IO_DAEMON"},
		{FBufRegOffDaemon, "BUF_REG_OFF_DAEMON"},
		{FBatchIO, "BATCH_IO"},
		{FIntegrity, "INTEGRITY"},
		{FSafeStopDev, "SAFE_STOP_DEV"},
		{FNoAutoPartScan, "NO_AUTO_PART_SCAN"},
		{FShmemZC, "SHMEM_ZC"},
	} {
		if tc.f != 1<<i {
			t.Errorf("UBLK_F_%s = %#x, want bit %d", tc.name, uint64(tc.f), i)
		}
		if got := tc.f.String(); got != tc.name {
			t.Errorf("Features(%#x).String() = %q, want %q", uint64(tc.f), got, tc.name)
		}
	}
}

func TestStrings(t *testing.T) {
	for _, tc := range []struct {
		got, want string
	}{
		{Features(0).String(), "0"},
		// What GET_FEATURES returns on Debian's 6.12 (§6).
		{Features(0x1FE).String(), "URING_CMD_COMP_IN_TASK|NEED_GET_DATA|USER_RECOVERY|USER_RECOVERY_REISSUE|" +
			"UNPRIVILEGED_DEV|CMD_IOCTL_ENCODE|USER_COPY|ZONED"},
		{(FUserCopy | 1<<40 | 1<<63).String(), "USER_COPY|0x8000010000000000"},
		{Features(1 << 20).String(), "0x100000"},
		{SDevLive.String(), "LIVE"},
		{SDevFailIO.String(), "FAIL_IO"},
		{DevState(9).String(), "DevState(9)"},
		{IOOpWriteZeroes.String(), "WRITE_ZEROES"},
		{IOOpReportZones.String(), "REPORT_ZONES"},
		{IOOp(7).String(), "IOOp(7)"},
		{(IOFFUA | IOFNoUnmap).String(), "FUA|NOUNMAP"},
		{IOFlags(1 << 12).String(), "0x1000"},
		{IOFlags(0).String(), "0"},
		{CmdAddDev.String(), "UBLK_CMD_ADD_DEV"},
		{UCmdAddDev.String(), "UBLK_U_CMD_ADD_DEV"},
		{CmdOp(0x13).String(), "CmdOp(0x13)"}, // GET_FEATURES has no legacy form
		{CmdOp(0x03).String(), "CmdOp(0x3)"},
		{CmdOp(0xC0207503).String(), "CmdOp(0xc0207503)"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestCmdOpForms(t *testing.T) {
	if !UCmdAddDev.Encoded() || CmdAddDev.Encoded() {
		t.Error("Encoded: wrong form detection")
	}
	if UCmdAddDev.Legacy() != CmdAddDev || UIOCommitAndFetchReq.Legacy() != IOCommitAndFetchReq {
		t.Errorf("Legacy: got %v, %v", UCmdAddDev.Legacy(), UIOCommitAndFetchReq.Legacy())
	}
	if UCmdGetFeatures.NR() != 0x13 {
		t.Errorf("NR(GET_FEATURES) = %#x", UCmdGetFeatures.NR())
	}
}

func TestCtrlCmdEncode(t *testing.T) {
	c := CtrlCmd{DevID: 0x01020304, QueueID: 0xFFFF, Len: 64, Addr: 0x1122334455667788, Data: 4242, DevPathLen: 12}
	b := bytes.Repeat([]byte{0xAA}, 80) // an SQE128 cmd area with stale bytes
	c.Encode(b)
	if !bytes.Equal(b[:SizeofCtrlCmd], image(&c)) {
		t.Errorf("Encode = %x, struct image %x", b[:SizeofCtrlCmd], image(&c))
	}
	if !bytes.Equal(b[24:32], []byte{12, 0, 0, 0, 0, 0, 0, 0}) {
		t.Errorf("dev_path_len/pad/reserved = %x, want 0c00 0000 00000000", b[24:32])
	}
	if !bytes.Equal(b[SizeofCtrlCmd:], bytes.Repeat([]byte{0xAA}, 80-SizeofCtrlCmd)) {
		t.Error("Encode wrote past 32 bytes")
	}
	// Field positions against §2.2 directly (little-endian host).
	if b[0] != 0x04 || b[4] != 0xFF || b[6] != 64 || b[8] != 0x88 || b[16] != 4242&0xFF {
		t.Errorf("Encode layout: %x", b[:32])
	}
	defer func() {
		if recover() == nil {
			t.Error("Encode into 31 bytes did not panic")
		}
	}()
	c.Encode(make([]byte, SizeofCtrlCmd-1))
}

func TestIOCmdEncode(t *testing.T) {
	c := IOCmd{QID: 3, Tag: 0x1234, Result: -5, Addr: 0xDEADBEEF00}
	b := bytes.Repeat([]byte{0xAA}, 16)
	c.Encode(b)
	if !bytes.Equal(b, image(&c)) {
		t.Errorf("Encode = %x, struct image %x", b, image(&c))
	}
	if b[0] != 3 || b[2] != 0x34 || b[3] != 0x12 || b[4] != 0xFB || b[7] != 0xFF || b[9] != 0xEF {
		t.Errorf("Encode layout: %x", b)
	}
	if n := testing.AllocsPerRun(100, func() { c.Encode(b) }); n != 0 {
		t.Errorf("IOCmd.Encode allocates %v times", n)
	}
}

func TestDescArea(t *testing.T) {
	const depth = 5
	// A []uint64 backing gives the 8-byte alignment the mmap guarantees.
	backing := make([]uint64, DescAreaLen(depth, 4096)/8)
	area := DescArea(unsafe.Slice((*byte)(unsafe.Pointer(&backing[0])), len(backing)*8))
	want := IODesc{
		OpFlags:     uint32(IOOpWriteZeroes) | uint32(IOFNoUnmap|IOFFUA),
		NrSectors:   16,
		StartSector: 1 << 40,
		Addr:        0x7f0000001000,
	}
	copy(area[3*SizeofIODesc:], image(&want))

	got := area.At(3)
	if got != want {
		t.Fatalf("At(3) = %+v, want %+v", got, want)
	}
	if got.Op() != IOOpWriteZeroes || got.Flags() != IOFNoUnmap|IOFFUA {
		t.Errorf("Op/Flags = %v/%v", got.Op(), got.Flags())
	}
	if got.Flags()&IOFFUA == 0 {
		t.Error("FUA not testable in place")
	}
	if (area.At(4) != IODesc{}) {
		t.Error("At(4) not zero")
	}
	if n := testing.AllocsPerRun(100, func() { _ = area.At(2) }); n != 0 {
		t.Errorf("At allocates %v times", n)
	}
	defer func() {
		if recover() == nil {
			t.Error("At past the area did not panic")
		}
	}()
	_ = area[:depth*SizeofIODesc+SizeofIODesc-1].At(depth) // one byte short of tag depth's descriptor
}

func TestUserCopyOffset(t *testing.T) {
	for _, tc := range []struct {
		qid, tag uint16
		off      uint32
		want     int64
	}{
		{0, 0, 0, 0x80000000},
		{0, 0, 4096, 0x80000000 + 4096},
		{0, 1, 0, 0x80000000 + 1<<25},
		{1, 0, 0, 0x80000000 + 1<<41},
		{2, 7, 512, 0x80000000 + 2<<41 + 7<<25 + 512},
		{MaxNrQueues - 1, 0xFFFF, 1<<25 - 1, 0x80000000 + 1<<53 - 1},
	} {
		if got := UserCopyOffset(tc.qid, tc.tag, tc.off); got != tc.want {
			t.Errorf("UserCopyOffset(%d, %d, %d) = %#x, want %#x", tc.qid, tc.tag, tc.off, got, tc.want)
		}
	}
}

func TestDescAreaGeometry(t *testing.T) {
	// §4: stride is round_up(4096*24, PAGE_SIZE) = 98304 with 4 KiB pages.
	for _, tc := range []struct {
		qid      uint16
		pageSize int
		want     int64
	}{
		{0, 4096, 0},
		{1, 4096, 98304},
		{3, 4096, 3 * 98304},
		{1, 16384, 98304},
		{1, 65536, 131072},
	} {
		if got := descAreaOffset(tc.qid, tc.pageSize); got != tc.want {
			t.Errorf("descAreaOffset(%d, %d) = %d, want %d", tc.qid, tc.pageSize, got, tc.want)
		}
	}
	if got, want := DescAreaOffset(2), descAreaOffset(2, os.Getpagesize()); got != want {
		t.Errorf("DescAreaOffset(2) = %d, want %d", got, want)
	}
	for _, tc := range []struct {
		depth    uint16
		pageSize int
		want     int
	}{
		{1, 4096, 4096},
		{128, 4096, 4096}, // 3072
		{171, 4096, 8192}, // 4104
		{4096, 4096, 98304},
		{128, 65536, 65536},
	} {
		if got := DescAreaLen(tc.depth, tc.pageSize); got != tc.want {
			t.Errorf("DescAreaLen(%d, %d) = %d, want %d", tc.depth, tc.pageSize, got, tc.want)
		}
	}
}

func TestAutoBufRegAddr(t *testing.T) {
	if got := AutoBufRegAddr(0x1234, AutoBufRegFallback); got != 0x011234 {
		t.Errorf("AutoBufRegAddr = %#x, want 0x11234", got)
	}
}

func TestFeaturesHas(t *testing.T) {
	f := FUserCopy | FUserRecovery
	if !f.Has(FUserCopy) || !f.Has(FUserCopy|FUserRecovery) || f.Has(FUserCopy|FZoned) {
		t.Error("Has")
	}
}

func BenchmarkDescAreaAt(b *testing.B) {
	backing := make([]uint64, 4096*SizeofIODesc/8)
	area := DescArea(unsafe.Slice((*byte)(unsafe.Pointer(&backing[0])), len(backing)*8))
	var sink uint64
	for i := 0; b.Loop(); i++ {
		d := area.At(uint16(i & 4095))
		sink += d.StartSector
	}
	_ = sink
}

func BenchmarkIOCmdEncode(b *testing.B) {
	var cmd [16]byte
	for i := 0; b.Loop(); i++ {
		IOCmd{QID: 1, Tag: uint16(i), Result: 4096}.Encode(cmd[:])
	}
}
