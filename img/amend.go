package img

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/lukscrypto"
	"ublkimg/drivers/qcow2"
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

// creationOnly are the qcow2 create options amend refuses (QEMU's
// qcow2_amend_options: "This option is only supported for image creation").
var creationOnly = map[string]bool{
	"cluster_size": true, "extended_l2": true, "compression_type": true,
	"preallocation": true, "encryption": true, "nocow": true, "encrypt.format": true,
}

// amendKinds are the options amend takes and their value types.
var amendKinds = map[string]bdrv.OptionType{
	"size": bdrv.OptSize, "compat": bdrv.OptString,
	"backing_file": bdrv.OptString, "backing_fmt": bdrv.OptString,
	"data_file": bdrv.OptString, "data_file_raw": bdrv.OptBool,
	"lazy_refcounts": bdrv.OptBool, "refcount_bits": bdrv.OptNumber,
	// LUKS key slots (QEMU's BLOCK_CRYPTO_OPT_DEF_QCOW2_LUKS_* amend options).
	"encrypt.state": bdrv.OptString, "encrypt.keyslot": bdrv.OptNumber,
	"encrypt.new-secret": bdrv.OptString, "encrypt.old-secret": bdrv.OptString,
	"encrypt.iter-time": bdrv.OptNumber,
}

// Amend changes format options of an existing qcow2 image as qemu-img
// amend does: compat (upgrade and downgrade), refcount_bits,
// lazy_refcounts, size, data_file and data_file_raw (renaming, clearing
// the raw bit), and backing_file / backing_fmt (only their current
// values). The steps, their order and the errors are qemu-img's: the image
// is opened, the -o string parsed (syntax errors, in the order given),
// the values checked, then the changes made in QEMU's order, so a failing
// combination leaves the same changes behind. Progress, like qemu-img's,
// covers the upgrade, refcount width change and downgrade.
func Amend(co *coroutine.Co, opts AmendOptions) error {
	if opts.Options == "" {
		return errors.New("Must specify options (-o)")
	}
	p := NewProgress(opts.Progress, 1)
	defer p.End()
	node, err := openImage(co, openSpec{filename: opts.Filename, format: opts.Format, noBacking: true})
	if err != nil {
		return err
	}
	q, ok := node.Driver().(*qcow2.Image)
	if !ok {
		node.Close(co)
		return fmt.Errorf("Format driver '%s' does not support option amendment", node.Format.Name)
	}
	o, compat, size, err := parseAmendOptions(opts.Options)
	if err == nil && o.Encrypt != nil {
		o.Encrypt.Force = opts.Force
		_, _, iopts, rerr := ResolveImageName(opts.Filename)
		if rerr != nil {
			return rerr
		}
		o.Encrypt.Secret = iopts[qcow2.OptKeySecret]
	}
	if err == nil {
		if size != 0 {
			o.Resize = func(co *coroutine.Co) error {
				if err := node.Truncate(co, size, false, bdrv.PreallocOff); err != nil {
					return errors.New(snapErrText(err))
				}
				return nil
			}
		}
		o.Status = func(off, total int64) { p.Print(float32(100)*float32(off)/float32(total), 0) }
		p.Print(0, 0)
		if o.Version, err = amendVersion(compat); err == nil {
			err = q.Amend(co, o)
		}
		p.Print(100, 0)
		if errors.Is(err, qcow2.ErrAmendBacking) {
			err = errors.New(err.Error() + "\nYou can use 'qemu-img rebase' instead.")
		}
	}
	if cerr := node.Close(co); err == nil && cerr != nil {
		err = errors.New(snapErrText(cerr))
	}
	return err
}

