// Package bdrv is ublkimg's generic block layer, after QEMU's block/io.c:
// a graph of nodes (a format node over a protocol node, plus a backing
// chain), the [Driver] contract that format and protocol drivers implement,
// and the services every driver gets for free: request checks, alignment
// padding with read-modify-write, serialisation of overlapping
// read-modify-write, max_transfer splitting, the write-zeroes fallback,
// FUA emulation, block status across a backing chain, flush generations and
// drain.
//
// All I/O entry points take a *coroutine.Co and may yield; they may be called
// from coroutines on any loop, concurrently. Errors on the I/O path carry an
// errno (unix.EIO, unix.ENOSPC, ...) so a ublk queue can complete the request
// with it; errors on the open/create path carry context for people.
package bdrv

import (
	"errors"

	"golang.org/x/sys/unix"

	"ublkimg/coroutine"
)

// ErrNotSupported is returned by optional driver operations that cannot do
// what was asked. The generic layer then falls back (write-zeroes becomes
// ordinary writes, FUA becomes a flush) or, for advisory operations such as
// discard, ignores it. It is ENOTSUP so it maps to an errno unchanged.
var ErrNotSupported error = unix.ENOTSUP

// ReqFlags modify a request (QEMU's BDRV_REQ_*).
type ReqFlags uint32

// Request flags, numbered as QEMU's BDRV_REQ_* for easy comparison.
const (
	// ReqZeroWrite marks a write-zeroes request.
	ReqZeroWrite ReqFlags = 0x2
	// ReqMayUnmap lets a write-zeroes request deallocate the range.
	ReqMayUnmap ReqFlags = 0x4
	// ReqFUA asks for the data to be durable when the request completes.
	ReqFUA ReqFlags = 0x10
	// ReqWriteCompressed asks a format driver to store the data compressed.
	ReqWriteCompressed ReqFlags = 0x20
	// ReqSerialising makes the request wait for every overlapping request
	// and makes overlapping requests wait for it.
	ReqSerialising ReqFlags = 0x80
	// ReqNoFallback makes write-zeroes fail with ErrNotSupported rather
	// than write a buffer of zeros.
	ReqNoFallback ReqFlags = 0x100
)

// StatusFlags describe a range in a block-status answer (QEMU's
// BDRV_BLOCK_*).
type StatusFlags uint32

// Block status flags.
const (
	// StatusData: the range's content is stored in this layer.
	StatusData StatusFlags = 0x01
	// StatusZero: the range reads as zeros.
	StatusZero StatusFlags = 0x02
	// StatusOffsetValid: Status.Map and Status.File give the range's host
	// location.
	StatusOffsetValid StatusFlags = 0x04
	// StatusRaw: the driver passes the range through to Status.File at
	// Status.Map unchanged; the generic layer asks that node instead.
	StatusRaw StatusFlags = 0x08
	// StatusAllocated: this layer decides the content (set by the
	// generic layer when StatusData or StatusZero is set).
	StatusAllocated StatusFlags = 0x10
	// StatusEOF: the range reaches the end of the node.
	StatusEOF StatusFlags = 0x20
	// StatusRecurse: ask Status.File whether the data range is zero
	// (qcow2 clusters preallocated with zeroes).
	StatusRecurse StatusFlags = 0x40
	// StatusCompressed: the data is stored compressed.
	StatusCompressed StatusFlags = 0x80
)

// Status is one block-status answer: the first Pnum bytes from the queried
// offset all have Flags.
type Status struct {
	Flags StatusFlags
	Pnum  int64 // bytes described, > 0 unless the query was at or past EOF
	Map   int64 // host offset in File, if StatusOffsetValid
	File  *Node // node holding the data, if StatusOffsetValid
	Depth int   // backing-chain depth of the answering layer (0 = top), from BlockStatusAbove
}

// Prealloc is a preallocation mode for create and truncate (qemu-img's
// preallocation= option).
type Prealloc int

// Preallocation modes.
const (
	PreallocOff Prealloc = iota
	PreallocMetadata
	PreallocFalloc
	PreallocFull
)

var preallocNames = []string{"off", "metadata", "falloc", "full"}

func (p Prealloc) String() string {
	if int(p) < len(preallocNames) {
		return preallocNames[p]
	}
	return "invalid"
}

