package img

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// openSpec says how an operation opens one image.
type openSpec struct {
	filename string
	format   string // "" probes
	cache    bdrv.CacheMode
	readOnly bool
	// noBacking leaves the backing chain closed: info walks it itself, and
	// nothing else needs it for metadata-only work.
	noBacking bool
	// ownBacking: the caller opens the backing chain itself, with the
	// image's "backing." options (commit).
	ownBacking bool
	// noIO opens for metadata only: an encrypted image needs no key.
	noIO bool
	// unmap opens with QEMU's BDRV_O_UNMAP, as commit and convert's
	// target do: discards and write-zeroes deallocate unless the discard
	// option says otherwise.
	unmap bool
	// shareWrite lets other processes write and resize the image
	// meanwhile (bdrv.Spec.ShareWrite), as qemu-img resize does.
	shareWrite bool
	options    bdrv.Options
}

// openImage opens an image and words failures as qemu-img's img_open does:
// "Could not open 'x': <reason>". An image opened for writing that its
// read-only option made read-only is refused, as QEMU's permission check
// refuses it.
func openImage(co *coroutine.Co, s openSpec) (*bdrv.Node, error) {
	display, err := resolveImageOpts(&s)
	if err != nil {
		return nil, openError(display, err)
	}
	if s.format != "" {
		if _, err := bdrv.LookupFormat(s.format); err != nil {
			return nil, openError(display, errors.New("Unknown driver '"+s.format+"'"))
		}
	}
	n, err := bdrv.Open(co, bdrv.Spec{
		Filename:  s.filename,
		Format:    s.format,
		Options:   s.options,
		Cache:     s.cache,
		ReadOnly:  s.readOnly,
		NoUnmap:   !s.unmap,
		NoBacking: s.noBacking,
		NoIO:      s.noIO,
		// The options of an --image-opts string are the user's: QEMU
		// refuses those no node uses.
		CheckOptions: display != s.filename,
		OwnBacking:   s.ownBacking,
		ShareWrite:   s.shareWrite,
	})
	if err != nil {
		if display != s.filename {
			err = &renamedError{err, "could not open '" + s.filename + "': "}
		}
		return nil, openError(display, err)
	}
	if n.ReadOnly && !s.readOnly {
		n.Close(co)
		return nil, openError(display, bdrv.ErrReadOnlyNode)
	}
	return n, nil
}

// renamedError drops the layers' "could not open 'file': " prefix from an
// error whose image is named by its --image-opts string instead.
type renamedError struct {
	err    error
	prefix string
}

func (e *renamedError) Error() string { return strings.TrimPrefix(e.err.Error(), e.prefix) }
func (e *renamedError) Unwrap() error { return e.err }

// OpenError is a failure to open an image. Its message is qemu-img's
// "Could not open 'name': reason"; Unwrap gives the cause (an errno where
// there is one, for errors.Is).
type OpenError struct {
	Filename string
	Err      error
}

func (e *OpenError) Error() string {
	return "Could not open '" + e.Filename + "': " + reason(e.Filename, e.Err)
}

func (e *OpenError) Unwrap() error { return e.Err }

func openError(filename string, err error) error {
	return &OpenError{Filename: filename, Err: err}
}

// reason is err's message without the "could not open 'name': " prefixes
// that the layers below already added (qemu-img 7.2 repeats them, "Could
// not open 'x': Could not open 'x': No such file or directory"; ublkimg says
// it once).
func reason(filename string, err error) string {
	msg := err.Error()
	for _, p := range []string{"Could not open '" + filename + "': ", "could not open '" + filename + "': "} {
		for strings.HasPrefix(msg, p) {
			msg = msg[len(p):]
		}
	}
	if msg == "" {
		return Strerror(err)
	}
	// bdrv words a failed backing open in lower case; qemu-img's
	// bdrv_open_backing_file says "Could not open backing file: ...".
	return strings.ReplaceAll(msg, "could not open backing file: ", "Could not open backing file: ")
}

// backingReason is openImage's failure to open the backing file name as
// QEMU words it after "Could not open backing file: ": only the protocol's
// own failure to open the file names it ("Could not open 'b': No such file
// or directory"); a format driver's refusal ("Parameter
// 'encrypt.key-secret' is required for cipher"), a lock held by another
// process ("Failed to get \"write\" lock") and a failure further down the
// chain ("Could not open backing file: ...") do not.
func backingReason(name string, err error) string {
	var oe *OpenError
	if errors.As(err, &oe) && (bdrv.BackingOpenReason(oe.Err) != oe.Err || !namesFile(oe.Err, name)) {
		return reason(name, oe.Err)
	}
	return err.Error()
}

// namesFile reports whether err's message starts by naming the file.
func namesFile(err error, name string) bool {
	return strings.HasPrefix(strings.ToLower(err.Error()), strings.ToLower("Could not open '"+name+"': "))
}

// newBackingOpenError is QEMU's "Could not open backing file: <reason>" for
// a failure of openImage to open a backing file, depth levels below the
// first (QEMU opens a chain recursively, each level adding its prefix).
func newBackingOpenError(name string, depth int, err error) error {
	return &wordedError{strings.Repeat("Could not open backing file: ", depth+1) + backingReason(name, err), err}
}

// wordedError is err as qemu-img words it. It unwraps to err, so that
// errors.Is still finds the cause, and a lock error its hint.
type wordedError struct {
	msg string
	err error
}

func (e *wordedError) Error() string { return e.msg }

func (e *wordedError) Unwrap() error { return e.err }

// Strerror is the C library's text for the errno in err's chain ("No space
// left on device"), or err's own message when it carries none. qemu-img
// prints I/O errors as strerror(-ret); Go's errno texts are the same
// strings in lower case.
func Strerror(err error) string {
	var errno unix.Errno
	if errors.As(err, &errno) {
		return capitalize(errno.Error())
	}
	return err.Error()
}

func capitalize(s string) string {
	if s != "" && s[0] >= 'a' && s[0] <= 'z' {
		return string(s[0]-'a'+'A') + s[1:]
	}
	return s
}

// qemuLength is the image length as qemu-img sees it: QEMU keeps lengths in
// 512-byte sectors (bdrv_getlength rounds up), so a 1000-byte raw file is a
// 1024-byte image for info, convert, compare and bench alike; the part past
// the file's end reads as zeros.
func qemuLength(n *bdrv.Node) int64 {
	return alignUp(n.Length(), sectorSize)
}

// sectorSize is BDRV_SECTOR_SIZE: the unit of qemu-img's convert and
// compare bookkeeping.
const sectorSize = 512

func alignUp(x, a int64) int64   { return (x + a - 1) / a * a }
func alignDown(x, a int64) int64 { return x / a * a }

// recoverTo, deferred in a coroutine, turns a panic into an error handed to
// fail: a bug then ends the operation with a one-line message instead of
// taking the loop (and the tool) down with a stack trace.
func recoverTo(fail func(error)) {
	if r := recover(); r != nil {
		fail(fmt.Errorf("internal error: %v", r))
	}
}

// Guard runs fn and turns a panic in it into an error, for the top-level
// coroutine of an operation.
func Guard(fn func() error) (err error) {
	defer recoverTo(func(e error) { err = e })
	return fn()
}