// parseAmendOptions parses -o as qemu-img amend does (QemuOpts syntax and
// types, in the order given; a later value of a name wins) and returns the
// compat value apart, since its check comes later (amendVersion). The
// driver checks the other values.
func parseAmendOptions(s string) (o qcow2.AmendOptions, compat *string, size int64, err error) {
	vals := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok && strings.HasPrefix(k, "no") {
			k, v = k[2:], "off"
		} else if !ok {
			v = "on"
		}
		kind, known := amendKinds[k]
		switch {
		case creationOnly[k]:
			return o, nil, 0, fmt.Errorf("Invalid parameter '%s'\nThis option is only supported for image creation", k)
		case !known:
			return o, nil, 0, fmt.Errorf("Invalid parameter '%s'", k)
		case kind == bdrv.OptBool:
			if _, err := bdrv.ParseBool(v); err != nil {
				return o, nil, 0, fmt.Errorf("Parameter '%s' expects 'on' or 'off'", k)
			}
		case kind == bdrv.OptSize:
			n, err := bdrv.ParseSize(v)
			if err != nil {
				return o, nil, 0, fmt.Errorf("Parameter '%s' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.", k)
			}
			size = n
		case kind == bdrv.OptNumber:
			if _, err := parseAmendNumber(v); errors.Is(err, strconv.ErrRange) {
				return o, nil, 0, fmt.Errorf("Value '%s' is too large for parameter '%s'", v, k)
			} else if err != nil {
				return o, nil, 0, fmt.Errorf("Parameter '%s' expects a number", k)
			}
		}
		vals[k] = v
	}
	str := func(k string) *string {
		if v, ok := vals[k]; ok {
			return &v
		}
		return nil
	}
	flag := func(k string) *bool {
		if v, ok := vals[k]; ok {
			b, _ := bdrv.ParseBool(v)
			return &b
		}
		return nil
	}
	o.BackingFile, o.BackingFormat, o.DataFile = str("backing_file"), str("backing_fmt"), str("data_file")
	o.DataFileRaw, o.LazyRefcounts = flag("data_file_raw"), flag("lazy_refcounts")
	if v, ok := vals["refcount_bits"]; ok {
		n, _ := parseAmendNumber(v)
		o.RefcountBits = math.MaxUint32 // refused by the driver
		if n > 0 && n <= 64 {
			o.RefcountBits = uint32(n)
		}
	}
	o.Encrypt = amendCryptOptions(vals)
	return o, str("compat"), size, nil
}

// amendCryptOptions gathers the encrypt.* options, nil if none is given.
func amendCryptOptions(vals map[string]string) *lukscrypto.AmendOptions {
	var e lukscrypto.AmendOptions
	given := false
	for k, v := range vals {
		name, ok := strings.CutPrefix(k, "encrypt.")
		if !ok {
			continue
		}
		given = true
		n, _ := parseAmendNumber(v)
		switch name {
		case "state":
			e.State = &v
		case "new-secret":
			e.NewSecret = &v
		case "old-secret":
			e.OldSecret = &v
		case "keyslot":
			e.Keyslot = new(int64(n))
		case "iter-time":
			e.IterTime = new(int64(n))
		}
	}
	if !given {
		return nil
	}
	return &e
}

// amendVersion checks the compat value as QEMU's qcow2_amend_options does
// (after the progress starts): 0 when not given.
func amendVersion(compat *string) (uint32, error) {
	if compat == nil {
		return 0, nil
	}
	switch *compat {
	case "0.10", "v2":
		return 2, nil
	case "1.1", "v3":
		return 3, nil
	}
	return 0, fmt.Errorf("Unknown compatibility level %s", *compat)
}

// parseAmendNumber parses a QemuOpts number as strtoull does: 0x and 0
// prefixes, a leading minus wraps around; an error wraps strconv.ErrRange
// when the value does not fit.
func parseAmendNumber(v string) (uint64, error) {
	if strings.Contains(v, "_") {
		return 0, strconv.ErrSyntax
	}
	n, err := strconv.ParseUint(strings.TrimPrefix(v, "-"), 0, 64)
	if err != nil {
		return 0, err
	}
	if strings.HasPrefix(v, "-") {
		n = -n
	}
	return n, nil
}