// ParsePrealloc parses a preallocation mode name.
func ParsePrealloc(s string) (Prealloc, error) {
	for i, n := range preallocNames {
		if s == n {
			return Prealloc(i), nil
		}
	}
	return 0, errors.New("invalid preallocation mode '" + s + "' (off, metadata, falloc, full)")
}

// Limits are a node's I/O constraints (QEMU's BlockLimits). Zero values mean
// "no constraint" except where noted.
type Limits struct {
	// RequestAlignment is the granularity of offsets and lengths the driver
	// accepts (at least 1). The generic layer pads other requests.
	RequestAlignment int64
	// MinMemAlignment is the buffer address alignment the driver needs
	// without bouncing (O_DIRECT); informational for callers that allocate.
	MinMemAlignment int
	// MaxTransfer is the largest request the driver accepts; larger ones are
	// split. A multiple of RequestAlignment.
	MaxTransfer int64
	// OptTransfer is the preferred request size (e.g. the cluster size).
	OptTransfer int64
	// PwriteZeroesAlignment and MaxPwriteZeroes constrain write-zeroes.
	PwriteZeroesAlignment int64
	MaxPwriteZeroes       int64
	// PdiscardAlignment and MaxPdiscard constrain discard.
	PdiscardAlignment int64
	MaxPdiscard       int64
}

// Driver is one node's driver instance, created by [Format.Open]. It is
// QEMU's BlockDriver callbacks together with the state behind bs->opaque.
//
// The generic layer guarantees, for every call of the I/O group: off and
// iov.Len() are multiples of Limits().RequestAlignment; iov.Len() is at most
// Limits().MaxTransfer; the range lies within the node (reads) or was
// checked against it (writes); buffers may alias ublk or caller memory that
// stays valid until the call returns and must not be retained. Calls may
// overlap in time, from coroutines on different loops: the driver protects
// its own shared state (with coroutine locks when they are held across
// yields).
type Driver interface {
	// Preadv reads iov.Len() bytes at off into iov.
	Preadv(co *coroutine.Co, off int64, iov IOVec, flags ReqFlags) error
	// Pwritev writes iov at off. flags may contain ReqFUA only if
	// SupportedWriteFlags says so; the generic layer emulates the rest.
	Pwritev(co *coroutine.Co, off int64, iov IOVec, flags ReqFlags) error
	// Flush makes completed writes durable as far as this driver is
	// concerned: a format driver writes back its metadata caches, a protocol
	// driver syncs its file. The generic layer then flushes the node's file
	// child, so a format driver must not do that itself.
	Flush(co *coroutine.Co) error
	// Close writes back what needs writing (a format marks the image
	// clean) and releases resources. The node is drained and flushed first.
	Close(co *coroutine.Co) error
}

