package img

import (
	"fmt"
	"io"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// ImageInfo is what qemu-img info reports about one image (QEMU's QAPI
// ImageInfo).
type ImageInfo struct {
	Filename    string
	Format      string
	VirtualSize int64
	// ActualSize is the host space the image uses, -1 when unknown.
	ActualSize  int64
	ClusterSize int64 // 0: the format has no clusters
	Encrypted   bool
	Dirty       bool
	// BackingFilename is the backing file as the image records it;
	// FullBackingFilename is it resolved against the image's directory.
	BackingFilename     string
	FullBackingFilename string
	BackingFormat       string
	// Snapshots are the snapshots (bdrv.Snapshotter), in the image's
	// order.
	Snapshots []bdrv.SnapshotInfo
	// FormatSpecific is the bdrv.InfoProvider data converted by
	// ToQObject, or nil.
	FormatSpecific any
}

// InfoOptions selects the image info reports on.
type InfoOptions struct {
	Filename string
	Format   string // "" probes
	// BackingChain reports every image of the backing chain, top first.
	BackingChain bool
	// ForceShare opens images that another process holds (qemu-img -U).
	ForceShare bool
}

// Info gathers qemu-img info's data: for the image alone, or for each layer
// of its backing chain. Each image is opened on its own, read-only and
// without its backing file, as qemu-img does: info works on images whose
// backing file is missing, and --backing-chain then fails at that layer.
func Info(co *coroutine.Co, opts InfoOptions) ([]*ImageInfo, error) {
	var infos []*ImageInfo
	seen := map[string]bool{}
	filename, format := opts.Filename, opts.Format
	for filename != "" {
		if seen[filename] {
			return nil, fmt.Errorf("Backing file '%s' creates an infinite loop.", filename)
		}
		seen[filename] = true
		s := openSpec{filename: filename, format: format, readOnly: true, noBacking: true, noIO: true}
		if opts.ForceShare {
			s.options = bdrv.Options{"force-share": "on"}
		}
		n, err := openImage(co, s)
		if err != nil {
			return nil, err
		}
		shown := filename
		byOptions, ok := optionsName(n)
		switch {
		case strings.HasPrefix(filename, imageOptsMark) && (!ok || n.Filename != ""):
			// A file name given in --image-opts stays, even a
			// protocol's (filename=rbd:...), as in qemu-img.
			shown = imageOptsShown(s, n)
		case ok:
			shown = byOptions
		}
		info, err := queryInfo(co, n, shown)
		n.Close(co)
		if err != nil {
			return nil, err
		}
		infos = append(infos, info)
		if !opts.BackingChain {
			break
		}
		filename, format = info.FullBackingFilename, info.BackingFormat
	}
	return infos, nil
}

// imageOptsShown is the name qemu-img gives an image opened by an
// --image-opts string (bdrv_refresh_filename): the file it opens, or, when
// a strong option of its format was given (bdrv.Format.StrongOptions),
// "json:" and the options that matter (a protocol opened at the top, as
// driver=null-co,size=1M, has no file member).
func imageOptsShown(s openSpec, n *bdrv.Node) string {
	if _, err := resolveImageOpts(&s); err != nil {
		return n.Filename
	}
	var d *Dict
	for _, k := range n.Format.StrongOptions {
		v, ok := s.options[k]
		if !ok {
			continue
		}
		if d == nil {
			d = NewDict()
			d.Set("driver", n.Format.Name)
			if n.File != nil {
				file := NewDict()
				file.Set("driver", "file")
				file.Set("filename", n.Filename)
				d.Set("file", file)
			}
		}
		d.Set(k, v)
	}
	if d == nil {
		return n.Filename
	}
	return "json:" + jsonCompact(d)
}

// queryInfo is QEMU's bdrv_query_image_info for an open node.
func queryInfo(co *coroutine.Co, n *bdrv.Node, filename string) (*ImageInfo, error) {
	info := &ImageInfo{
		Filename:    filename,
		Format:      n.Format.Name,
		VirtualSize: qemuLength(n),
		ActualSize:  n.AllocatedSize(co),
	}
	drv := n.Driver()
	if c, ok := drv.(bdrv.ClusterSizer); ok {
		info.ClusterSize = c.ClusterSize()
	}
	if d, ok := drv.(bdrv.DirtyReporter); ok {
		info.Dirty = d.IsDirty()
	}
	if e, ok := drv.(bdrv.EncryptionReporter); ok {
		info.Encrypted = e.IsEncrypted()
	}
	if n.BackingFile != "" {
		info.BackingFilename = n.BackingFile
		info.FullBackingFilename = pathCombine(filename, n.BackingFile)
		info.BackingFormat = n.BackingFormat
	}
	var err error
	if info.Snapshots, err = snapshotList(co, n); err != nil {
		return nil, fmt.Errorf("%s: %w", filename, err)
	}
	if p, ok := drv.(bdrv.InfoProvider); ok {
		data, err := p.FormatSpecific(co)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", filename, err)
		}
		if data != nil {
			info.FormatSpecific = ToQObject(data)
		}
	}
	return info, nil
}

