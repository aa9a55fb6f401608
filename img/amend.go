package img

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// AmendOptions are qemu-img amend's arguments.
type AmendOptions struct {
	Filename string
	Format   string // -f; "" probes
	Options  string // -o, "key=value,..."
	// Force (--force) allows what QEMU calls unsafe: overwriting an
	// active key slot, erasing the last ones.
	Force bool
	// Progress, if not nil, receives -p's progress line.
	Progress io.Writer
}

// Amend changes format options of an existing image as qemu-img amend
// does, through its format's bdrv.Amender (qcow2: compat upgrade and
// downgrade, refcount_bits, lazy_refcounts, size, data_file and
// data_file_raw, backing_file / backing_fmt only at their current values,
// LUKS key slots). The steps, their order and the errors are qemu-img's:
// the image is opened, the -o string parsed (syntax errors, in the order
// given), then the format checks the values and makes the changes in
// QEMU's order, so a failing combination leaves the same changes behind.
// Progress is the format's (qcow2: the upgrade, key slots, refcount width
// change and downgrade).
func Amend(co *coroutine.Co, opts AmendOptions) error {
	if opts.Options == "" {
		return errors.New("Must specify options (-o)")
	}
	p := NewProgress(opts.Progress, 1)
	defer p.End()
	// qemu-img amend opens the backing chain: an image whose backing file
	// is missing, or written by another process, is refused untouched.
	node, err := openImage(co, openSpec{filename: opts.Filename, format: opts.Format})
	if err != nil {
		return err
	}
	a, ok := node.Driver().(bdrv.Amender)
	if !ok {
		node.Close(co)
		return fmt.Errorf("Format driver '%s' does not support option amendment", node.Format.Name)
	}
	o, err := parseAmendOptions(opts.Options, a)
	if err == nil {
		ctl := bdrv.AmendControl{
			Force: opts.Force,
			Resize: func(co *coroutine.Co, size int64) error {
				if err := node.Truncate(co, size, false, bdrv.PreallocOff); err != nil {
					return errors.New(snapErrText(err))
				}
				return nil
			},
			Status: func(off, total int64) { p.Print(float32(100)*float32(off)/float32(total), 0) },
		}
		p.Print(0, 0)
		err = a.Amend(co, o, ctl)
		p.Print(100, 0)
	}
	if cerr := node.Close(co); err == nil && cerr != nil {
		err = errors.New(snapErrText(cerr))
	}
	return err
}

// parseAmendOptions parses -o as qemu-img amend does: against the format's
// amend options, and when that fails, again with its create options added,
// to tell the user if the refused option is one for creation only.
func parseAmendOptions(s string, a bdrv.Amender) (bdrv.Options, error) {
	amend, create := a.AmendOptionSpecs()
	o, err := parseQemuOpts(s, amend)
	if err != nil {
		if _, cerr := parseQemuOpts(s, slices.Concat(amend, create)); cerr == nil {
			err = errors.New(err.Error() + "\nThis option is only supported for image creation")
		}
	}
	return o, err
}

// parseQemuOpts parses "key=value,..." as QEMU's qemu_opts_do_parse does:
// names from specs (the first of a name counts), values of their type,
// checked in the order given, a later value of a name winning; a bare name
// is "on", a bare "noNAME" is NAME "off".
func parseQemuOpts(s string, specs []bdrv.OptionSpec) (bdrv.Options, error) {
	vals := bdrv.Options{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok && strings.HasPrefix(k, "no") {
			k, v = k[2:], "off"
		} else if !ok {
			v = "on"
		}
		i := slices.IndexFunc(specs, func(s bdrv.OptionSpec) bool { return s.Name == k })
		if i < 0 {
			return nil, fmt.Errorf("Invalid parameter '%s'", k)
		}
		switch specs[i].Type {
		case bdrv.OptBool:
			if _, err := bdrv.ParseBool(v); err != nil {
				return nil, fmt.Errorf("Parameter '%s' expects 'on' or 'off'", k)
			}
		case bdrv.OptSize:
			if _, err := bdrv.ParseSize(v); err != nil {
				return nil, fmt.Errorf("Parameter '%s' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.", k)
			}
		case bdrv.OptNumber:
			if _, err := bdrv.ParseNumber(v); errors.Is(err, strconv.ErrRange) {
				return nil, fmt.Errorf("Value '%s' is too large for parameter '%s'", v, k)
			} else if err != nil {
				return nil, fmt.Errorf("Parameter '%s' expects a number", k)
			}
		}
		vals[k] = v
	}
	return vals, nil
}