// Optional driver capabilities, discovered by type assertion.
type (
	// LimitsRefresher reports the driver's I/O limits; without it a node
	// has RequestAlignment 1 and no other limit.
	LimitsRefresher interface {
		RefreshLimits() Limits
	}
	// WriteFlagser says which request flags Pwritev handles natively
	// (ReqFUA); others are emulated.
	WriteFlagser interface {
		SupportedWriteFlags() ReqFlags
	}
	// ZeroWriter writes zeros efficiently. It may return ErrNotSupported,
	// and then the generic layer writes a zero buffer instead (unless the
	// caller passed ReqNoFallback). flags may include ReqMayUnmap, ReqFUA,
	// ReqNoFallback.
	ZeroWriter interface {
		PwriteZeroes(co *coroutine.Co, off, bytes int64, flags ReqFlags) error
	}
	// Discarder deallocates a range. Discard is advisory: ErrNotSupported
	// is ignored by the generic layer.
	Discarder interface {
		Pdiscard(co *coroutine.Co, off, bytes int64) error
	}
	// BlockStatuser reports allocation of this layer alone. Drivers
	// without it report data everywhere (protocols: at the same offset of
	// the node itself).
	BlockStatuser interface {
		BlockStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (Status, error)
	}
	// Truncater changes the node's length.
	Truncater interface {
		Truncate(co *coroutine.Co, size int64, exact bool, prealloc Prealloc) error
	}
	// ZeroTruncater grows the node with the new area reading as zeros
	// whatever the backing file holds there (QEMU's truncate with
	// BDRV_REQ_ZERO_WRITE). Node.Truncate asks for it when the backing
	// file is longer than the node was, so that growing shows no backing
	// data.
	ZeroTruncater interface {
		TruncateZeroed(co *coroutine.Co, size int64, exact bool, prealloc Prealloc) error
	}
	// AllocatedSizer reports the host bytes the node uses ("disk size").
	AllocatedSizer interface {
		AllocatedSize(co *coroutine.Co) (int64, error)
	}
	// ZeroIniter reports whether a freshly created node reads as zeros.
	ZeroIniter interface {
		HasZeroInit() bool
	}
	// WriteTracker is told the range of every write, write-zeroes and
	// discard request the node was given, once it ended (successfully or
	// not), as QEMU's bdrv_co_write_req_finish calls bdrv_set_dirty:
	// drivers that keep dirty bitmaps mark it. It runs on the I/O path,
	// possibly on several loops at once: it must not block or yield.
	WriteTracker interface {
		WriteDone(off, bytes int64)
	}
	// CounterReporter reports figures the driver keeps about its work
	// since the open (qcow2: metadata cache hits and misses, clusters
	// allocated, copy-on-write bytes), for `ublkimg stats` and the
	// metrics endpoint. It may be called from any goroutine while
	// requests run: the figures are read atomically, each on its own
	// (see StatCounter). Without it a node reports none.
	CounterReporter interface {
		Counters() []Counter
	}
	// Filter is implemented by the drivers of filter nodes (NewFilter):
	// FilteredChild is the node every request goes on to. Unfiltered
	// looks through filters with it.
	Filter interface {
		FilteredChild() *Node
	}
	// Mapper hands out the node's data as memory the caller copies from
	// (the file driver maps files in tmpfs): MappedRange returns the
	// bytes [off, off+bytes) or nil, and the caller reads with Preadv.
	// A ublk server with user copy hands them to the kernel, one copy
	// instead of two. See Node.MappedRange.
	Mapper interface {
		// Mappable reports whether MappedRange may hand out anything.
		Mappable() bool
		MappedRange(off, bytes int64) []byte
	}
)

