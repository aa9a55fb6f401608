package img

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"strconv"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	luksdrv "ublkimg/drivers/luks"
	"ublkimg/drivers/qcow2"
)

// MeasureOptions are qemu-img measure's arguments: either Size or an
// existing image (Filename, Format) to measure the conversion of.
type MeasureOptions struct {
	Filename string
	Format   string // -f; "" probes
	// Size (--size) is the virtual size of a new image; -1 measures
	// Filename instead.
	Size int64
	// OutputFormat (-O, default raw) and Options (-o) describe the image
	// to measure.
	OutputFormat string
	Options      bdrv.Options
	ForceShare   bool
}

// MeasureInfo is qemu-img measure's result (QAPI BlockMeasureInfo).
type MeasureInfo struct {
	// Required is the file size the image needs at least: its metadata
	// plus the data clusters the measured image allocates.
	Required int64
	// FullyAllocated is the file size with every cluster allocated.
	FullyAllocated int64
	// Bitmaps is the space for the persistent bitmaps of the measured
	// image, when both it and the output can have them; nil otherwise.
	Bitmaps *int64
}

// Measure computes how large an image file of format opts.OutputFormat
// created with opts.Options would be, for a new image of opts.Size bytes or
// for converting opts.Filename, as qemu-img measure does (raw_measure and
// qcow2_measure). Errors are qemu-img's.
func Measure(co *coroutine.Co, opts MeasureOptions) (*MeasureInfo, error) {
	var in *bdrv.Node
	if opts.Filename != "" {
		s := openSpec{filename: opts.Filename, format: opts.Format, readOnly: true}
		if opts.ForceShare {
			s.options = bdrv.Options{bdrv.OptForceShare: "on"}
		}
		var err error
		if in, err = openImage(co, s); err != nil {
			return nil, err
		}
		defer in.Close(co)
	}
	outFmt := opts.OutputFormat
	if outFmt == "" {
		outFmt = "raw"
	}
	f, err := bdrv.LookupFormat(outFmt)
	if err != nil || f.Protocol {
		return nil, fmt.Errorf("Unknown file format '%s'", outFmt)
	}
	if f.Create == nil {
		return nil, fmt.Errorf("Format driver '%s' does not support image creation", outFmt)
	}
	o, err := bdrv.ParseOptions(f.CreateOptions, opts.Options)
	if err != nil {
		return nil, fmt.Errorf("%s Invalid options for file format '%s'", err.Error(), outFmt)
	}
	if opts.Size >= 0 {
		o[optSize] = strconv.FormatInt(opts.Size, 10)
	}
	switch outFmt {
	case "raw":
		var req int64
		if in != nil {
			req = qemuLength(in)
		} else if req, err = o.Size(optSize, 0); err != nil {
			return nil, err
		}
		req = alignUp(req, sectorSize)
		return &MeasureInfo{Required: req, FullyAllocated: req}, nil
	case "qcow2":
		return measureQcow2(co, o, in)
	case "luks":
		return measureLUKS(o, in)
	}
	return nil, fmt.Errorf("Format driver '%s' does not support size measurement", outFmt)
}

