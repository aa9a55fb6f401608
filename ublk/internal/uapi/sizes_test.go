package uapi

import (
	"reflect"
	"testing"
	"unsafe"
)

// The expected values below are the literal numbers of docs/ublk-uapi.md (the
// repository's docs/; §2.1, §2.2, §2.4, §3, §4, §7.1, §7.2), which were
// checked with gcc against the real ublk_cmd.h. Do not derive them from the
// code under test.

func TestSizes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"ublksrv_ctrl_cmd", unsafe.Sizeof(CtrlCmd{}), 32},
		{"ublksrv_ctrl_dev_info", unsafe.Sizeof(CtrlDevInfo{}), 64},
		{"ublksrv_io_desc", unsafe.Sizeof(IODesc{}), 24},
		{"ublksrv_io_cmd", unsafe.Sizeof(IOCmd{}), 16},
		{"ublk_param_basic", unsafe.Sizeof(ParamBasic{}), 32},
		{"ublk_param_discard", unsafe.Sizeof(ParamDiscard{}), 20},
		{"ublk_param_devt", unsafe.Sizeof(ParamDevt{}), 16},
		{"ublk_param_zoned", unsafe.Sizeof(ParamZoned{}), 32},
		{"ublk_param_dma_align", unsafe.Sizeof(ParamDMAAlign{}), 8},
		{"ublk_param_segment", unsafe.Sizeof(ParamSegment{}), 16},
		{"ublk_params (6.15)", unsafe.Sizeof(Params{}), 136},
		// Older layouts are prefixes of Params, plus C tail padding to the
		// struct's 8-byte alignment (basic holds u64s).
		{"ublk_params (6.6-6.14): through zoned", align8(unsafe.Offsetof(Params{}.Zoned) + unsafe.Sizeof(ParamZoned{})), 112},
		{"ublk_params (6.2-6.5): through devt", align8(unsafe.Offsetof(Params{}.Devt) + unsafe.Sizeof(ParamDevt{})), 80},
		{"ublk_params (6.0-6.1): through discard", align8(unsafe.Offsetof(Params{}.Discard) + unsafe.Sizeof(ParamDiscard{})), 64},
		{"ublk_params alignment", unsafe.Alignof(Params{}), 8},
		{"SizeofCtrlCmd", SizeofCtrlCmd, 32},
		{"SizeofCtrlDevInfo", SizeofCtrlDevInfo, 64},
		{"SizeofIODesc", SizeofIODesc, 24},
		{"SizeofIOCmd", SizeofIOCmd, 16},
		{"SizeofParamBasic", SizeofParamBasic, unsafe.Sizeof(ParamBasic{})},
		{"SizeofParamDiscard", SizeofParamDiscard, unsafe.Sizeof(ParamDiscard{})},
		{"SizeofParamDevt", SizeofParamDevt, unsafe.Sizeof(ParamDevt{})},
		{"SizeofParamZoned", SizeofParamZoned, unsafe.Sizeof(ParamZoned{})},
		{"SizeofParamDMAAlign", SizeofParamDMAAlign, unsafe.Sizeof(ParamDMAAlign{})},
		{"SizeofParamSegment", SizeofParamSegment, unsafe.Sizeof(ParamSegment{})},
		{"SizeofParams", SizeofParams, 136},
		{"SizeofParams612", SizeofParams612, 112},
		{"SizeofParams62", SizeofParams62, 80},
		{"SizeofParams60", SizeofParams60, 64},
	} {
		if tc.got != tc.want {
			t.Errorf("sizeof %s = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
}

func align8(n uintptr) uintptr { return (n + 7) &^ 7 }

func TestOffsets(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		// §2.2 struct ublksrv_ctrl_cmd
		{"ctrl_cmd.dev_id", unsafe.Offsetof(CtrlCmd{}.DevID), 0},
		{"ctrl_cmd.queue_id", unsafe.Offsetof(CtrlCmd{}.QueueID), 4},
		{"ctrl_cmd.len", unsafe.Offsetof(CtrlCmd{}.Len), 6},
		{"ctrl_cmd.addr", unsafe.Offsetof(CtrlCmd{}.Addr), 8},
		{"ctrl_cmd.data[0]", unsafe.Offsetof(CtrlCmd{}.Data), 16},
		{"ctrl_cmd.dev_path_len", unsafe.Offsetof(CtrlCmd{}.DevPathLen), 24},

		// §2.4 struct ublksrv_ctrl_dev_info
		{"dev_info.nr_hw_queues", unsafe.Offsetof(CtrlDevInfo{}.NrHWQueues), 0},
		{"dev_info.queue_depth", unsafe.Offsetof(CtrlDevInfo{}.QueueDepth), 2},
		{"dev_info.state", unsafe.Offsetof(CtrlDevInfo{}.State), 4},
		{"dev_info.max_io_buf_bytes", unsafe.Offsetof(CtrlDevInfo{}.MaxIOBufBytes), 8},
		{"dev_info.dev_id", unsafe.Offsetof(CtrlDevInfo{}.DevID), 12},
		{"dev_info.ublksrv_pid", unsafe.Offsetof(CtrlDevInfo{}.UblksrvPID), 16},
		{"dev_info.flags", unsafe.Offsetof(CtrlDevInfo{}.Flags), 24},
		{"dev_info.ublksrv_flags", unsafe.Offsetof(CtrlDevInfo{}.UblksrvFlags), 32},
		{"dev_info.owner_uid", unsafe.Offsetof(CtrlDevInfo{}.OwnerUID), 40},
		{"dev_info.owner_gid", unsafe.Offsetof(CtrlDevInfo{}.OwnerGID), 44},

		// §3 struct ublk_params
		{"params.len", unsafe.Offsetof(Params{}.Len), 0},
		{"params.types", unsafe.Offsetof(Params{}.Types), 4},
		{"params.basic", unsafe.Offsetof(Params{}.Basic), 8},
		{"params.discard", unsafe.Offsetof(Params{}.Discard), 40},
		{"params.devt", unsafe.Offsetof(Params{}.Devt), 60},
		{"params.zoned", unsafe.Offsetof(Params{}.Zoned), 76},
		{"params.dma", unsafe.Offsetof(Params{}.DMA), 108},
		{"params.seg", unsafe.Offsetof(Params{}.Seg), 120},

		// §3 basic
		{"basic.attrs", unsafe.Offsetof(ParamBasic{}.Attrs), 0},
		{"basic.logical_bs_shift", unsafe.Offsetof(ParamBasic{}.LogicalBSShift), 4},
		{"basic.physical_bs_shift", unsafe.Offsetof(ParamBasic{}.PhysicalBSShift), 5},
		{"basic.io_opt_shift", unsafe.Offsetof(ParamBasic{}.IOOptShift), 6},
		{"basic.io_min_shift", unsafe.Offsetof(ParamBasic{}.IOMinShift), 7},
		{"basic.max_sectors", unsafe.Offsetof(ParamBasic{}.MaxSectors), 8},
		{"basic.chunk_sectors", unsafe.Offsetof(ParamBasic{}.ChunkSectors), 12},
		{"basic.dev_sectors", unsafe.Offsetof(ParamBasic{}.DevSectors), 16},
		{"basic.virt_boundary_mask", unsafe.Offsetof(ParamBasic{}.VirtBoundaryMask), 24},

		// §3 discard
		{"discard.discard_alignment", unsafe.Offsetof(ParamDiscard{}.DiscardAlignment), 0},
		{"discard.discard_granularity", unsafe.Offsetof(ParamDiscard{}.DiscardGranularity), 4},
		{"discard.max_discard_sectors", unsafe.Offsetof(ParamDiscard{}.MaxDiscardSectors), 8},
		{"discard.max_write_zeroes_sectors", unsafe.Offsetof(ParamDiscard{}.MaxWriteZeroesSectors), 12},
		{"discard.max_discard_segments", unsafe.Offsetof(ParamDiscard{}.MaxDiscardSegments), 16},

		// §3 devt
		{"devt.char_major", unsafe.Offsetof(ParamDevt{}.CharMajor), 0},
		{"devt.char_minor", unsafe.Offsetof(ParamDevt{}.CharMinor), 4},
		{"devt.disk_major", unsafe.Offsetof(ParamDevt{}.DiskMajor), 8},
		{"devt.disk_minor", unsafe.Offsetof(ParamDevt{}.DiskMinor), 12},

		// §3 zoned
		{"zoned.max_open_zones", unsafe.Offsetof(ParamZoned{}.MaxOpenZones), 0},
		{"zoned.max_active_zones", unsafe.Offsetof(ParamZoned{}.MaxActiveZones), 4},
		{"zoned.max_zone_append_sectors", unsafe.Offsetof(ParamZoned{}.MaxZoneAppendSectors), 8},

		// §3 dma
		{"dma.alignment", unsafe.Offsetof(ParamDMAAlign{}.Alignment), 0},

		// §3 seg
		{"seg.seg_boundary_mask", unsafe.Offsetof(ParamSegment{}.SegBoundaryMask), 0},
		{"seg.max_segment_size", unsafe.Offsetof(ParamSegment{}.MaxSegmentSize), 8},
		{"seg.max_segments", unsafe.Offsetof(ParamSegment{}.MaxSegments), 12},

		// §4 struct ublksrv_io_desc
		{"io_desc.op_flags", unsafe.Offsetof(IODesc{}.OpFlags), 0},
		{"io_desc.nr_sectors", unsafe.Offsetof(IODesc{}.NrSectors), 4},
		{"io_desc.start_sector", unsafe.Offsetof(IODesc{}.StartSector), 8},
		{"io_desc.addr", unsafe.Offsetof(IODesc{}.Addr), 16},

		// §7.1 struct ublksrv_io_cmd
		{"io_cmd.q_id", unsafe.Offsetof(IOCmd{}.QID), 0},
		{"io_cmd.tag", unsafe.Offsetof(IOCmd{}.Tag), 2},
		{"io_cmd.result", unsafe.Offsetof(IOCmd{}.Result), 4},
		{"io_cmd.addr", unsafe.Offsetof(IOCmd{}.Addr), 8},
	} {
		if tc.got != tc.want {
			t.Errorf("offsetof %s = %d, want %d", tc.name, tc.got, tc.want)
		}
	}
}

// TestExplicitPadding checks that every struct spells out all of its
// padding: each field, blank ones included, starts where the previous one
// ended, the last one ends at the struct's size, and the first field is
// structs.HostLayout.
func TestExplicitPadding(t *testing.T) {
	for _, v := range []any{
		CtrlCmd{}, CtrlDevInfo{}, IODesc{}, IOCmd{}, Params{},
		ParamBasic{}, ParamDiscard{}, ParamDevt{}, ParamZoned{}, ParamDMAAlign{}, ParamSegment{},
	} {
		typ := reflect.TypeOf(v)
		if typ.NumField() == 0 || typ.Field(0).Type.String() != "structs.HostLayout" {
			t.Errorf("%s: first field is not structs.HostLayout", typ.Name())
		}
		var end uintptr
		for i := range typ.NumField() {
			f := typ.Field(i)
			if f.Offset != end {
				t.Errorf("%s.%s (field %d) at offset %d, previous field ends at %d: implicit padding",
					typ.Name(), f.Name, i, f.Offset, end)
			}
			end = f.Offset + f.Type.Size()
		}
		if end != typ.Size() {
			t.Errorf("%s: fields end at %d, size is %d: implicit tail padding", typ.Name(), end, typ.Size())
		}
	}
}

func TestOpcodeValues(t *testing.T) {
	for _, tc := range []struct {
		name string
		got  CmdOp
		want uint32
	}{
		// §2.1, legacy
		{"UBLK_CMD_GET_QUEUE_AFFINITY", CmdGetQueueAffinity, 0x01},
		{"UBLK_CMD_GET_DEV_INFO", CmdGetDevInfo, 0x02},
		{"UBLK_CMD_ADD_DEV", CmdAddDev, 0x04},
		{"UBLK_CMD_DEL_DEV", CmdDelDev, 0x05},
		{"UBLK_CMD_START_DEV", CmdStartDev, 0x06},
		{"UBLK_CMD_STOP_DEV", CmdStopDev, 0x07},
		{"UBLK_CMD_SET_PARAMS", CmdSetParams, 0x08},
		{"UBLK_CMD_GET_PARAMS", CmdGetParams, 0x09},
		{"UBLK_CMD_START_USER_RECOVERY", CmdStartUserRecovery, 0x10},
		{"UBLK_CMD_END_USER_RECOVERY", CmdEndUserRecovery, 0x11},
		{"UBLK_CMD_GET_DEV_INFO2", CmdGetDevInfo2, 0x12},

		// §2.1, encoded
		{"UBLK_U_CMD_GET_QUEUE_AFFINITY", UCmdGetQueueAffinity, 0x80207501},
		{"UBLK_U_CMD_GET_DEV_INFO", UCmdGetDevInfo, 0x80207502},
		{"UBLK_U_CMD_ADD_DEV", UCmdAddDev, 0xC0207504},
		{"UBLK_U_CMD_DEL_DEV", UCmdDelDev, 0xC0207505},
		{"UBLK_U_CMD_START_DEV", UCmdStartDev, 0xC0207506},
		{"UBLK_U_CMD_STOP_DEV", UCmdStopDev, 0xC0207507},
		{"UBLK_U_CMD_SET_PARAMS", UCmdSetParams, 0xC0207508},
		{"UBLK_U_CMD_GET_PARAMS", UCmdGetParams, 0x80207509},
		{"UBLK_U_CMD_START_USER_RECOVERY", UCmdStartUserRecovery, 0xC0207510},
		{"UBLK_U_CMD_END_USER_RECOVERY", UCmdEndUserRecovery, 0xC0207511},
		{"UBLK_U_CMD_GET_DEV_INFO2", UCmdGetDevInfo2, 0x80207512},
		{"UBLK_U_CMD_GET_FEATURES", UCmdGetFeatures, 0x80207513},
		{"UBLK_U_CMD_DEL_DEV_ASYNC", UCmdDelDevAsync, 0x80207514},
		{"UBLK_U_CMD_UPDATE_SIZE", UCmdUpdateSize, 0xC0207515},
		{"UBLK_U_CMD_QUIESCE_DEV", UCmdQuiesceDev, 0xC0207516},
		{"UBLK_U_CMD_TRY_STOP_DEV", UCmdTryStopDev, 0xC0207517},
		{"UBLK_U_CMD_REG_BUF", UCmdRegBuf, 0xC0207518},
		{"UBLK_U_CMD_UNREG_BUF", UCmdUnregBuf, 0xC0207519},

		// §7.2, legacy and encoded
		{"UBLK_IO_FETCH_REQ", IOFetchReq, 0x20},
		{"UBLK_IO_COMMIT_AND_FETCH_REQ", IOCommitAndFetchReq, 0x21},
		{"UBLK_IO_NEED_GET_DATA", IONeedGetData, 0x22},
		{"UBLK_U_IO_FETCH_REQ", UIOFetchReq, 0xC0107520},
		{"UBLK_U_IO_COMMIT_AND_FETCH_REQ", UIOCommitAndFetchReq, 0xC0107521},
		{"UBLK_U_IO_NEED_GET_DATA", UIONeedGetData, 0xC0107522},
		{"UBLK_U_IO_REGISTER_IO_BUF", UIORegisterIOBuf, 0xC0107523},
		{"UBLK_U_IO_UNREGISTER_IO_BUF", UIOUnregisterIOBuf, 0xC0107524},
		{"UBLK_U_IO_PREP_IO_CMDS", UIOPrepIOCmds, 0xC0107525},
		{"UBLK_U_IO_COMMIT_IO_CMDS", UIOCommitIOCmds, 0xC0107526},
		{"UBLK_U_IO_FETCH_IO_CMDS", UIOFetchIOCmds, 0xC0107527},
	} {
		if uint32(tc.got) != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, uint32(tc.got), tc.want)
		}
		if got := tc.got.String(); got != tc.name {
			t.Errorf("CmdOp(%#x).String() = %q, want %q", tc.want, got, tc.name)
		}
	}
}