// Optional capabilities of format drivers that the image verbs use (the
// qemu-img verbs of ublkimg/img: info, snapshot, commit, rebase, amend,
// bitmap, convert), after the bdrv_* calls QEMU's qemu-img makes on a node.
// A verb finds them by type assertion on Node.Driver() and never names a
// driver's type: a new format offers a verb by implementing its
// capability, and no verb changes. They use bdrv's types and built-in ones
// only. The format-level operations (check, measure) are fields of
// [Format] instead: they work without an open node of the format.
type (
	// ClusterSizer is implemented by formats that allocate in clusters
	// (info's "cluster_size: 65536"; convert and commit copy in its
	// units).
	ClusterSizer interface {
		ClusterSize() int64
	}
	// DirtyReporter is implemented by formats that record an unclean
	// shutdown (qcow2's dirty bit: info's "cleanly shut down: no").
	DirtyReporter interface {
		IsDirty() bool
	}
	// EncryptionReporter is implemented by formats that can be encrypted
	// (info's "encrypted: yes").
	EncryptionReporter interface {
		IsEncrypted() bool
	}
	// InfoProvider is implemented by formats with format-specific
	// information (qemu-img's ImageInfoSpecific, QEMU's
	// bdrv_get_specific_info). FormatSpecific returns its "data" member
	// as a generic tree that the verbs render, as JSON and as qemu-img's
	// indented text: a struct (or a pointer to one) whose exported fields
	// carry json tags named as the QAPI members ("compat",
	// "lazy-refcounts", ...), declared in schema order; fields are
	// strings, booleans, integers, nested structs, slices of these, or
	// pointers to them, a nil pointer or an "omitempty" zero value being
	// a member left out; a map[string]any is taken with its keys sorted.
	// Nil means none. The "type" member is the format's name.
	InfoProvider interface {
		FormatSpecific(co *coroutine.Co) (any, error)
	}
	// MakeEmptier is implemented by formats that can drop all of an
	// image's own data so that it reads through to its backing file
	// (QEMU's bdrv_make_empty). Commit empties the committed image with
	// it; formats without it keep their data, which then duplicates what
	// was committed (QEMU ignores ENOTSUP there the same way).
	MakeEmptier interface {
		MakeEmpty(co *coroutine.Co) error
	}
	// BackingFileChanger is implemented by formats that record a backing
	// file and can change it (QEMU's bdrv_change_backing_file): name ""
	// removes the backing file. It changes only the header and the node's
	// BackingFile and BackingFormat.
	BackingFileChanger interface {
		ChangeBackingFile(co *coroutine.Co, name, format string) error
	}
	// OptionNamer is implemented by protocol drivers whose nodes QEMU
	// names by their options ("json:{...}") rather than by a file name:
	// their file names are parsed into options at the open, and
	// bdrv_refresh_filename rebuilds the name from the strong ones (rbd;
	// info and map name such images so).
	OptionNamer interface {
		// NameOptions are the node's strong options, in the driver's
		// order.
		NameOptions() [][2]string
	}
	// Snapshotter (snapshot.go) is implemented by drivers that take
	// snapshots: formats with internal snapshots (qcow2), and protocols
	// whose storage has its own (rbd), which snapshot calls reach through
	// a raw format (SnapshotFallback).
	// Amender is implemented by formats whose options can be changed in
	// an existing image (qemu-img amend, QEMU's bdrv_amend_options).
	Amender interface {
		// AmendOptionSpecs are the options Amend takes (QEMU's
		// amend_opts) and those of creating an image (its create_opts):
		// qemu-img amend adds "This option is only supported for image
		// creation" to its refusal of an option string that the latter
		// would take.
		AmendOptionSpecs() (amend, create []OptionSpec)
		// Amend changes the image as opts say: names from the amend
		// specs, values of their type (the caller checked both). The
		// checks of the values, their order and wording, and the order
		// of the changes are the format's.
		Amend(co *coroutine.Co, opts Options, ctl AmendControl) error
	}
	// PersistentBitmaps is implemented by formats that store dirty bitmaps
	// in the image (QEMU's persistent BdrvDirtyBitmaps as qemu-img bitmap
	// and convert --bitmaps use them, through the block-dirty-bitmap-*
	// commands, and as the live jobs of ublkimg/jobs use them on a served
	// image). Changes are the image's, made in memory with the bitmap
	// marked in use on disk first, and stored by the time it is closed; a
	// bitmap that cannot be stored then makes Close fail with an error
	// matching ErrBitmapsLost. Errors are QEMU's messages ("Dirty bitmap
	// 'x' not found"). The methods take the driver's metadata lock, so
	// they may run while requests do; a caller that needs a change at a
	// point in time between two requests pauses the writers around it
	// (backup's TakeBitmap).
	PersistentBitmaps interface {
		// SupportsBitmaps reports whether the image can hold persistent
		// bitmaps (QEMU's bdrv_supports_persistent_dirty_bitmap).
		SupportsBitmaps() bool
		// DirtyBitmaps lists the image's bitmaps in its order.
		DirtyBitmaps(co *coroutine.Co) ([]DirtyBitmap, error)
		// AddBitmap adds an empty bitmap; granularity 0 takes the
		// format's default. A disabled bitmap does not track writes.
		AddBitmap(co *coroutine.Co, name string, granularity uint64, disabled bool) error
		// RemoveBitmap removes a bitmap, inconsistent ones included.
		RemoveBitmap(co *coroutine.Co, name string) error
		// ClearBitmap clears every bit.
		ClearBitmap(co *coroutine.Co, name string) error
		// SetBitmapEnabled starts or stops a bitmap tracking writes.
		SetBitmapEnabled(co *coroutine.Co, name string, enabled bool) error
		// CheckBitmap reports whether the bitmap exists and can be
		// used, with QEMU's error when it cannot.
		CheckBitmap(co *coroutine.Co, name string) error
		// ExportBitmap returns a usable bitmap's content.
		ExportBitmap(co *coroutine.Co, name string) (BitmapData, error)
		// MergeBitmap sets in bitmap dst every granule that touches a
		// dirty range of src, which may come from any image of the same
		// size, of any format and granularity (QEMU's
		// block-dirty-bitmap-merge).
		MergeBitmap(co *coroutine.Co, dst string, src BitmapData) error
		// TakeBitmap returns a usable bitmap's content, a copy that
		// stays valid, and clears the bitmap, in one step: a write that
		// completes after it is in the cleared bitmap, one before it in
		// the copy. A backup takes its bitmap so at its point in time,
		// and merges the copy back (MergeBitmap) if it fails.
		TakeBitmap(co *coroutine.Co, name string) (BitmapData, error)
	}
)
