// Package uapi mirrors the ublk kernel ABI, include/uapi/linux/ublk_cmd.h,
// in pure Go: command numbers, feature and I/O flags, device states, the
// structures exchanged with the driver, and the offsets used to address the
// descriptor mmap and the USER_COPY window of /dev/ublkcN.
//
// # Kernel versions
//
// The baseline is the header of Linux 6.12 (the Debian 6.12.117 source, the
// kernel the project's VM tests boot). Later additions are included and each
// one is marked with the release that introduced it, for example "(6.15)";
// a "~" after a version means it was inferred, not read in that release's
// tree. docs/ublk-uapi.md, in the repository, describes the interface
// with the version of each part (§§1-9) and lists the inferred ones (§14).
// Names introduced after 6.12 are only useful after a GET_FEATURES probe or a
// look at the flags ADD_DEV negotiated; never infer them from uname.
//
// Deliberately not mirrored (yet): struct ublk_param_integrity and the 7.0
// Params tail (Params stops at the 6.15 layout, 136 bytes), struct
// ublk_batch_io and struct ublk_elem_header (BATCH_IO, 7.0), and struct
// ublk_shmem_buf_reg (7.1, layout not settled). struct blk_zone, which
// REPORT_ZONES replies with, belongs to linux/blkzoned.h, not to this header.
//
// # Naming
//
// Every name is the C name with its UBLK_ prefix dropped and the rest
// converted to Go's CamelCase; the UBLKSRV_ prefix becomes Srv. So
// UBLK_U_CMD_ADD_DEV is [UCmdAddDev], UBLK_CMD_ADD_DEV (the legacy number) is
// [CmdAddDev], UBLK_IO_FETCH_REQ is [IOFetchReq], UBLK_F_USER_COPY is
// [FUserCopy], UBLK_IO_F_FUA is [IOFFUA] and UBLKSRV_IO_BUF_OFFSET is
// [SrvIOBufOffset]. Each declaration's comment repeats its C name so that
// grepping for the kernel spelling finds it. Structs are named after the C
// struct without the ublk/ublksrv prefix (struct ublksrv_ctrl_cmd is
// [CtrlCmd]).
//
// # Layout and targets
//
// Structs start with a structs.HostLayout field and spell out every padding
// byte the C compiler inserts, so their Go layout is the C layout; the
// offsets in the field comments are those of docs/ublk-uapi.md, checked
// with gcc against the real header, and sizes_test.go pins every one of them.
// The ioctl-style opcodes use the asm-generic _IOC encoding. The package is
// verified for linux/amd64 and linux/arm64 (64-bit, little-endian); powerpc,
// mips, sparc and alpha encode _IOC differently and are not supported.
//
// # Why there is no generator
//
// cgo -godefs would need the 6.12 (or newer) header on the build host, which
// the development machines do not have (their linux-libc-dev ships 6.1), and
// it cannot evaluate the _IOR/_IOWR macros into constants anyway. The header
// is small and append-only, so the declarations here are written by hand
// from it and kept honest by sizes_test.go, which checks every struct size,
// every field offset and every encoded opcode against the literal values of
// docs/ublk-uapi.md. To add a kernel addition: copy its C definition into
// the matching file with the version it appeared in, describe it in
// docs/ublk-uapi.md, then extend sizes_test.go.
//
// The package knows nothing about io_uring or devices: ublk builds on it, and
// nothing outside ublk should import it.
package uapi
