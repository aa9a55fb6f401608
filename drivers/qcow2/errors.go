// Package qcow2 implements the qcow2 image format.
//
// This part of the package is the pure on-disk layer: types and functions
// that decode, validate and encode the structures described in QEMU's
// docs/interop/qcow2.txt (header, header extensions, L1/L2 and refcount
// entries, snapshot table, bitmap directory). Nothing here does I/O or keeps
// state; callers read bytes and hand them in. Every size read from the image
// is validated before it is used to index or allocate, so hostile images give
// errors, never panics or huge allocations.
//
// Errors come in three kinds, following QEMU's split between the open path
// and the I/O path:
//
//   - *HeaderError: a header field or extension is invalid or unsupported
//     (QEMU's error_setg on open). It names the field and its value.
//   - *UnsupportedFeatureError: unknown incompatible feature bits, worded
//     like QEMU ("Unsupported qcow2 feature(s): ...").
//   - *CorruptError: metadata reached at run time is inconsistent (QEMU's
//     qcow2_signal_corruption); it carries the table and index.
//
// All of them match ErrInvalid, ErrUnsupported or ErrCorrupt with errors.Is.
package qcow2

import (
	"errors"
	"fmt"
)

// Sentinels for errors.Is. The concrete error types below carry the detail.
var (
	// ErrInvalid matches header errors caused by malformed or out-of-range
	// values (QEMU returns -EINVAL for these).
	ErrInvalid = errors.New("qcow2: invalid image")
	// ErrUnsupported matches errors for well-formed images that use something
	// this implementation (or QEMU) does not support (QEMU's -ENOTSUP).
	ErrUnsupported = errors.New("qcow2: unsupported image")
	// ErrCorrupt matches *CorruptError.
	ErrCorrupt = errors.New("qcow2: image is corrupt")
)

// HeaderError reports an invalid or unsupported value in the image header or
// its extensions. Field names the on-disk field as the specification spells
// it ("cluster_bits", "extension 0x6803f857"), Msg says what is wrong with
// it, including the offending value.
type HeaderError struct {
	Field       string
	Msg         string
	Unsupported bool // matches ErrUnsupported instead of ErrInvalid
}

// Error returns "qcow2: <field> <msg>".
func (e *HeaderError) Error() string {
	return "qcow2: " + e.Field + " " + e.Msg
}

// Is makes a HeaderError match ErrInvalid or ErrUnsupported.
func (e *HeaderError) Is(target error) bool {
	if e.Unsupported {
		return target == ErrUnsupported
	}
	return target == ErrInvalid
}

// notQcow2Error is an open's refusal of a file without qcow2's magic,
// worded as QEMU's qcow2_open words it; it unwraps to the *HeaderError.
type notQcow2Error struct{ err error }

func (e *notQcow2Error) Error() string { return "Image is not in qcow2 format" }
func (e *notQcow2Error) Unwrap() error { return e.err }

// openHeaderError is err from ParseHeader as an open reports it.
func openHeaderError(err error) error {
	var he *HeaderError
	if errors.As(err, &he) && he.Field == "magic" {
		return &notQcow2Error{err}
	}
	return err
}

func invalid(field, format string, args ...any) error {
	return &HeaderError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

func unsupported(field, format string, args ...any) error {
	return &HeaderError{Field: field, Msg: fmt.Sprintf(format, args...), Unsupported: true}
}

// UnsupportedFeatureError reports incompatible feature bits that this
// implementation does not know. Names holds the names the image's feature
// name table gives for some of those bits; Unknown holds the bits left
// without a name. The message matches QEMU's report_unsupported_feature, so
// scripts that grep for it keep working.
type UnsupportedFeatureError struct {
	Names   []string
	Unknown uint64
}

// Error returns QEMU's wording for the same condition.
func (e *UnsupportedFeatureError) Error() string {
	s := "Unsupported qcow2 feature(s): "
	for i, n := range e.Names {
		if i > 0 {
			s += ", "
		}
		s += n
	}
	if e.Unknown != 0 {
		if len(e.Names) > 0 {
			s += ", "
		}
		s += fmt.Sprintf("Unknown incompatible feature: %x", e.Unknown)
	}
	return s
}

// Is makes an UnsupportedFeatureError match ErrUnsupported.
func (e *UnsupportedFeatureError) Is(target error) bool { return target == ErrUnsupported }

// CorruptError reports inconsistent metadata found while using the image, in
// the spirit of QEMU's qcow2_signal_corruption call sites: What describes the
// problem (offsets in it are already formatted in hex), Table names the
// structure the bad entry was read from ("L2 table", "refcount block",
// "snapshot table"), Offset is that structure's offset in the image file and
// Index the entry's index in it. Table == "" means the location is unknown;
// Index < 0 means the error concerns the whole table.
type CorruptError struct {
	What   string
	Offset uint64
	Table  string
	Index  int64
}

// Error returns the description with the location, offsets in hex.
func (e *CorruptError) Error() string {
	s := "qcow2: image is corrupt: " + e.What
	if e.Table != "" {
		if e.Index >= 0 {
			s += fmt.Sprintf(" (%s offset: %#x, index: %#x)", e.Table, e.Offset, e.Index)
		} else {
			s += fmt.Sprintf(" (%s offset: %#x)", e.Table, e.Offset)
		}
	}
	return s
}

// Is makes a CorruptError match ErrCorrupt.
func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

func corrupt(table string, off uint64, index int64, format string, args ...any) error {
	return &CorruptError{What: fmt.Sprintf(format, args...), Table: table, Offset: off, Index: index}
}
