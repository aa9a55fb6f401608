package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"strconv"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Image creation (QEMU's qcow2_co_create_opts and qcow2_co_create).
//
// The layout is QEMU's: the header in cluster 0, the refcount table in
// cluster 1, its first refcount block in cluster 2, then the L1 table, then
// (with preallocation) each L2 table followed by the data clusters it maps.
// The image is built the way QEMU builds it: a minimal header and refcount
// structures are written, then the image is opened with this driver, which
// allocates the L1 table and, with preallocation, the L2 tables and data
// clusters through its ordinary allocation path.

// Create option names (qemu-img's -o names).
const (
	CreateSize            = "size"
	CreateCompat          = "compat"
	CreateBackingFile     = "backing_file"
	CreateBackingFmt      = "backing_fmt"
	CreateDataFile        = "data_file"
	CreateDataFileRaw     = "data_file_raw"
	CreateClusterSize     = "cluster_size"
	CreateExtendedL2      = "extended_l2"
	CreatePreallocation   = "preallocation"
	CreateLazyRefcounts   = "lazy_refcounts"
	CreateRefcountBits    = "refcount_bits"
	CreateCompressionType = "compression_type"
	CreateEncryption      = "encryption"
	CreateEncryptFormat   = "encrypt.format"
	CreateNocow           = "nocow"
)

// createOptionSpecs are the options qemu-img create -f qcow2 accepts, in the
// order qemu-img prints them in its "Formatting ..." line (QEMU's option
// list merged with the file protocol's). Default is the value printed when
// the option is not given; options without one are not printed then.
var createOptionSpecs = append([]bdrv.OptionSpec{
	{Name: CreateEncryption, Type: bdrv.OptBool, Help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"},
	{Name: CreateEncryptFormat, Type: bdrv.OptString, Help: "Encrypt the image, format choices: 'aes', 'luks'"},
}, append(encryptOptionSpecs, []bdrv.OptionSpec{
	{Name: CreateClusterSize, Type: bdrv.OptSize, Default: "65536", Help: "qcow2 cluster size"},
	{Name: CreateExtendedL2, Type: bdrv.OptBool, Default: "off", Help: "Extended L2 tables"},
	{Name: CreatePreallocation, Type: bdrv.OptString, Help: "Preallocation mode (allowed values: off, metadata, falloc, full)"},
	{Name: CreateCompressionType, Type: bdrv.OptString, Default: "zlib", Help: "Compression method used for image cluster compression"},
	{Name: CreateSize, Type: bdrv.OptSize, Help: "Virtual disk size"},
	{Name: CreateCompat, Type: bdrv.OptString, Help: "Compatibility level (v2 [0.10] or v3 [1.1])"},
	{Name: CreateBackingFile, Type: bdrv.OptString, Help: "File name of a base image"},
	{Name: CreateBackingFmt, Type: bdrv.OptString, Help: "Image format of the base image"},
	{Name: CreateDataFile, Type: bdrv.OptString, Help: "File name of an external data file"},
	{Name: CreateDataFileRaw, Type: bdrv.OptBool, Help: "The external data file must stay valid as a raw image"},
	{Name: CreateLazyRefcounts, Type: bdrv.OptBool, Default: "off", Help: "Postpone refcount updates"},
	{Name: CreateRefcountBits, Type: bdrv.OptNumber, Default: "16", Help: "Width of a reference count entry in bits"},
	{Name: CreateNocow, Type: bdrv.OptBool, Help: "Turn off copy-on-write (valid only on btrfs)"},
}...)...)

// FormattingOptions returns the option=value list qemu-img prints after
// "fmt=qcow2" in its "Formatting 'FILE', fmt=qcow2 ..." line, for a create
// request of size bytes with opts (as given with -o, -b and -F): options in
// qemu-img's order, given ones with their value (sizes and numbers
// normalised as qemu-img prints them: cluster_size=4k prints 4096), absent
// ones with their default if they have one. For example, no options and a
// 1 GiB size give
//
//	cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16
func FormattingOptions(size int64, opts bdrv.Options) []string {
	var out []string
	for _, s := range createOptionSpecs {
		v, ok := opts[s.Name]
		if s.Name == CreateSize {
			v, ok = strconv.FormatInt(size, 10), true
		}
		if !ok {
			if s.Default == "" {
				continue
			}
			v = s.Default
		} else {
			switch s.Type {
			case bdrv.OptSize:
				if n, err := bdrv.ParseSize(v); err == nil {
					v = strconv.FormatInt(n, 10)
				}
			case bdrv.OptNumber:
				if n, err := strconv.ParseUint(v, 0, 64); err == nil {
					v = strconv.FormatUint(n, 10)
				}
			}
		}
		out = append(out, s.Name+"="+v)
	}
	return out
}

// createParams are the validated create options.
type createParams struct {
	size                  uint64
	version               uint32
	clusterBits           uint32
	extendedL2            bool
	refcountOrder         uint32
	lazy                  bool
	compression           uint8
	prealloc              bdrv.Prealloc
	backing, backingFmt   string
	dataFile              string
	dataFileRaw           bool
	nocow                 bool
	nocowSet, preallocSet bool
	encrypt               *encryptParams // nil: unencrypted
}

// parseCreateOptions validates a create request with QEMU's rules and error
// messages (qcow2_co_create_opts, qcow2_co_create).
func parseCreateOptions(req *bdrv.CreateRequest) (*createParams, error) {
	o := req.Options
	p := &createParams{version: 3}
	size := req.Size
	if size == 0 && o.Has(CreateSize) {
		n, err := o.Size(CreateSize, 0)
		if err != nil {
			return nil, err
		}
		size = n
	}
	if size < 0 {
		return nil, fmt.Errorf("Image size must be a multiple of 512 bytes")
	}
	p.size = (uint64(size) + 511) &^ 511

	var err error
	if p.encrypt, err = parseEncryptOptions(o); err != nil {
		return nil, err
	}
	switch v := o.String(CreateCompat, "1.1"); v {
	case "0.10", "v2":
		p.version = 2
	case "1.1", "v3":
		p.version = 3
	default:
		return nil, fmt.Errorf("Parameter 'version' does not accept value '%s'", v)
	}
	switch v := o.String(CreateCompressionType, "zlib"); v {
	case "zlib":
		p.compression = CompressionDeflate
	case "zstd":
		p.compression = CompressionZstd
	default:
		return nil, fmt.Errorf("Parameter 'compression-type' does not accept value '%s'", v)
	}
	pv := o.String(CreatePreallocation, "off")
	prealloc, err := bdrv.ParsePrealloc(pv)
	if err != nil {
		return nil, fmt.Errorf("Parameter 'preallocation' does not accept value '%s'", pv)
	}
	p.prealloc, p.preallocSet = prealloc, o.Has(CreatePreallocation)

	cs, err := o.Size(CreateClusterSize, 65536)
	if err != nil {
		return nil, err
	}
	p.extendedL2 = o.Bool(CreateExtendedL2, false)
	if p.extendedL2 && p.version < 3 {
		return nil, errors.New("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	cb := uint32(bits.TrailingZeros64(uint64(cs)))
	if cs <= 0 || cb < MinClusterBits || cb > MaxClusterBits || int64(1)<<cb != cs {
		return nil, fmt.Errorf("Cluster size must be a power of two between %d and %dk", 1<<MinClusterBits, 1<<(MaxClusterBits-10))
	}
	if p.extendedL2 && cb < MinClusterBitsExtendedL2 {
		return nil, fmt.Errorf("Extended L2 entries are only supported with cluster sizes of at least %d bytes", 1<<MinClusterBitsExtendedL2)
	}
	p.clusterBits = cb

	rb := uint64(16)
	if v, ok := o[CreateRefcountBits]; ok {
		if rb, err = strconv.ParseUint(v, 0, 64); err != nil {
			return nil, fmt.Errorf("Parameter '%s' expects a number", CreateRefcountBits)
		}
	}
	if rb == 0 || rb > 64 || rb&(rb-1) != 0 {
		return nil, errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if p.version < 3 && rb != 16 {
		return nil, errors.New("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
	}
	p.refcountOrder = uint32(bits.TrailingZeros64(rb))

	p.backing, p.backingFmt = o.String(CreateBackingFile, ""), o.String(CreateBackingFmt, "")
	p.dataFile, p.dataFileRaw = o.String(CreateDataFile, ""), o.Bool(CreateDataFileRaw, false)
	p.lazy = o.Bool(CreateLazyRefcounts, false)
	p.nocow, p.nocowSet = o.Bool(CreateNocow, false), o.Has(CreateNocow)
	switch {
	case p.dataFileRaw && p.dataFile == "":
		return nil, errors.New("data-file-raw requires data-file")
	case p.dataFileRaw && p.backing != "":
		return nil, errors.New("Backing file and data-file-raw cannot be used at the same time")
	case p.version < 3 && p.lazy:
		return nil, errors.New("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	case p.backing != "" && p.prealloc != bdrv.PreallocOff && !p.extendedL2:
		return nil, errors.New("Backing file and preallocation can only be used at the same time if extended_l2 is on")
	case p.backingFmt != "" && p.backing == "":
		return nil, errors.New("Backing format cannot be used without backing file")
	case p.dataFile != "" && p.version < 3:
		return nil, errors.New("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	case p.compression != CompressionDeflate && p.version < 3:
		return nil, errors.New("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	case len(p.backing) > MaxBackingFileSize:
		return nil, fmt.Errorf("Backing file name too long (%d bytes, at most %d)", len(p.backing), MaxBackingFileSize)
	case len(p.backingFmt) > MaxBackingFormatSize:
		return nil, fmt.Errorf("Backing format name too long (%d bytes, at most %d)", len(p.backingFmt), MaxBackingFormatSize)
	}
	if p.dataFileRaw && p.prealloc == bdrv.PreallocOff {
		// The guest must see the raw file: map every cluster 1:1.
		p.prealloc = bdrv.PreallocMetadata
	}
	return p, nil
}

// create implements bdrv.Format.Create.
func create(co *coroutine.Co, req *bdrv.CreateRequest) error {
	p, err := parseCreateOptions(req)
	if err != nil {
		return err
	}
	if req.Size == 0 && !req.Options.Has(CreateSize) && p.backing != "" {
		// No size: the backing file's, as qemu-img does.
		b, err := bdrv.Open(co, bdrv.Spec{Filename: bdrv.ResolveBacking(req.Filename, p.backing),
			Format: p.backingFmt, ReadOnly: true, Options: bdrv.Options{bdrv.OptForceShare: "on"}})
		if err != nil {
			return fmt.Errorf("Could not open backing image to determine size: %w", err)
		}
		p.size = uint64(b.Length())
		if err := b.Close(co); err != nil {
			return err
		}
	}
	cs := uint64(1) << p.clusterBits

	fileOpts := bdrv.Options{}
	if p.nocowSet {
		fileOpts[CreateNocow] = "off"
		if p.nocow {
			fileOpts[CreateNocow] = "on"
		}
	}
	if err := bdrv.Create(co, "file", &bdrv.CreateRequest{Filename: req.Filename, Options: fileOpts}); err != nil {
		return err
	}
	if p.dataFile != "" {
		dopts := fileOpts.Merge(nil)
		if p.prealloc == bdrv.PreallocFalloc || p.prealloc == bdrv.PreallocFull {
			dopts["preallocation"] = p.prealloc.String()
		}
		if err := bdrv.Create(co, "file", &bdrv.CreateRequest{Filename: p.dataFile, Size: int64(p.size), Options: dopts}); err != nil {
			return err
		}
	}

	// A minimal image: header, refcount table, one refcount block that
	// counts those three clusters.
	h := &Header{
		Version:               p.version,
		ClusterBits:           p.clusterBits,
		RefcountTableOffset:   cs,
		RefcountTableClusters: 1,
		RefcountOrder:         p.refcountOrder,
		CompressionType:       p.compression,
		DataFile:              p.dataFile,
	}
	if p.version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = HeaderLengthV2
	} else {
		h.HeaderLength = HeaderLengthV3
	}
	if p.lazy {
		h.CompatibleFeatures |= CompatLazyRefcounts
	}
	if p.dataFile != "" {
		h.IncompatibleFeatures |= IncompatDataFile
	}
	if p.dataFileRaw {
		h.AutoclearFeatures |= AutoclearDataFileRaw
	}
	if p.compression != CompressionDeflate {
		h.IncompatibleFeatures |= IncompatCompression
	}
	if p.extendedL2 {
		h.IncompatibleFeatures |= IncompatExtendedL2
	}
	hb, err := h.Marshal(int(cs))
	if err != nil {
		return err
	}
	meta := bdrv.AlignedBuffer(int(3*cs), 4096)
	copy(meta, hb)
	be.PutUint64(meta[cs:], 2*cs)
	g := h.Geometry()
	for c := uint64(0); c < 3; c++ {
		g.SetRefcount(meta[2*cs:], c, 1)
	}
	// The header is written under the image lock, as every write is.
	f, err := bdrv.Open(co, bdrv.Spec{Filename: req.Filename, Format: "file"})
	if err != nil {
		return err
	}
	err = f.Pwritev(co, 0, bdrv.IOVec{meta}, 0)
	if err == nil {
		err = f.Flush(co)
	}
	if cerr := f.Close(co); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("Could not write qcow2 header: %w", err)
	}

	// Now the rest through the driver.
	opts := bdrv.Options{}
	if p.dataFile != "" {
		opts[OptDataFile] = p.dataFile
	}
	n, err := bdrv.Open(co, bdrv.Spec{Filename: req.Filename, Format: "qcow2", NoBacking: true, Options: opts})
	if err != nil {
		return err
	}
	img := n.Driver().(*Image)
	err = img.finishCreate(co, p)
	if err == nil && p.encrypt != nil {
		img.meta.Lock(co)
		err = img.setUpEncryptionLocked(co, p.encrypt)
		img.meta.Unlock(co)
	}
	if cerr := n.Close(co); err == nil {
		err = cerr
	}
	return err
}

// finishCreate gives a minimal new image its size, L1 table, backing file
// and preallocation.
func (img *Image) finishCreate(co *coroutine.Co, p *createParams) error {
	img.meta.Lock(co)
	defer img.meta.Unlock(co)
	cs := img.cs
	n := img.g.L1EntriesFor(p.size)
	if n*8 > MaxL1TableBytes {
		return fmt.Errorf("Could not resize image: L1 table of %d entries too large", n)
	}
	var l1Off uint64
	if n > 0 {
		var err error
		if l1Off, err = img.allocClustersLocked(co, (n*8+cs-1)/cs); err != nil {
			return fmt.Errorf("Could not resize image: %w", err)
		}
		if err := img.file.Pwritev(co, int64(l1Off), bdrv.IOVec{bdrv.AlignedBuffer(int(n*8), 4096)}, 0); err != nil {
			return fmt.Errorf("Could not resize image: %w", err)
		}
		if err := img.rcCache.flushLocked(co); err != nil {
			return err
		}
	}
	h := *img.hdr
	h.Size = p.size
	h.L1Size = uint32(n)
	h.L1TableOffset = l1Off
	h.BackingFile, h.BackingFormat = p.backing, p.backingFmt
	hb, err := h.Marshal(int(cs))
	if err != nil {
		return err
	}
	if err := img.file.Pwritev(co, 0, bdrv.IOVec{hb}, 0); err != nil {
		return fmt.Errorf("Could not update qcow2 header: %w", err)
	}
	if err := img.file.Flush(co); err != nil {
		return err
	}
	img.hdrMu.Lock()
	img.hdr = &h
	img.hdrMu.Unlock()
	img.l1, img.l1Offset = make([]uint64, n), l1Off
	img.node.SetLength(int64(p.size))
	var err2 error
	switch {
	case p.prealloc == bdrv.PreallocOff:
	case p.prealloc == bdrv.PreallocMetadata || img.hdr.HasDataFile():
		// With a data file, preallocation only maps the clusters; the
		// data file itself was created preallocated.
		err2 = img.preallocateLocked(co, 0, p.size)
	default:
		err2 = img.preallocateDataLocked(co, 0, p.size, p.prealloc)
	}
	if err2 != nil {
		return fmt.Errorf("Could not preallocate metadata: %w", err2)
	}
	return nil
}

// preallocateLocked maps every cluster of guest range [from, size) to a host
// cluster (QEMU's preallocate_co): L2 tables and refcounts are written and
// data clusters reserved. Each L2 table is followed by the clusters it maps;
// the file is extended to the last one. Called with meta held (released
// around copy-on-write of a partial last cluster, as QEMU does).
func (img *Image) preallocateLocked(co *coroutine.Co, from, size uint64) error {
	var end uint64
	for off := from; off < size; {
		host, n, metas, err := img.allocHostOffsetLocked(co, off, size-off)
		for m := metas; m != nil; m = m.next {
			m.prealloc = true
			if err == nil && (m.cowStart.n > 0 || m.cowEnd.n > 0) {
				img.meta.Unlock(co)
				err = img.performCow(co, m)
				img.meta.Lock(co)
				if m.cowDone {
					img.l2Cache.setDependsOnFlushLocked()
				}
			}
			if err == nil {
				err = img.linkL2Locked(co, m)
			} else {
				img.abortLocked(co, m)
			}
			img.removeInflightLocked(m)
		}
		if err != nil {
			return err
		}
		end = host + n
		off += n
	}
	if flen := uint64(img.data.Length()); end > flen {
		return img.data.Truncate(co, int64(end), false, bdrv.PreallocOff)
	}
	return nil
}

// preallocateDataLocked allocates every data cluster of guest range [from,
// size) in the file, falloc or full, the way QEMU's qcow2_co_truncate does:
// new refcount structures after the metadata, sized for the data, then the
// data clusters in one contiguous area, then the L2 tables mapping them.
// Called with meta held.
func (img *Image) preallocateDataLocked(co *coroutine.Co, from, size uint64, mode bdrv.Prealloc) error {
	cs := img.cs
	flen := uint64(img.file.Length())
	last, err := img.lastClusterLocked(co, flen)
	if err != nil {
		return err
	}
	oldEnd := (flen + cs - 1) / cs * cs
	if last >= 0 {
		oldEnd = uint64(last+1) * cs
	}
	nData := (size+cs-1)/cs - from/cs
	nL2 := (nData + img.g.L2Entries() - 1) / img.g.L2Entries()
	start, err := img.refcountAreaLocked(co, oldEnd, nData+nL2, true, 0, 0)
	if err != nil {
		return err
	}
	got, err := img.allocClustersAtLocked(co, start, nData)
	if err != nil {
		return err
	}
	if got != nData {
		return fmt.Errorf("could only allocate %d of %d data clusters", got, nData)
	}
	if err := img.file.Truncate(co, int64(start+nData*cs), false, mode); err != nil {
		return err
	}
	host, guest := start, from
	for nData > 0 {
		nb := min(nData, img.l2SliceEnts-img.g.L2Index(guest)%img.l2SliceEnts)
		// A partial first cluster keeps its old content.
		m := &l2Meta{offset: guest &^ (cs - 1), allocOffset: host, nbClusters: nb,
			cowStart: cowRegion{0, guest & (cs - 1)}, cowEnd: cowRegion{off: nb * cs}, prealloc: true}
		if m.cowStart.n > 0 {
			img.meta.Unlock(co)
			err := img.performCow(co, m)
			img.meta.Lock(co)
			if err != nil {
				return err
			}
			img.l2Cache.setDependsOnFlushLocked()
		}
		if err := img.linkL2Locked(co, m); err != nil {
			return err
		}
		guest = m.offset + nb*cs
		host += nb * cs
		nData -= nb
	}
	return nil
}
