package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"strconv"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

// measure is QEMU's qcow2_measure (bdrv.Format.Measure): the options are
// checked in its order and with its messages, the metadata of a fully
// allocated image is computed as qcow2_calc_prealloc_size does, and the
// data clusters an existing image allocates (anywhere in its backing chain)
// are counted by block status.
func measure(co *coroutine.Co, o bdrv.Options, in *bdrv.Node) (*bdrv.MeasureInfo, error) {
	extL2 := o.Bool(CreateExtendedL2, false)
	csz, err := o.Size(CreateClusterSize, 65536)
	if err != nil {
		return nil, err
	}
	cs := uint64(csz)
	if cs < 1<<MinClusterBits || cs > 1<<MaxClusterBits || cs&(cs-1) != 0 {
		return nil, fmt.Errorf("Cluster size must be a power of two between %d and %dk",
			1<<MinClusterBits, 1<<(MaxClusterBits-10))
	}
	if extL2 && cs < 1<<MinClusterBitsExtendedL2 {
		return nil, fmt.Errorf("Extended L2 entries are only supported with cluster sizes of at least %d bytes",
			1<<MinClusterBitsExtendedL2)
	}
	version := 3
	switch v := o.String(CreateCompat, "1.1"); v {
	case "0.10", "v2":
		version = 2
	case "1.1", "v3":
	default:
		return nil, fmt.Errorf("Invalid compatibility level: '%s'", v)
	}
	rb := uint64(16)
	if v, ok := o[CreateRefcountBits]; ok {
		rb, _ = strconv.ParseUint(v, 0, 64) // checked against the create options
	}
	if rb > 64 || rb == 0 || rb&(rb-1) != 0 {
		return nil, errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if version < 3 && rb != 16 {
		return nil, errors.New("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	}
	prealloc := bdrv.PreallocOff
	if v, ok := o[CreatePreallocation]; ok {
		if prealloc, err = bdrv.ParsePrealloc(v); err != nil {
			return nil, fmt.Errorf("invalid parameter value: %s", v)
		}
	}
	hasBacking := o.Has(CreateBackingFile)
	// A LUKS header area takes whole clusters after the metadata.
	cryptArea, err := EncryptionHeaderSize(o)
	if err != nil {
		return nil, err
	}
	cryptClusters := alignUpU(uint64(cryptArea), cs)

	vsize, err := o.Size(CreateSize, 0)
	if err != nil {
		return nil, err
	}
	virtual := alignUpU(uint64(vsize), cs)
	l2e := uint64(8)
	if extL2 {
		l2e = 16
	}
	l2Tables := divUp(virtual/cs, cs/l2e)
	if l2Tables*8 > 32<<20 { // QCOW_MAX_L1_SIZE
		return nil, errors.New("The image size is too large (try using a larger cluster size)")
	}

	var required uint64
	if in != nil {
		ssize := in.SectorLength()
		virtual = alignUpU(uint64(ssize), cs)
		if hasBacking {
			// The new image's backing file may share nothing with
			// the input: count every cluster.
			required = virtual
		} else if required, err = allocatedBytes(co, in, cs); err != nil {
			return nil, err
		}
	}
	if prealloc == bdrv.PreallocFull || prealloc == bdrv.PreallocFalloc {
		required = virtual
	}
	full := preallocSize(virtual, cs, uint32(bits.TrailingZeros64(rb)), extL2)
	full += cryptClusters
	info := &bdrv.MeasureInfo{FullyAllocated: int64(full), Required: int64(full - virtual + required)}
	if in == nil || version < 3 {
		return info, nil
	}
	bms, ok, err := persistentBitmaps(co, in)
	if err != nil {
		return nil, err
	}
	if ok {
		b := bitmapsSize(bms, uint64(in.Length()), cs)
		info.Bitmaps = &b
	}
	return info, nil
}

// persistentBitmaps lists the persistent bitmaps of in, if its format can
// have them (QEMU's bdrv_supports_persistent_dirty_bitmap): a qcow2 image's
// from its bitmap directory alone, as info reads them, another format's
// through bdrv.PersistentBitmaps.
func persistentBitmaps(co *coroutine.Co, in *bdrv.Node) ([]bdrv.DirtyBitmap, bool, error) {
	switch src := in.Driver().(type) {
	case *Image:
		if src.Header().Version < 3 {
			return nil, false, nil
		}
		v, err := src.FormatSpecific(co)
		if err != nil {
			return nil, false, err
		}
		var bms []bdrv.DirtyBitmap
		for _, b := range v.(*SpecificInfo).Bitmaps {
			bms = append(bms, bdrv.DirtyBitmap{Name: b.Name, Granularity: uint64(b.Granularity)})
		}
		return bms, true, nil
	case bdrv.PersistentBitmaps:
		if !src.SupportsBitmaps() {
			return nil, false, nil
		}
		bms, err := src.DirtyBitmaps(co)
		return bms, err == nil, err
	}
	return nil, false, nil
}

// allocatedBytes is what the data clusters of a copy of in (its whole
// backing chain) take in an image of cluster size cs, counted as QEMU's
// qcow2_measure counts them.
func allocatedBytes(co *coroutine.Co, in *bdrv.Node, cs uint64) (uint64, error) {
	var required uint64
	ssize := in.SectorLength()
	for off, pnum := int64(0), int64(0); off < ssize; off += pnum {
		st, err := in.BlockStatusAbove(co, nil, true, off, min(ssize-off, 1<<30))
		if err != nil {
			var errno unix.Errno
			if errors.As(err, &errno) {
				return 0, fmt.Errorf("Unable to get block status: %s", uring.Strerror(errno))
			}
			return 0, fmt.Errorf("Unable to get block status: %w", err)
		}
		pnum = max(st.Pnum, 1)
		switch {
		case st.Flags&bdrv.StatusZero != 0:
		case st.Flags&(bdrv.StatusData|bdrv.StatusAllocated) == bdrv.StatusData|bdrv.StatusAllocated:
			// To the end of the cluster, counted from its start
			// (QEMU's arithmetic, which may count a cluster more than
			// once).
			pnum = int64(alignUpU(uint64(off+pnum), cs)) - off
			required += uint64(off)%cs + uint64(pnum)
		}
	}
	return required, nil
}

// preallocSize is the file size of a qcow2 image of size bytes with every
// cluster allocated: header, L2 tables, L1 table, refcount structures and
// data (QEMU's qcow2_calc_prealloc_size).
func preallocSize(size, cs uint64, refcountOrder uint32, extL2 bool) uint64 {
	l2e := uint64(8)
	if extL2 {
		l2e = 16
	}
	aligned := alignUpU(size, cs)
	meta := cs // header
	nl2e := alignUpU(aligned/cs, cs/l2e)
	meta += nl2e * l2e
	nl1e := alignUpU(nl2e*l2e/cs, cs/8)
	meta += nl1e * 8
	blocks, table := refcountMetadataSize((meta+aligned)/cs, cs, refcountOrder, false)
	meta += (blocks + table) * cs
	return meta + aligned
}

// bitmapsSize is the space bitmaps of a disk of size bytes take in a new
// qcow2 image of cluster size cs (qcow2_get_persistent_dirty_bitmap_size):
// each bitmap's data clusters and table, and the directory.
func bitmapsSize(bms []bdrv.DirtyBitmap, size, cs uint64) int64 {
	var total, dir uint64
	for _, b := range bms {
		bytes := divUp(divUp(size, b.Granularity), 8)
		clusters := divUp(bytes, cs)
		total += clusters * cs
		total += alignUpU(clusters*8, cs)
		dir += alignUpU(24+uint64(len(b.Name)), 8)
	}
	return int64(total + alignUpU(dir, cs))
}

func alignUpU(x, a uint64) uint64 { return divUp(x, a) * a }
func divUp(x, a uint64) uint64    { return (x + a - 1) / a }
