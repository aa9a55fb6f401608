package img

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Option names qemu-img create and convert treat specially (QEMU's
// BLOCK_OPT_SIZE, BLOCK_OPT_BACKING_FILE, BLOCK_OPT_BACKING_FMT).
const (
	optSize          = "size"
	optBackingFile   = "backing_file"
	optBackingFormat = "backing_fmt"
)

// MaxImageSize is the largest size an image may have (INT64_MAX).
const MaxImageSize = int64(^uint64(0) >> 1)

// CreateOptions are qemu-img create's arguments.
type CreateOptions struct {
	Filename string
	Format   string // "" means raw
	// Size is the virtual size in bytes; -1 takes it from the -o size
	// option or the backing file.
	Size int64
	// Options are the -o options (after ParseOptionString).
	Options bdrv.Options
	// BackingFile and BackingFormat are -b and -F.
	BackingFile, BackingFormat string
	// Unsafe (-u) does not open the backing file; the size must then be
	// given.
	Unsafe bool
	// Quiet suppresses the "Formatting ..." line.
	Quiet bool
}

// CreateError is a failure of create, printed as qemu-img does with the
// image's name in front: "x.img: Image creation needs a size parameter".
type CreateError struct {
	Filename string
	Err      error
}

func (e *CreateError) Error() string { return e.Filename + ": " + e.Err.Error() }

func (e *CreateError) Unwrap() error { return e.Err }

// Create makes a new image as qemu-img create does (QEMU's
// bdrv_img_create): it checks the options against the format, takes the
// size from the backing file when none is given, prints "Formatting 'x',
// fmt=raw size=1073741824" on out (unless quiet) and creates the image.
func Create(co *coroutine.Co, opts CreateOptions, out io.Writer) error {
	err := create(co, opts, out)
	if err != nil {
		return &CreateError{Filename: opts.Filename, Err: err}
	}
	return nil
}

func create(co *coroutine.Co, opts CreateOptions, out io.Writer) error {
	fmtName := opts.Format
	if fmtName == "" {
		fmtName = "raw"
	}
	f, err := bdrv.LookupFormat(fmtName)
	if err != nil || f.Protocol {
		return fmt.Errorf("Unknown file format '%s'", fmtName)
	}
	if f.Create == nil {
		return fmt.Errorf("Format driver '%s' does not support image creation", fmtName)
	}
	f = f.ForFilename(opts.Filename)
	o := bdrv.Options{}.Merge(opts.Options)
	if err := checkOptionNames(f, o); err != nil {
		return err
	}

	size := opts.Size
	if v, ok := o[optSize]; ok {
		if size != -1 {
			return errors.New("The image size must be specified only once")
		}
		if size, err = bdrv.ParseSize(v); err != nil {
			return errors.New("Parameter 'size' expects a non-negative number below 2^64. Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.")
		}
	}
	if opts.BackingFile != "" {
		if !hasOption(f, optBackingFile) {
			return fmt.Errorf("Backing file not supported for file format '%s'", fmtName)
		}
		o[optBackingFile] = opts.BackingFile
	}
	if opts.BackingFormat != "" {
		if !hasOption(f, optBackingFormat) {
			return fmt.Errorf("Backing file format not supported for file format '%s'", fmtName)
		}
		o[optBackingFormat] = opts.BackingFormat
	}

	if backing, ok := o[optBackingFile]; ok {
		if backing == opts.Filename {
			return errors.New("Error: Trying to create an image with the same filename as the backing file")
		}
		if backing == "" {
			return errors.New("Expected backing file name, got empty string")
		}
		backingFmt := o[optBackingFormat]
		if !opts.Unsafe {
			bsize, detected, err := backingSize(co, pathCombine(opts.Filename, backing), backingFmt)
			if err != nil {
				return err
			}
			if backingFmt == "" {
				// qemu-img 7.2 refuses to guess: a probed raw backing
				// file is a security hole.
				return fmt.Errorf("Backing file specified without backing format. Detected format of %s.", detected)
			}
			if size == -1 {
				size = bsize
			}
		} else if backingFmt == "" {
			return errors.New("Backing file specified without backing format")
		}
	}
	if size == -1 {
		return errors.New("Image creation needs a size parameter")
	}
	if size < 0 {
		return errors.New("Image size must be less than 8 EiB!")
	}

	if !opts.Quiet && out != nil {
		fmt.Fprintf(out, "Formatting '%s', fmt=%s %s\n", opts.Filename, fmtName, formatOptions(f, o, size))
	}
	return bdrv.Create(co, fmtName, &bdrv.CreateRequest{Filename: opts.Filename, Size: size, Options: createOptions(f, o, size)})
}

// backingSize opens a backing file to learn its size and format, as
// bdrv_img_create does when no size is given (and to check that it opens),
// for metadata only as QEMU does (BDRV_O_NO_IO): an encrypted backing file
// needs no key, a data file is not opened.
func backingSize(co *coroutine.Co, filename, format string) (int64, string, error) {
	// Like bdrv_img_create, with force-share: the backing file may be in
	// use (a VM writing it while an overlay is made for a snapshot).
	n, err := openImage(co, openSpec{filename: filename, format: format, readOnly: true, noBacking: true, noIO: true,
		options: bdrv.Options{bdrv.OptForceShare: "on"}})
	if err != nil {
		return 0, "", fmt.Errorf("%w. Could not open backing image.", err)
	}
	defer n.Close(co)
	return qemuLength(n), n.Format.Name, nil
}

// checkOptionNames rejects -o options the format does not know, with
// qemu-img's wording, before anything is printed or created. "size" is
// always accepted: every format has a size.
func checkOptionNames(f *bdrv.Format, o bdrv.Options) error {
	rest := bdrv.Options{}
	for k, v := range o {
		if k != optSize {
			rest[k] = v
		}
	}
	_, err := bdrv.ParseOptions(f.CreateOptions, rest)
	return err
}

func hasOption(f *bdrv.Format, name string) bool {
	for _, s := range f.CreateOptions {
		if s.Name == name {
			return true
		}
	}
	return false
}

// createOptions is what the driver's Create gets: the -o options, plus size
// when the format lists it among its options.
func createOptions(f *bdrv.Format, o bdrv.Options, size int64) bdrv.Options {
	out := bdrv.Options{}
	for k, v := range o {
		out[k] = v
	}
	delete(out, optSize)
	if hasOption(f, optSize) {
		out[optSize] = strconv.FormatInt(size, 10)
	}
	return out
}

// formatOptions renders the option list of "Formatting ..." as
// qemu_opts_print does: every option of the format's list, in its order,
// that was set or has a default worth printing; sizes and numbers in
// decimal bytes. A format that does not list "size" gets it first.
// An option is printed when it was given, and otherwise when its spec has
// a Default (QEMU's def_value_str).
func formatOptions(f *bdrv.Format, o bdrv.Options, size int64) string {
	var parts []string
	if !hasOption(f, optSize) {
		parts = append(parts, fmt.Sprintf("size=%d", size))
	}
	for _, s := range f.CreateOptions {
		v, set := o[s.Name]
		if s.Name == optSize {
			v, set = strconv.FormatInt(size, 10), true
		}
		if !set {
			if s.Default == "" {
				continue
			}
			v = s.Default
		}
		if set && (s.Type == bdrv.OptSize || s.Type == bdrv.OptNumber) {
			if n, err := parseNumberOption(s.Type, v); err == nil {
				v = strconv.FormatUint(n, 10)
			}
		}
		parts = append(parts, s.Name+"="+v)
	}
	return strings.Join(parts, " ")
}

func parseNumberOption(t bdrv.OptionType, v string) (uint64, error) {
	if t == bdrv.OptSize {
		n, err := bdrv.ParseSize(v)
		return uint64(n), err
	}
	return strconv.ParseUint(v, 0, 64)
}

// HasHelpOption reports whether an -o list asks for help ("-o help" or
// "-o ?"), which makes create and convert list the format's options
// instead.
func HasHelpOption(o bdrv.Options) bool {
	_, h := o["help"]
	_, q := o["?"]
	return h || q
}

// WriteCreateOptionsHelp lists a format's create options as "qemu-img
// create -f FMT -o help [FILE]" does (qemu_opts_print_help): sorted by
// name, with the value type and the help text aligned in a column. Without
// a filename qemu-img lists only the format's own options and adds a note
// about the protocol's; ublkimg's formats list both, so only the heading
// and the note differ.
func WriteCreateOptionsHelp(w io.Writer, format, filename string) error {
	f, err := bdrv.LookupFormat(format)
	if err != nil || f.Protocol {
		return fmt.Errorf("Unknown file format '%s'", format)
	}
	specs := append([]bdrv.OptionSpec(nil), f.CreateOptions...)
	if !hasOption(f, optSize) {
		specs = append(specs, bdrv.OptionSpec{Name: optSize, Type: bdrv.OptSize, Help: "Virtual disk size"})
	}
	sort.Slice(specs, func(i, j int) bool { return specs[i].Name < specs[j].Name })
	var b strings.Builder
	if filename != "" {
		b.WriteString("Supported options:\n")
	} else {
		fmt.Fprintf(&b, "Supported %s options:\n", format)
	}
	for _, s := range specs {
		line := fmt.Sprintf("  %s=<%s>", s.Name, optionTypeName(s.Type))
		if s.Help != "" {
			if len(line) < 24 {
				line += strings.Repeat(" ", 24-len(line))
			}
			line += " - " + s.Help
		}
		b.WriteString(line + "\n")
	}
	if filename == "" {
		b.WriteString("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n")
	}
	_, err = io.WriteString(w, b.String())
	return err
}

func optionTypeName(t bdrv.OptionType) string {
	switch t {
	case bdrv.OptBool:
		return "bool (on/off)"
	case bdrv.OptNumber:
		return "num"
	case bdrv.OptSize:
		return "size"
	}
	return "str"
}
