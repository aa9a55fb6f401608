package img

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
)

// AmendOptions are qemu-img amend's arguments.
type AmendOptions struct {
	Filename string
	Format   string // -f; "" probes
	Options  string // -o, "key=value,..."
}

// creationOnly are the qcow2 create options amend refuses (QEMU's
// qcow2_amend_options: "This option is only supported for image creation").
var creationOnly = map[string]bool{
	"cluster_size": true, "extended_l2": true, "compression_type": true,
	"preallocation": true, "encryption": true, "nocow": true, "encrypt.format": true,
}

// Amend changes format options of an existing image as qemu-img amend does
// (qcow2: compat upgrade, lazy_refcounts, size). The errors are qemu-img's.
func Amend(co *coroutine.Co, opts AmendOptions) error {
	if opts.Options == "" {
		return errors.New("Must specify options (-o)")
	}
	var o qcow2.AmendOptions
	var size string
	for _, kv := range strings.Split(opts.Options, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch {
		case creationOnly[k]:
			return fmt.Errorf("Invalid parameter '%s'\nThis option is only supported for image creation", k)
		case k == "compat":
			switch v {
			case "0.10", "v2":
				o.Version = 2
			case "1.1", "v3":
				o.Version = 3
			default:
				return fmt.Errorf("Unknown compatibility level %s", v)
			}
		case k == "lazy_refcounts":
			b := v == "on"
			if v != "on" && v != "off" {
				return fmt.Errorf("Parameter 'lazy_refcounts' expects 'on' or 'off'")
			}
			o.LazyRefcounts = &b
		case k == "refcount_bits":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return fmt.Errorf("Parameter 'refcount_bits' expects a non-negative number below 2^64")
			}
			if n == 0 {
				return qcow2.ErrAmendRefcountW
			}
			o.RefcountBits = uint32(n)
		case k == "size":
			size = v
		case k == "backing_file", k == "backing_fmt", k == "data_file", k == "data_file_raw":
			return fmt.Errorf("Changing '%s' with amend is not supported by ublkimg yet", k)
		default:
			return fmt.Errorf("Invalid parameter '%s'", k)
		}
	}
	node, err := openImage(co, openSpec{filename: opts.Filename, format: opts.Format, noBacking: true})
	if err != nil {
		return err
	}
	q, ok := node.Driver().(*qcow2.Image)
	if !ok {
		node.Close(co)
		return fmt.Errorf("Format driver '%s' does not support option amendment", node.Format.Name)
	}
	err = q.Amend(co, o)
	if err == nil && size != "" {
		var n int64
		if n, err = bdrv.ParseSize(size); err == nil {
			err = node.Truncate(co, n, false, bdrv.PreallocOff)
		}
		if err != nil {
			err = errors.New(snapErrText(err))
		}
	}
	if cerr := node.Close(co); err == nil && cerr != nil {
		err = errors.New(snapErrText(cerr))
	}
	return err
}
