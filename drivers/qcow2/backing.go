package qcow2

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// ChangeBackingFile records a new backing file name and format in the
// header (QEMU's qcow2_change_backing_file, behind qemu-img rebase and
// commit): name "" removes the backing file, format "" leaves the format
// unrecorded. Only the header changes; the caller has made sure the image
// reads the same over the new backing file (rebase's safe mode) or accepts
// that it does not (-u). The node's BackingFile and BackingFormat follow;
// an open backing node is the caller's to replace.
//
// The header cluster is rebuilt from the header as on disk (Header.Marshal:
// the known extensions, the feature name table, unknown extensions in their
// order, then the name), written in one request and flushed. Errors, as
// QEMU's: EINVAL for a format without a name, a name longer than 1023 bytes,
// or a backing file on an image whose raw external data file must stay
// valid; ENOSPC when the name and extensions do not fit in the header
// cluster; EROFS on a read-only image.
func (img *Image) ChangeBackingFile(co *coroutine.Co, name, format string) error {
	if img.readOnly {
		return unix.EROFS
	}
	if format != "" && name == "" {
		return unix.EINVAL
	}
	if len(name) > MaxBackingFileSize || len(format) > MaxBackingFormatSize {
		return unix.EINVAL
	}
	if err := img.checkIO(); err != nil {
		return err
	}
	img.meta.Lock(co)
	defer img.meta.Unlock(co)

	h := img.Header()
	if name != "" && h.DataFileRaw() {
		return unix.EINVAL
	}
	h.BackingFile, h.BackingFormat = name, format
	nh, err := img.writeHeaderClusterLocked(co, &h)
	if errors.Is(err, errHeaderTooBig) {
		return unix.ENOSPC
	}
	if err != nil {
		return err
	}
	img.hdrMu.Lock()
	img.hdr.BackingFile, img.hdr.BackingFormat = nh.BackingFile, nh.BackingFormat
	img.hdr.BackingFileOffset, img.hdr.BackingFileSize = nh.BackingFileOffset, nh.BackingFileSize
	img.hdr.HeaderLength = nh.HeaderLength
	img.hdrMu.Unlock()
	img.node.BackingFile, img.node.BackingFormat = name, format
	return nil
}

// errHeaderTooBig wraps Marshal failures: the header does not fit in its
// cluster.
var errHeaderTooBig = errors.New("qcow2: header does not fit in the header cluster")

// writeHeaderClusterLocked writes h as the whole header cluster in one write,
// flushes, and returns the header as parsed back from what was written;
// adopting it is the caller's choice. Called with img.meta held.
func (img *Image) writeHeaderClusterLocked(co *coroutine.Co, h *Header) (*Header, error) {
	buf, err := h.Marshal(int(img.cs))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errHeaderTooBig, err)
	}
	// Marshal starts from zeroed memory; the driver's buffers must be
	// aligned for O_DIRECT files.
	out := bdrv.AlignedBuffer(len(buf), 4096)
	copy(out, buf)
	if err := img.file.Pwritev(co, 0, bdrv.IOVec{out}, 0); err != nil {
		return nil, err
	}
	if err := img.file.Flush(co); err != nil {
		return nil, err
	}
	return ParseHeader(out, -1)
}
