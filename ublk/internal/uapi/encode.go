package uapi

import (
	"encoding/binary"
	"unsafe"
)

// Encoding choices.
//
// Commands going to the kernel (CtrlCmd, IOCmd) are written into the SQE's
// cmd area field by field with encoding/binary's NativeEndian. The kernel
// reads that area as a C struct in host byte order, so native order is
// exactly right (and is little-endian on every supported target); it needs
// no unsafe, has no alignment requirement on the destination, compiles to a
// handful of plain stores, and writes the pad and reserved bytes explicitly
// as zero, which matters because SQE memory is recycled. The tests check the
// result byte for byte against the in-memory image of the Go struct.
//
// Descriptors coming from the kernel are read with one unsafe load from the
// mmap'd area instead: that is the per-request hot path, the area is
// page-aligned kernel memory in host order, and a struct copy is the
// cheapest possible read.

// Encode writes c into b[0:32] in the layout of struct ublksrv_ctrl_cmd,
// padding and reserved bytes zeroed. b is normally the cmd area of a
// 128-byte SQE (80 bytes); bytes after the first 32 are left untouched. It
// panics if len(b) < [SizeofCtrlCmd].
func (c CtrlCmd) Encode(b []byte) {
	_ = b[SizeofCtrlCmd-1] // one bounds check for all the stores below
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], c.DevID)
	ne.PutUint16(b[4:], c.QueueID)
	ne.PutUint16(b[6:], c.Len)
	ne.PutUint64(b[8:], c.Addr)
	ne.PutUint64(b[16:], c.Data)
	ne.PutUint16(b[24:], c.DevPathLen)
	ne.PutUint16(b[26:], 0) // pad
	ne.PutUint32(b[28:], 0) // reserved
}

// Encode writes c into b[0:16] in the layout of struct ublksrv_io_cmd. b is
// normally the 16-byte cmd area of a 64-byte SQE. It panics if len(b) <
// [SizeofIOCmd]. It does not allocate.
func (c IOCmd) Encode(b []byte) {
	_ = b[SizeofIOCmd-1]
	ne := binary.NativeEndian
	ne.PutUint16(b[0:], c.QID)
	ne.PutUint16(b[2:], c.Tag)
	ne.PutUint32(b[4:], uint32(c.Result))
	ne.PutUint64(b[8:], c.Addr)
}

// DescArea is one queue's descriptor area: the []byte returned by mmap of
// /dev/ublkcN at [DescAreaOffset] with length [DescAreaLen], holding one
// struct ublksrv_io_desc per tag (docs/ublk-uapi.md §4). It must be that mapping (or
// at least 8-byte aligned memory) and must stay mapped while in use.
type DescArea []byte

// At returns a copy of tag's descriptor, read from a[tag*24:]. Call it after
// reaping the tag's FETCH or COMMIT_AND_FETCH completion with result
// [IOResOK]; the kernel writes the descriptor before completing the command
// and does not touch it again until the tag is re-armed, so the copy stays
// valid for the whole request, and holding no pointer into the mapping means
// an munmap cannot turn a stale descriptor into a fault.
//
// It is a bounds check and a 24-byte load: no allocation, no syscall. It
// panics if the descriptor lies outside a.
func (a DescArea) At(tag uint16) IODesc {
	off := int(tag) * SizeofIODesc
	_ = a[off+SizeofIODesc-1] // the whole descriptor is inside the area
	// The mapping is page-aligned and off is a multiple of 24, hence of 8,
	// so the *IODesc is properly aligned; see the encoding note above.
	return *(*IODesc)(unsafe.Pointer(&a[off]))
}
