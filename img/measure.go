package img

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
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

// Measure computes how large an image file of format opts.OutputFormat
// created with opts.Options would be, for a new image of opts.Size bytes or
// for converting opts.Filename, as qemu-img measure does, through the
// output format's bdrv.Format.Measure. Errors are qemu-img's.
func Measure(co *coroutine.Co, opts MeasureOptions) (*bdrv.MeasureInfo, error) {
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
	if f.Measure == nil {
		return nil, fmt.Errorf("Format driver '%s' does not support size measurement", outFmt)
	}
	return f.Measure(co, o, in)
}

// WriteMeasure prints a measure result as qemu-img does: "required size:
// N", "fully allocated size: N" and, when there are bitmaps to count,
// "bitmaps size: N"; or with json the BlockMeasureInfo document.
func WriteMeasure(w io.Writer, info *bdrv.MeasureInfo, json bool) error {
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
