package img

import (
	"errors"
	"fmt"
	"io"
	"math/big"
	"strings"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// ResizeOptions are qemu-img resize's arguments.
type ResizeOptions struct {
	Filename string
	Format   string // -f; "" probes
	// Size is the size argument as given: an absolute size, or one to
	// add ("+1G") or take away ("-1G").
	Size string
	// Shrink (--shrink) allows making the image smaller.
	Shrink bool
	// Prealloc (--preallocation) is how the added part is allocated.
	Prealloc bdrv.Prealloc
	// Warn, if not nil, receives what qemu-img reports without failing:
	// bitmaps that could not be stored at the new size.
	Warn func(msg string)
}

// sizeMessage is what QEMU says about a size option it cannot parse
// (qemu-img prints it on three lines).
const sizeMessage = "Parameter 'size' expects a non-negative number below 2^64 " +
	"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively."

// errSizeNotPositive is qemu-img's message for a resulting size of 0 or
// less, or beyond 63 bits.
var errSizeNotPositive = errors.New("New image size must be positive")

// ParseResizeSize parses resize's size argument: the sign (+1 grow by, -1
// shrink by, 0 absolute) and the number. huge reports a number QEMU
// accepts but that does not fit in 63 bits, which fails later as a size
// that is not positive. The errors are qemu-img's.
func ParseResizeSize(s string) (sign int, n int64, huge bool, err error) {
	switch {
	case strings.HasPrefix(s, "+"):
		sign, s = 1, s[1:]
	case strings.HasPrefix(s, "-"):
		sign, s = -1, s[1:]
	}
	n, err = bdrv.ParseSize(s)
	if errors.Is(err, bdrv.ErrSizeTooLarge) {
		if below2to64(s) {
			return sign, 0, true, nil
		}
		return 0, 0, false, fmt.Errorf("Value '%s' is out of range for parameter 'size'", s)
	}
	if err != nil {
		return 0, 0, false, errors.New(sizeMessage)
	}
	return sign, n, false, nil
}

// below2to64 reports whether a well-formed size that is too large for 63
// bits is still below 2^64, the range of QEMU's size options.
func below2to64(s string) bool {
	s = strings.TrimSpace(s)
	i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(s)
	}
	r, ok := new(big.Rat).SetString(s[:i])
	if !ok {
		return false
	}
	shift := map[string]uint{"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}[strings.ToLower(s[i:])]
	r.Mul(r, new(big.Rat).SetInt(new(big.Int).Lsh(big.NewInt(1), shift)))
	v := new(big.Int).Quo(r.Num(), r.Denom())
	return v.Cmp(new(big.Int).Lsh(big.NewInt(1), 64)) < 0
}

// Resize changes the virtual size of an image as qemu-img resize does and
// prints "Image resized." to out (nil for -q). The new size is exact;
// shrinking needs opts.Shrink, and preallocation is for growing only.
func Resize(co *coroutine.Co, opts ResizeOptions, out io.Writer) error {
	if out == nil {
		out = io.Discard
	}
	sign, n, huge, err := ParseResizeSize(opts.Size)
	if err != nil {
		return err
	}
	// qemu-img resize shares writing and resizing with other processes:
	// a raw image that qemu-io writes (and shares) is resized, while a
	// qcow2 image never shares its file's writing.
	node, err := openImage(co, openSpec{filename: opts.Filename, format: opts.Format, shareWrite: true})
	if err != nil {
		return err
	}
	cur := qemuLength(node)
	total := n
	if sign != 0 {
		total = cur + int64(sign)*n
	}
	switch {
	case huge || total <= 0:
		err = errSizeNotPositive
	case total <= cur && opts.Prealloc != bdrv.PreallocOff:
		err = errors.New("Preallocation can only be used for growing images")
	case total < cur && !opts.Shrink:
		// qemu-img adds a warning line: "Shrinking an image will delete
		// all data beyond the shrunken image's end. Before performing
		// such an operation, make sure there is no important data there."
		err = errors.New("Use the --shrink option to perform a shrink operation.")
	default:
		err = node.Truncate(co, total, true, opts.Prealloc)
		if errors.Is(err, bdrv.ErrNotSupported) && !hasTruncate(node) {
			err = errors.New("Image format driver does not support resize")
		} else if err != nil {
			err = errors.New(errText(err))
		}
	}
	cerr := node.Close(co)
	if err == nil && errors.Is(cerr, bdrv.ErrBitmapsLost) && !hasOtherError(cerr, bdrv.ErrBitmapsLost) {
		// qemu-img resizes and reports the bitmaps it could not
		// store at close (they stay in use in the image).
		if opts.Warn != nil {
			opts.Warn(cerr.Error())
		}
		cerr = nil
	}
	if err == nil && cerr != nil {
		err = fmt.Errorf("Failed to flush the resized image: %s", Strerror(cerr))
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "Image resized.\n")
	return nil
}

// hasOtherError reports whether err, possibly a join of several, holds an
// error that is not target.
func hasOtherError(err, target error) bool {
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return !errors.Is(err, target)
	}
	for _, e := range j.Unwrap() {
		if e != nil && hasOtherError(e, target) {
			return true
		}
	}
	return false
}

// errText is an error's message, or the C library's text for a bare errno.
func errText(err error) string {
	var errno unix.Errno
	if errors.As(err, &errno) && err.Error() == errno.Error() {
		return Strerror(err)
	}
	return err.Error()
}

func hasTruncate(n *bdrv.Node) bool {
	_, ok := n.Driver().(bdrv.Truncater)
	return ok
}
