// Package null is the null-co protocol driver: reads return zeros, writes
// and flushes succeed without touching anything. It measures the cost of
// the stack above it (bdrv, ublk) with no storage underneath, like QEMU's
// null-co.
package null

import (
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

func init() {
	bdrv.Register(&bdrv.Format{
		Name:     "null-co",
		Protocol: true,
		Open:     open,
		// QEMU's null_strong_runtime_opts.
		StrongOptions: []string{OptSize, OptReadZeroes},
	})
}

// Options understood at open, as QEMU's null-co.
const (
	// OptSize is the device size (default 1 GiB).
	OptSize = "size"
	// OptReadZeroes makes reads fill the buffer with zeros (default on;
	// off leaves the caller's buffer untouched, which is cheaper).
	OptReadZeroes = "read-zeroes"
)

type driver struct {
	node       *bdrv.Node
	readZeroes bool
}

func open(co *coroutine.Co, n *bdrv.Node, opts bdrv.Options) (bdrv.Driver, error) {
	size, err := opts.Size(OptSize, 1<<30)
	if err != nil {
		return nil, fmt.Errorf("null-co: %w", err)
	}
	n.SetLength(size)
	if n.Filename == "" {
		// Opened by options alone (--image-opts driver=null-co): QEMU
		// names the node by its protocol.
		n.Filename = "null-co://"
	}
	return &driver{node: n, readZeroes: opts.Bool(OptReadZeroes, true)}, nil
}

func (d *driver) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	if d.readZeroes {
		iov.Zero(0, iov.Len())
	}
	return nil
}

func (d *driver) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	return nil
}

func (d *driver) PwriteZeroes(co *coroutine.Co, off, bytes int64, flags bdrv.ReqFlags) error {
	return nil
}

func (d *driver) Pdiscard(co *coroutine.Co, off, bytes int64) error { return nil }

func (d *driver) Flush(co *coroutine.Co) error { return nil }

func (d *driver) Close(co *coroutine.Co) error { return nil }

// BlockStatus implements bdrv.BlockStatuser: everything reads as zeros when
// reads are zeroed, as in QEMU.
func (d *driver) BlockStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (bdrv.Status, error) {
	st := bdrv.Status{Flags: bdrv.StatusOffsetValid, Pnum: bytes, Map: off, File: d.node}
	if d.readZeroes {
		st.Flags |= bdrv.StatusZero
	}
	return st, nil
}

// SupportedWriteFlags implements bdrv.WriteFlagser: FUA is free when
// nothing is stored.
func (d *driver) SupportedWriteFlags() bdrv.ReqFlags { return bdrv.ReqFUA }

// AllocatedSize implements bdrv.AllocatedSizer: nothing is stored (info's
// "disk size: 0 B", as QEMU's null-co).
func (d *driver) AllocatedSize(co *coroutine.Co) (int64, error) { return 0, nil }
