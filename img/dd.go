package img

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// DDOptions are qemu-img dd's arguments.
type DDOptions struct {
	Input, Output string
	Format        string // -f: the input's; "" probes
	OutputFormat  string // -O; "" means raw
	// BlockSize (bs=, default 512) is the unit of Count and Skip and of
	// each read and write.
	BlockSize int64
	// Count (count=), if HasCount, limits the copy: the input is taken
	// as Count blocks long (from its start, so skipped blocks count too,
	// as in qemu-img).
	Count    int64
	HasCount bool
	// Skip (skip=) is the number of input blocks not copied.
	Skip       int64
	ForceShare bool
	// Warn receives qemu-img's complaint, as a "ublkimg: " line, when Skip
	// goes past the end of the input (the output is then created empty and
	// dd succeeds).
	Warn io.Writer
}

// ParseDDOperands parses dd's operands (bs=, count=, if=, of=, skip=) into
// opts, with qemu-img's messages; BlockSize defaults to 512.
func ParseDDOperands(args []string, opts *DDOptions) error {
	opts.BlockSize = 512
	var haveIf, haveOf bool
	for _, a := range args {
		name, val, ok := strings.Cut(a, "=")
		if !ok {
			return fmt.Errorf("unrecognized operand %s", a)
		}
		var err error
		switch name {
		case "bs":
			opts.BlockSize, err = ParseSizeArg("bs", val, 1, math.MaxInt32)
		case "count":
			opts.Count, err = ParseSizeArg("count", val, 0, math.MaxInt64)
			opts.HasCount = true
		case "if":
			opts.Input, haveIf = val, true
		case "of":
			opts.Output, haveOf = val, true
		case "skip":
			opts.Skip, err = ParseSizeArg("skip", val, 0, math.MaxInt64)
		default:
			return fmt.Errorf("unrecognized operand %s", name)
		}
		if err != nil {
			return err
		}
	}
	if !haveIf || !haveOf {
		return errors.New("Must specify both input and output files")
	}
	return nil
}

// DD copies an image into a new one as qemu-img dd does: the output
// (format opts.OutputFormat, default options) is created with the size of
// what is copied, then the input is copied block by block from block
// opts.Skip on, up to the input's end or opts.Count blocks from the
// input's start. Every byte is written, so the output is fully allocated.
func DD(co *coroutine.Co, opts DDOptions) error {
	bs := opts.BlockSize
	if bs <= 0 {
		bs = 512
	}
	s := openSpec{filename: opts.Input, format: opts.Format, readOnly: true}
	if opts.ForceShare {
		s.options = bdrv.Options{bdrv.OptForceShare: "on"}
	}
	in, err := openImage(co, s)
	if err != nil {
		return err
	}
	defer in.Close(co)

	outFmt := opts.OutputFormat
	if outFmt == "" {
		outFmt = "raw"
	}
	f, err := bdrv.LookupFormat(outFmt)
	if err != nil || f.Protocol {
		return errors.New("Unknown file format")
	}
	if f.Create == nil {
		return fmt.Errorf("Format driver '%s' does not support image creation", outFmt)
	}

	size := qemuLength(in)
	if opts.HasCount && opts.Count <= math.MaxInt64/bs && opts.Count*bs < size {
		size = opts.Count * bs
	}
	pastEnd := opts.Skip > math.MaxInt64/bs || size < bs*opts.Skip
	outSize := int64(0)
	if !pastEnd {
		outSize = size - bs*opts.Skip
	}
	if err := bdrv.Create(co, outFmt, &bdrv.CreateRequest{Filename: opts.Output, Size: outSize,
		Options: createOptions(f, bdrv.Options{}, outSize)}); err != nil {
		return fmt.Errorf("%s: error while creating output image: %w", opts.Output, createReason(opts.Output, err))
	}
	out, err := openImage(co, openSpec{filename: opts.Output, format: outFmt})
	if err != nil {
		return err
	}
	defer out.Close(co)

	inPos := bs * opts.Skip
	if pastEnd {
		// Like dd(1): warn, and leave the output empty.
		if opts.Warn != nil {
			fmt.Fprintf(opts.Warn, "ublkimg: %s: cannot skip to specified offset\n", opts.Input)
		}
		inPos = size
	}
	buf := bdrv.AlignedBuffer(int(bs), max(4096, in.Limits().MinMemAlignment, out.Limits().MinMemAlignment))
	for outPos := int64(0); inPos < size; {
		n := min(bs, size-inPos)
		if err := in.Preadv(co, inPos, bdrv.IOVec{buf[:n]}, 0); err != nil {
			return fmt.Errorf("error while reading from input image file: %s", Strerror(err))
		}
		inPos += n
		if err := out.Pwritev(co, outPos, bdrv.IOVec{buf[:n]}, 0); err != nil {
			return fmt.Errorf("error while writing to output image file: %s", Strerror(err))
		}
		outPos += n
	}
	if err := out.Close(co); err != nil {
		return fmt.Errorf("error while writing to output image file: %s", Strerror(err))
	}
	return nil
}

// createReason words a failure of bdrv.Create as QEMU's create functions
// do for a file that cannot be made: "Could not create 'x': reason". The
// refusal of an image another process uses keeps its own words (and hint).
func createReason(filename string, err error) error {
	if errors.Is(err, bdrv.ErrLocked) {
		return err
	}
	msg := errText(err)
	if strings.HasPrefix(msg, "Could not create") || strings.HasPrefix(msg, "could not create") {
		return errors.New(capitalize(msg))
	}
	var oe *OpenError
	if errors.As(err, &oe) {
		return errors.New(msg)
	}
	return errors.New("Could not create '" + filename + "': " + Strerror(err))
}
