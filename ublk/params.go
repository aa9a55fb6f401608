package ublk

import (
	"fmt"
	"math/bits"
	"os"

	"ublkimg/bdrv"
	"ublkimg/ublk/internal/uapi"
)

// maxLimitSectors caps the discard and write-zeroes limits: the kernel keeps
// them in 32-bit sector counts, and a request's byte length must fit in 32
// bits too (UINT32_MAX >> 9 sectors, just under 4 GiB).
const maxLimitSectors = ^uint32(0) >> 9

// buildParams derives the device parameters from the image node and the
// configuration (already defaulted): capacity, block sizes, transfer size,
// cache attributes, and the discard / write-zeroes limits when the image's
// driver can do them.
func buildParams(cfg *Config, node *bdrv.Node, maxIOBufBytes int) (*uapi.Params, error) {
	bs := int64(cfg.BlockSize)
	length := node.Length()
	if length < bs {
		return nil, fmt.Errorf("image is %d bytes, smaller than one %d-byte block", length, bs)
	}
	lim := node.Limits()
	lbs := shift(bs)
	page := int64(os.Getpagesize())
	// The physical block size is a hint for filesystems (mkfs aligns to
	// it): at least a page, and the image's own alignment if larger.
	pbs := max(lbs, shift(page), shift(min(lim.RequestAlignment, 64<<10)))
	// The optimal I/O size: the format's preferred size (a qcow2
	// cluster) when it is a power of two, else the physical block.
	opt := pbs
	if o := lim.OptTransfer; o > 0 && o&(o-1) == 0 && o <= 1<<20 {
		opt = max(opt, shift(o))
	}
	p := &uapi.Params{
		Types: uapi.ParamTypeBasic,
		Basic: uapi.ParamBasic{
			// A volatile write cache: the kernel sends FLUSH, which
			// becomes bdrv Flush, and FUA writes, which bdrv makes
			// durable (natively or with a flush).
			Attrs:           uapi.AttrVolatileCache | uapi.AttrFUA,
			LogicalBSShift:  lbs,
			PhysicalBSShift: pbs,
			IOOptShift:      opt,
			IOMinShift:      lbs,
			MaxSectors:      uint32(maxIOBufBytes >> 9),
			DevSectors:      uint64(length/bs*bs) >> 9,
		},
	}
	if cfg.ReadOnly {
		p.Basic.Attrs |= uapi.AttrReadOnly
		return p, nil
	}
	_, canDiscard := node.Driver().(bdrv.Discarder)
	_, canZero := node.Driver().(bdrv.ZeroWriter)
	canDiscard = canDiscard && cfg.Discard == DiscardUnmap
	if !canDiscard && !canZero {
		return p, nil
	}
	// Granularity: what the image can deallocate at once (a qcow2
	// cluster, a file system block), at least a page and a block.
	gran := max(lim.PdiscardAlignment, lim.RequestAlignment, bs, page)
	if gran&(gran-1) != 0 {
		gran = int64(1) << bits.Len64(uint64(gran))
	}
	p.Types |= uapi.ParamTypeDiscard
	p.Discard.DiscardGranularity = uint32(min(gran, 1<<30))
	if canDiscard {
		p.Discard.MaxDiscardSectors = capSectors(lim.MaxPdiscard)
		p.Discard.MaxDiscardSegments = 1
	}
	if canZero {
		p.Discard.MaxWriteZeroesSectors = capSectors(lim.MaxPwriteZeroes)
	}
	return p, nil
}

// capSectors converts a byte limit (0 = none) to sectors within
// maxLimitSectors.
func capSectors(limit int64) uint32 {
	if limit <= 0 || limit>>9 > int64(maxLimitSectors) {
		return maxLimitSectors
	}
	return uint32(limit >> 9)
}

// shift is log2 of the power of two n (rounded down otherwise).
func shift(n int64) uint8 {
	if n <= 1 {
		return 0
	}
	return uint8(bits.Len64(uint64(n)) - 1)
}