// measureQcow2 is QEMU's qcow2_measure: the options are checked in its
// order and with its messages, the metadata of a fully allocated image is
// computed as qcow2_calc_prealloc_size does, and the data clusters an
// existing image allocates (anywhere in its backing chain) are counted by
// block status.
func measureQcow2(co *coroutine.Co, o bdrv.Options, in *bdrv.Node) (*MeasureInfo, error) {
	extL2 := o.Bool(qcow2.CreateExtendedL2, false)
	csz, err := o.Size(qcow2.CreateClusterSize, 65536)
	if err != nil {
		return nil, err
	}
	cs := uint64(csz)
	if cs < 1<<qcow2.MinClusterBits || cs > 1<<qcow2.MaxClusterBits || cs&(cs-1) != 0 {
		return nil, fmt.Errorf("Cluster size must be a power of two between %d and %dk",
			1<<qcow2.MinClusterBits, 1<<(qcow2.MaxClusterBits-10))
	}
	if extL2 && cs < 1<<qcow2.MinClusterBitsExtendedL2 {
		return nil, fmt.Errorf("Extended L2 entries are only supported with cluster sizes of at least %d bytes",
			1<<qcow2.MinClusterBitsExtendedL2)
	}
	version := 3
	switch v := o.String(qcow2.CreateCompat, "1.1"); v {
	case "0.10", "v2":
		version = 2
	case "1.1", "v3":
	default:
		return nil, fmt.Errorf("Invalid compatibility level: '%s'", v)
	}
	rb := uint64(16)
	if v, ok := o[qcow2.CreateRefcountBits]; ok {
		rb, _ = strconv.ParseUint(v, 0, 64) // checked by ParseOptions
	}
	if rb > 64 || rb == 0 || rb&(rb-1) != 0 {
		return nil, errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if version < 3 && rb != 16 {
		return nil, errors.New("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	}
	prealloc := bdrv.PreallocOff
	if v, ok := o[qcow2.CreatePreallocation]; ok {
		if prealloc, err = bdrv.ParsePrealloc(v); err != nil {
			return nil, fmt.Errorf("invalid parameter value: %s", v)
		}
	}
	hasBacking := o.Has(qcow2.CreateBackingFile)
	// A LUKS header area takes whole clusters after the metadata.
	cryptArea, err := qcow2.EncryptionHeaderSize(o)
	if err != nil {
		return nil, err
	}
	cryptClusters := alignUpU(uint64(cryptArea), cs)

	vsize, err := o.Size(optSize, 0)
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
		ssize := qemuLength(in)
		virtual = alignUpU(uint64(ssize), cs)
		if hasBacking {
			// The new image's backing file may share nothing with
			// the input: count every cluster.
			required = virtual
		} else {
			for off, pnum := int64(0), int64(0); off < ssize; off += pnum {
				st, err := in.BlockStatusAbove(co, nil, true, off, min(ssize-off, 1<<30))
				if err != nil {
					return nil, fmt.Errorf("Unable to get block status: %s", Strerror(err))
				}
				pnum = max(st.Pnum, 1)
				switch {
				case st.Flags&bdrv.StatusZero != 0:
				case st.Flags&(bdrv.StatusData|bdrv.StatusAllocated) == bdrv.StatusData|bdrv.StatusAllocated:
					// To the end of the cluster, counted from its start
					// (QEMU's arithmetic, which may count a cluster
					// more than once).
					pnum = int64(alignUpU(uint64(off+pnum), cs)) - off
					required += uint64(off)%cs + uint64(pnum)
				}
			}
		}
	}
	if prealloc == bdrv.PreallocFull || prealloc == bdrv.PreallocFalloc {
		required = virtual
	}
	full := qcow2PreallocSize(virtual, cs, uint32(bits.TrailingZeros64(rb)), extL2)
	full += cryptClusters
	info := &MeasureInfo{FullyAllocated: int64(full), Required: int64(full - virtual + required)}
	if img, ok := qcow2Image(in); version >= 3 && ok && img.Header().Version >= 3 {
		b, err := qcow2BitmapsSize(co, img, uint64(in.Length()), cs)
		if err != nil {
			return nil, err
		}
		info.Bitmaps = &b
	}
	return info, nil
}

// qcow2Image is the qcow2 driver of n, if n is a qcow2 node.
func qcow2Image(n *bdrv.Node) (*qcow2.Image, bool) {
	if n == nil {
		return nil, false
	}
	img, ok := n.Driver().(*qcow2.Image)
	return img, ok
}

// qcow2PreallocSize is the file size of a qcow2 image of size bytes with
// every cluster allocated: header, L2 tables, L1 table, refcount
// structures and data (QEMU's qcow2_calc_prealloc_size).
func qcow2PreallocSize(size, cs uint64, refcountOrder uint32, extL2 bool) uint64 {
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
	meta += refcountMetadataBytes((meta+aligned)/cs, cs, refcountOrder)
	return meta + aligned
}

// refcountMetadataBytes is the size of the refcount blocks and table that
// count clusters clusters and themselves (qcow2_refcount_metadata_size,
// found as a fixed point).
func refcountMetadataBytes(clusters, cs uint64, order uint32) uint64 {
	perTable := cs / 8
	perBlock := cs * 8 >> order
	var blocks, table, n uint64
	for {
		last := n
		blocks = divUp(clusters+table+blocks, perBlock)
		table = divUp(blocks, perTable)
		n = clusters + blocks + table
		if n == last {
			return (blocks + table) * cs
		}
	}
}

// qcow2BitmapsSize is the space the persistent bitmaps of img take in a
// new qcow2 image of cluster size cs (qcow2_get_persistent_dirty_bitmap_size):
// each bitmap's data clusters and table, and the directory.
func qcow2BitmapsSize(co *coroutine.Co, img *qcow2.Image, size, cs uint64) (int64, error) {
	v, err := img.FormatSpecific(co)
	if err != nil {
		return 0, err
	}
	var total, dir uint64
	if si, ok := v.(*qcow2.SpecificInfo); ok {
		for _, b := range si.Bitmaps {
			bytes := divUp(divUp(size, uint64(b.Granularity)), 8)
			clusters := divUp(bytes, cs)
			total += clusters * cs
			total += alignUpU(clusters*8, cs)
			dir += alignUpU(24+uint64(len(b.Name)), 8)
		}
	}
	return int64(total + alignUpU(dir, cs)), nil
}

func alignUpU(x, a uint64) uint64 { return divUp(x, a) * a }
func divUp(x, a uint64) uint64    { return (x + a - 1) / a }

// WriteMeasure prints a measure result as qemu-img does: "required size:
// N", "fully allocated size: N" and, when there are bitmaps to count,
// "bitmaps size: N"; or with json the BlockMeasureInfo document.
func WriteMeasure(w io.Writer, info *MeasureInfo, json bool) error {
	if json {
		d := NewDict()
		d.Set("required", info.Required)
		d.Set("fully-allocated", info.FullyAllocated)
		if info.Bitmaps != nil {
			d.Set("bitmaps", *info.Bitmaps)
		}
		if err := WriteJSONPretty(w, d); err != nil {
			return err
		}
		_, err := io.WriteString(w, "\n")
		return err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "required size: %d\nfully allocated size: %d\n", info.Required, info.FullyAllocated)
	if info.Bitmaps != nil {
		fmt.Fprintf(&b, "bitmaps size: %d\n", *info.Bitmaps)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// measureLUKS is QEMU's block_crypto_measure: the header area, then the
// payload, all of it written.
func measureLUKS(o bdrv.Options, in *bdrv.Node) (*MeasureInfo, error) {
	hdr, err := luksdrv.HeaderAreaSize(o)
	if err != nil {
		return nil, err
	}
	size := int64(0)
	if in != nil {
		size = qemuLength(in)
	} else if size, err = o.Size(optSize, 0); err != nil {
		return nil, err
	}
	return &MeasureInfo{Required: hdr + size, FullyAllocated: hdr + size}, nil
}