// TestIOCHelpers checks the exported _IOR/_IOWR helpers against the
// constants (which are computed by separate constant expressions) and
// against the literal values.
func TestIOCHelpers(t *testing.T) {
	ctrl, io := unsafe.Sizeof(CtrlCmd{}), unsafe.Sizeof(IOCmd{})
	for _, tc := range []struct {
		name     string
		got, con CmdOp
		want     uint32
	}{
		{"_IOR GET_FEATURES", IOR(0x13, ctrl), UCmdGetFeatures, 0x80207513},
		{"_IOR GET_DEV_INFO", IOR(uint8(CmdGetDevInfo), ctrl), UCmdGetDevInfo, 0x80207502},
		{"_IOWR ADD_DEV", IOWR(uint8(CmdAddDev), ctrl), UCmdAddDev, 0xC0207504},
		{"_IOWR FETCH_REQ", IOWR(uint8(IOFetchReq), io), UIOFetchReq, 0xC0107520},
		{"_IOWR COMMIT_AND_FETCH_REQ", IOWR(uint8(IOCommitAndFetchReq), io), UIOCommitAndFetchReq, 0xC0107521},
	} {
		if uint32(tc.got) != tc.want || tc.con != tc.got {
			t.Errorf("%s = %#x (constant %#x), want %#x", tc.name, uint32(tc.got), uint32(tc.con), tc.want)
		}
	}
}
