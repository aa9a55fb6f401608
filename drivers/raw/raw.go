// Package raw is the raw image format: the guest sees the bytes of the
// file, optionally a window of it (the offset and size options), as QEMU's
// raw-format driver.
package raw

import (
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

func init() {
	bdrv.Register(&bdrv.Format{
		Name: "raw",
		// Raw accepts anything, so it wins only when no other format
		// recognises the file.
		Probe:         func([]byte, string) int { return 1 },
		Open:          open,
		Create:        create,
		CreateOptions: bdrv.ProtocolCreateOptions,
		DataOnly:      true,
		StrongOptions: []string{OptOffset, OptSize},
		Measure:       measure,
	})
}

// Options understood at open.
const (
	// OptOffset is where the guest's byte 0 lies in the file.
	OptOffset = "offset"
	// OptSize limits the guest-visible size; unset means up to the end of
	// the file.
	OptSize = "size"
)

type driver struct {
	node   *bdrv.Node
	file   *bdrv.Node
	offset int64
	// fixed is set when the size option pins the length; otherwise the
	// node follows the file's length.
	fixed bool
}

func open(co *coroutine.Co, n *bdrv.Node, opts bdrv.Options) (bdrv.Driver, error) {
	offset, err := opts.Size(OptOffset, 0)
	if err != nil {
		return nil, err
	}
	flen := n.File.Length()
	if offset > flen {
		return nil, fmt.Errorf("The sum of offset (%d) and size (0) has to be smaller or equal to the actual size of the containing file (%d)", offset, flen)
	}
	d := &driver{node: n, file: n.File, offset: offset}
	size := flen - offset
	if opts.Has(OptSize) {
		if size, err = opts.Size(OptSize, 0); err != nil {
			return nil, err
		}
		if offset+size > flen {
			return nil, fmt.Errorf("The sum of offset (%d) and size (%d) has to be smaller or equal to the actual size of the containing file (%d)", offset, size, flen)
		}
		d.fixed = true
	}
	n.SetLength(size)
	return d, nil
}

// OpenOptions are raw's runtime options (QEMU's raw_runtime_opts).
func (d *driver) OpenOptions() []string { return []string{OptOffset, OptSize} }

func create(co *coroutine.Co, req *bdrv.CreateRequest) error {
	return bdrv.Create(co, "file", req)
}

// measure is QEMU's raw_measure: the input's length, or the size asked
// for, in whole sectors, all of it written.
func measure(co *coroutine.Co, o bdrv.Options, in *bdrv.Node) (*bdrv.MeasureInfo, error) {
	req := int64(0)
	if in != nil {
		req = in.SectorLength()
	} else {
		var err error
		if req, err = o.Size("size", 0); err != nil {
			return nil, err
		}
	}
	req = (req + 511) &^ 511
	return &bdrv.MeasureInfo{Required: req, FullyAllocated: req}, nil
}

func (d *driver) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	return d.file.Preadv(co, d.offset+off, iov, flags)
}

func (d *driver) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	return d.file.Pwritev(co, d.offset+off, iov, flags)
}

// Mappable implements bdrv.Mapper: as the file.
func (d *driver) Mappable() bool { return d.file.Mappable() }

// MappedRange implements bdrv.Mapper: the file's, at the shifted offset
// (the node's length bounds the window).
func (d *driver) MappedRange(off, bytes int64) []byte {
	return d.file.MappedRange(d.offset+off, bytes)
}

// PwriteZeroes implements bdrv.ZeroWriter by passing the request down.
func (d *driver) PwriteZeroes(co *coroutine.Co, off, bytes int64, flags bdrv.ReqFlags) error {
	return d.file.PwriteZeroes(co, d.offset+off, bytes, flags)
}

// Pdiscard implements bdrv.Discarder.
func (d *driver) Pdiscard(co *coroutine.Co, off, bytes int64) error {
	return d.file.Pdiscard(co, d.offset+off, bytes)
}

// Flush has nothing of its own to write; bdrv flushes the file below.
func (d *driver) Flush(co *coroutine.Co) error { return nil }

func (d *driver) Close(co *coroutine.Co) error { return nil }

// BlockStatus implements bdrv.BlockStatuser: the answer is the file's, at
// the shifted offset.
func (d *driver) BlockStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (bdrv.Status, error) {
	return bdrv.Status{
		Flags: bdrv.StatusRaw | bdrv.StatusOffsetValid,
		Pnum:  bytes, Map: d.offset + off, File: d.file,
	}, nil
}

// Truncate implements bdrv.Truncater; a window with a fixed size cannot be
// resized.
func (d *driver) Truncate(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc) error {
	if d.fixed || d.offset != 0 {
		return fmt.Errorf("cannot resize a raw image with offset or size options")
	}
	if err := d.file.Truncate(co, size, exact, prealloc); err != nil {
		return err
	}
	d.node.SetLength(d.file.Length())
	return nil
}

// HasZeroInit implements bdrv.ZeroIniter: as the file below.
func (d *driver) HasZeroInit() bool { return d.offset == 0 && !d.fixed && d.file.HasZeroInit() }

// SupportedWriteFlags implements bdrv.WriteFlagser: FUA passes to the file,
// whose generic layer emulates it.
func (d *driver) SupportedWriteFlags() bdrv.ReqFlags { return bdrv.ReqFUA }

// RefreshLimits implements bdrv.LimitsRefresher: raw adds no constraint.
func (d *driver) RefreshLimits() bdrv.Limits { return bdrv.Limits{} }

// ClusterSize implements bdrv.ClusterSizer with its file's (0 when the
// file has none): QEMU's raw answers bdrv_get_info with its file's, so a
// raw image in RBD has the RBD object size as its cluster size (info, and
// convert's alignment and target chunks).
func (d *driver) ClusterSize() int64 {
	if c, ok := d.file.Driver().(bdrv.ClusterSizer); ok {
		return c.ClusterSize()
	}
	return 0
}