// pathCombine resolves a backing file name against the image that records
// it, as QEMU's path_combine does: absolute names and URLs stay; relative
// names are taken relative to the directory part of base, kept verbatim
// (no cleaning, so "dir/../b.img" stays as the user will recognise it).
func pathCombine(base, name string) string {
	if strings.HasPrefix(name, "/") || bdrv.HasProtocol(name) {
		return name
	}
	if i := strings.LastIndexByte(base, '/'); i >= 0 {
		return base[:i+1] + name
	}
	return name
}

// Dict is the image's QAPI ImageInfo as qemu-img's JSON output has it. The
// members are inserted in QAPI schema order, which only matters for keys
// sharing a hash bucket (see Dict).
func (i *ImageInfo) Dict() *Dict {
	d := NewDict()
	d.Set("filename", i.Filename)
	d.Set("format", i.Format)
	d.Set("dirty-flag", i.Dirty)
	if i.ActualSize >= 0 {
		d.Set("actual-size", i.ActualSize)
	}
	d.Set("virtual-size", i.VirtualSize)
	if i.ClusterSize != 0 {
		d.Set("cluster-size", i.ClusterSize)
	}
	if i.Encrypted {
		d.Set("encrypted", true)
	}
	if i.BackingFilename != "" {
		d.Set("backing-filename", i.BackingFilename)
		d.Set("full-backing-filename", i.FullBackingFilename)
		if i.BackingFormat != "" {
			d.Set("backing-filename-format", i.BackingFormat)
		}
	}
	if len(i.Snapshots) > 0 {
		d.Set("snapshots", snapshotDicts(i.Snapshots))
	}
	if i.FormatSpecific != nil {
		spec := NewDict()
		spec.Set("type", i.Format)
		spec.Set("data", i.FormatSpecific)
		d.Set("format-specific", spec)
	}
	return d
}

// WriteInfoHuman prints infos as qemu-img info's human output
// (bdrv_image_info_dump), layers separated by an empty line.
func WriteInfoHuman(w io.Writer, infos []*ImageInfo) error {
	var b strings.Builder
	for k, i := range infos {
		if k > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\n",
			i.Filename, i.Format, SizeToStr(uint64(i.VirtualSize)), i.VirtualSize)
		if i.ActualSize >= 0 {
			fmt.Fprintf(&b, "disk size: %s\n", SizeToStr(uint64(i.ActualSize)))
		} else {
			b.WriteString("disk size: unavailable\n")
		}
		if i.Encrypted {
			b.WriteString("encrypted: yes\n")
		}
		if i.ClusterSize != 0 {
			fmt.Fprintf(&b, "cluster_size: %d\n", i.ClusterSize)
		}
		if i.Dirty {
			b.WriteString("cleanly shut down: no\n")
		}
		if i.BackingFilename != "" {
			fmt.Fprintf(&b, "backing file: %s", i.BackingFilename)
			if i.FullBackingFilename != i.BackingFilename {
				fmt.Fprintf(&b, " (actual path: %s)", i.FullBackingFilename)
			}
			b.WriteString("\n")
			if i.BackingFormat != "" {
				fmt.Fprintf(&b, "backing file format: %s\n", i.BackingFormat)
			}
		}
		if len(i.Snapshots) > 0 {
			writeSnapshotList(&b, i.Snapshots)
		}
		if i.FormatSpecific != nil {
			b.WriteString("Format specific information:\n")
			writeHumanValue(&b, 1, i.FormatSpecific)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteInfoJSON prints infos as qemu-img info --output json does: one
// object, or with chain an array of them, top image first.
func WriteInfoJSON(w io.Writer, infos []*ImageInfo, chain bool) error {
	var v any
	if chain {
		l := make([]any, len(infos))
		for k, i := range infos {
			l[k] = i.Dict()
		}
		v = l
	} else if len(infos) > 0 {
		v = infos[0].Dict()
	}
	if err := WriteJSONPretty(w, v); err != nil {
		return err
	}
	_, err := io.WriteString(w, "\n")
	return err
}
