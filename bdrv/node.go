package bdrv

import (
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"ublkimg/coroutine"
)

// CacheMode is a node's cache mode: qemu-img's -t, which sets all three of
// its properties, and the cache.direct and cache.no-flush open options,
// which set one each (QEMU's BDRV_O_NOCACHE and BDRV_O_NO_FLUSH; the
// write-through property is the BlockBackend's enable_write_cache there).
type CacheMode int

// The properties a cache mode combines.
const (
	// cacheDirect bypasses the page cache (O_DIRECT).
	cacheDirect CacheMode = 1 << iota
	// cacheNoFlush ignores flushes: the protocol node never syncs.
	cacheNoFlush
	// cacheWritethrough makes every write FUA.
	cacheWritethrough
)

// The cache modes -t names, as in qemu-img.
const (
	CacheWriteback    CacheMode = 0                               // page cache; flush syncs
	CacheNone                   = cacheDirect                     // O_DIRECT; flush syncs
	CacheWritethrough           = cacheWritethrough               // page cache; every write is FUA
	CacheDirectsync             = cacheDirect | cacheWritethrough // O_DIRECT; every write is FUA
	CacheUnsafe                 = cacheNoFlush                    // page cache; flushes are ignored
)

var cacheNames = []struct {
	mode CacheMode
	name string
}{
	{CacheWriteback, "writeback"}, {CacheNone, "none"}, {CacheWritethrough, "writethrough"},
	{CacheDirectsync, "directsync"}, {CacheUnsafe, "unsafe"},
}

// String is the -t name of the mode. The three combinations no name
// stands for (flushes ignored with O_DIRECT or write-through, which only
// the options make) read as the nearest name and the option that adds
// no-flush to it, "none,cache.no-flush=on".
func (c CacheMode) String() string {
	for _, n := range cacheNames {
		if n.mode == c {
			return n.name
		}
	}
	if c&^(cacheDirect|cacheNoFlush|cacheWritethrough) != 0 {
		return "invalid"
	}
	return (c &^ cacheNoFlush).String() + ",cache.no-flush=on"
}

// Direct reports whether the mode bypasses the page cache (O_DIRECT).
func (c CacheMode) Direct() bool { return c&cacheDirect != 0 }

// NoFlush reports whether flushes are ignored (cache.no-flush=on, unsafe).
func (c CacheMode) NoFlush() bool { return c&cacheNoFlush != 0 }

// Writethrough reports whether every write is made durable before it
// completes (writethrough, directsync).
func (c CacheMode) Writethrough() bool { return c&cacheWritethrough != 0 }

// with returns c with property p set or cleared.
func (c CacheMode) with(p CacheMode, on bool) CacheMode {
	if on {
		return c | p
	}
	return c &^ p
}

// ParseCacheMode parses a -t argument ("off" is accepted as "none", as
// qemu-img does).
func ParseCacheMode(s string) (CacheMode, error) {
	if s == "off" {
		return CacheNone, nil
	}
	for _, n := range cacheNames {
		if s == n.name {
			return n.mode, nil
		}
	}
	return 0, fmt.Errorf("invalid cache option: %s (writeback, none, writethrough, directsync, unsafe)", s)
}

// Format describes a driver: how to probe, open and create its nodes. Drivers
// register their Format from an init function with [Register].
type Format struct {
	Name string
	// Protocol drivers open a filename directly; format drivers open on top
	// of a protocol node (Node.File).
	Protocol bool
	// Probe scores how likely head (the first bytes of the file, at least
	// 512 unless the file is shorter) is this format: 0 = not at all,
	// 100 = certain. Nil for formats that are never probed.
	Probe func(head []byte, filename string) int
	// Open creates the driver for n. Format drivers find their protocol
	// node in n.File; they record the backing file the image names in
	// n.BackingFile and n.BackingFormat (bdrv opens it afterwards) and set
	// the node's length with n.SetLength.
	Open func(co *coroutine.Co, n *Node, opts Options) (Driver, error)
	// Create makes a new image.
	Create func(co *coroutine.Co, req *CreateRequest) error
	// CreateOptions are the -o options Create accepts.
	CreateOptions []OptionSpec
	// SupportsBacking is true for formats that can have a backing file.
	SupportsBacking bool
	// FilenamePrefix, for a protocol whose file names start with it
	// ("rbd:"), makes it the protocol of every such name: a format
	// opening or creating its "file" there gets this protocol instead.
	FilenamePrefix string
	// DataOnly formats keep nothing of their own in their file (raw): they
	// write it only when their user writes, so a reader may open one
	// read-write over a read-only file (QEMU's raw passes its parent's
	// permissions through).
	DataOnly bool
	// StrongOptions are the open options that change what an image reads
	// as (QEMU's strong_runtime_opts): info names an image opened with
	// one of them by its options ("json:{...}") rather than by its file.
	StrongOptions []string
	// CompressedWrites is true for formats whose images can take
	// ReqWriteCompressed writes (QEMU's block_driver_can_compress), so
	// that convert -c refuses the others before it creates the target.
	CompressedWrites bool

	// The format's operations on images that are not open as its nodes
	// (driver.go has the capabilities of open ones). Nil where the
	// format has none.

	// Check checks and repairs an image of the format (qemu-img check).
	Check CheckFunc
	// Measure computes the file size of a new image of the format
	// (qemu-img measure).
	Measure MeasureFunc
}

// OptionLister is implemented by drivers that say which open options they
// honour, so that Spec.CheckOptions can refuse the others: names, and
// "prefix." entries standing for every option under them. Drivers without
// it accept anything.
type OptionLister interface {
	OpenOptions() []string
}

// CreateRequest is what [Create] passes to a format's Create.
type CreateRequest struct {
	Filename string
	Size     int64
	Options  Options // validated against the format's CreateOptions
}

var formats struct {
	sync.RWMutex
	byName map[string]*Format
}

// Register makes a format known. It panics on a duplicate name: that is a
// programming error.
func Register(f *Format) {
	formats.Lock()
	defer formats.Unlock()
	if formats.byName == nil {
		formats.byName = make(map[string]*Format)
	}
	if _, dup := formats.byName[f.Name]; dup {
		panic("bdrv: format registered twice: " + f.Name)
	}
	formats.byName[f.Name] = f
}

// LookupFormat finds a registered format by name.
func LookupFormat(name string) (*Format, error) {
	formats.RLock()
	defer formats.RUnlock()
	if f := formats.byName[name]; f != nil {
		return f, nil
	}
	return nil, fmt.Errorf("unknown file format '%s'", name)
}

// FormatNames lists the registered image formats (not protocols), sorted.
func FormatNames() []string {
	formats.RLock()
	defer formats.RUnlock()
	var names []string
	for n, f := range formats.byName {
		if !f.Protocol {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names
}

// Node is one node of the block graph: a driver instance plus the generic
// state the block layer keeps for it (QEMU's BlockDriverState).
type Node struct {
	// Filename is the file the node (or its protocol child) opened.
	Filename string
	// Format is the node's driver description.
	Format *Format
	// File is a format node's protocol child; nil for protocol nodes.
	File *Node
	// Backing is the backing node, nil without one.
	Backing *Node
	// BackingFile and BackingFormat are what the image header names, as
	// written (BackingFile may be relative to the image's directory).
	BackingFile, BackingFormat string
	// ReadOnly nodes refuse writes with EROFS.
	ReadOnly bool
	// NoIO: the node was opened for metadata only (Spec.NoIO).
	NoIO bool
	// Cache is the cache mode the node was opened with.
	Cache CacheMode
	// Unmap is QEMU's BDRV_O_UNMAP (discard=unmap): discard requests
	// deallocate. Without it (discard=ignore), Pdiscard does nothing, and
	// the node's parent cannot make its write-zeroes deallocate.
	Unmap bool
	// DetectZeroes says whether writes of zeros become write-zeroes.
	DetectZeroes DetectZeroes
	// NodeName is the node-name option, "" without one.
	NodeName string
	// AutoReadOnly lets a protocol driver open its file read-only, and
	// make the node read-only, when it may not write it (QEMU's
	// auto-read-only=on with read-only=off). The opener sets it only
	// where the node's users only read: a writer's open fails as it
	// would without the option, as in QEMU, whose file-posix reopens the
	// file read-write for a writer.
	AutoReadOnly bool

	// child: the node is a format node's file or a backing file, which
	// its parent's driver writes to.
	child bool

	drv    Driver
	limits Limits
	// writeFlags are the flags drv.Pwritev handles itself.
	writeFlags ReqFlags
	// tracker is drv as a WriteTracker, or nil.
	tracker WriteTracker
	length  atomic.Int64

	// Request tracking for read-modify-write serialisation (tracked.go).
	tracked trackedList

	// Drain: requests in flight and the coroutines waiting for none.
	inFlight atomic.Int64
	drainers atomic.Int64
	drainMu  coroutine.Mutex
	drainQ   coroutine.Queue

	// Flush generations: writeGen counts completed writes, flushedGen is
	// writeGen as of the start of the last successful flush.
	writeGen   atomic.Uint64
	flushedGen uint64 // guarded by flushMu
	flushMu    coroutine.Mutex

	closed bool
}

// Driver returns the node's driver instance, for callers that need a
// format-specific capability (snapshots, check, info).
func (n *Node) Driver() Driver { return n.drv }

// Limits are the node's I/O limits after refresh.
func (n *Node) Limits() Limits { return n.limits }

// Length is the node's size in bytes.
func (n *Node) Length() int64 { return n.length.Load() }

// Mappable reports whether MappedRange may hand out the node's data (a raw
// image in tmpfs): ublk devices of such nodes use user copy.
func (n *Node) Mappable() bool {
	m, ok := n.drv.(Mapper)
	return ok && m.Mappable()
}

// MappedRange returns the node's data [off, off+bytes) as memory, when its
// driver can hand it out (Mapper) and the range lies within the node; nil
// otherwise. The caller copies from it at once, without yielding: it is
// not a request (drains do not wait for it), the bytes are the image's
// current ones, and a copy that a concurrent truncation outran fails
// with EFAULT, after which the caller reads with Preadv.
func (n *Node) MappedRange(off, bytes int64) []byte {
	m, ok := n.drv.(Mapper)
	if !ok || off < 0 || bytes <= 0 || off+bytes > n.Length() {
		return nil
	}
	return m.MappedRange(off, bytes)
}

// SectorLength is the node's size as QEMU's bdrv_getlength reports it:
// QEMU keeps lengths in 512-byte sectors, so a 1000-byte raw file is a
// 1024-byte image to qemu-img's verbs; the part past the file's end reads
// as zeros.
func (n *Node) SectorLength() int64 { return alignUp(n.Length(), 512) }

// SetLength records the node's size; drivers call it when they open,
// truncate or grow.
func (n *Node) SetLength(size int64) { n.length.Store(size) }

// growLength raises the recorded length to at least end (a protocol node
// written past its end).
func (n *Node) growLength(end int64) {
	for {
		cur := n.length.Load()
		if end <= cur || n.length.CompareAndSwap(cur, end) {
			return
		}
	}
}

// RefreshLimits asks the driver for its limits again (after an option or
// child changed) and derives the generic defaults.
func (n *Node) RefreshLimits() {
	l := Limits{}
	if r, ok := n.drv.(LimitsRefresher); ok {
		l = r.RefreshLimits()
	}
	if l.RequestAlignment <= 0 {
		l.RequestAlignment = 1
	}
	// Like QEMU, a format node inherits its data child's transfer and
	// memory limits but not its request alignment: the child's generic
	// layer pads what the format sends it.
	if c := n.File; c != nil {
		if c.limits.MaxTransfer > 0 && (l.MaxTransfer == 0 || c.limits.MaxTransfer < l.MaxTransfer) {
			l.MaxTransfer = c.limits.MaxTransfer
		}
		l.MinMemAlignment = max(l.MinMemAlignment, c.limits.MinMemAlignment)
	}
	if l.MaxTransfer > 0 {
		l.MaxTransfer = alignDown(l.MaxTransfer, l.RequestAlignment)
	}
	n.limits = l
	n.writeFlags = 0
	if w, ok := n.drv.(WriteFlagser); ok {
		n.writeFlags = w.SupportedWriteFlags()
	}
	n.tracker, _ = n.drv.(WriteTracker)
}

// Spec says what to open: the image file, its format and options.
type Spec struct {
	Filename string
	// Format is the image format; "" probes it.
	Format string
	// Options are the node's open options, like -o / --image-opts: the
	// format's and the common ones of every node (read-only, cache.direct,
	// cache.no-flush, discard, detect-zeroes, force-share, ...), "file."
	// ones for the protocol node below a format, "backing." ones for the
	// backing file. The common options override the fields below.
	Options Options
	Cache   CacheMode
	// ReadOnly opens the image, and everything below it, read-only,
	// unless the read-only option says otherwise. A caller that must
	// write checks the node's ReadOnly: the option may have made it
	// read-only (QEMU's "Block node is read-only").
	ReadOnly bool
	// NoUnmap opens the image without QEMU's BDRV_O_UNMAP, as qemu-img's
	// verbs other than commit and convert's target do: discards are
	// ignored (and detect-zeroes=unmap is refused) unless the discard
	// option says otherwise. Its protocol node and backing files still
	// unmap (QEMU's children default to discard=unmap).
	NoUnmap bool
	// NoBacking leaves the backing file closed (qemu-img's -u, info without
	// --backing-chain errors).
	NoBacking bool
	// NoIO opens the image to read its metadata only, without guest I/O
	// (QEMU's BDRV_O_NO_IO, which qemu-img info uses): drivers may then skip
	// what only guest I/O needs, such as unlocking encryption.
	NoIO bool
	// CheckOptions refuses options that no node opened uses, as QEMU
	// refuses the options of --image-opts or -o left over after the open
	// ("Block format 'qcow2' does not support the option 'foo'").
	CheckOptions bool
	// OwnBacking, with NoBacking, says that the caller opens the backing
	// chain itself with the "backing." options, so CheckOptions leaves
	// them to it.
	OwnBacking bool
	// ShareWrite lets other processes write and resize the image while it
	// is open, as qemu-img resize does: a raw image then opens beside a
	// writer that shares writing too (qemu-io -f raw). A format with
	// metadata in its file never shares that file's writing.
	ShareWrite bool
}

// ErrNoFile wraps the error of an image that does not exist.
var ErrNoFile = errors.New("no such file")

// ErrLocked is matched by the error of an image another process holds: its
// lock forbids what this open needs (QEMU's "Failed to get \"write\" lock").
var ErrLocked = errors.New("image is locked by another process")

// ErrReadOnlyNode is the refusal to open a node read-write over a
// read-only one, and, for callers that check Node.ReadOnly, to write a
// node that its read-only option made read-only (QEMU's permission error).
var ErrReadOnlyNode = errors.New("Block node is read-only")

// Open opens the image described by spec: a protocol node for the file, the
// format node over it (probed when spec.Format is empty), and the backing
// chain the image names, each backing file read-only, resolved relative to
// the directory of the image that names it, and opened with the format that
// image records (probed only when it records none). Options apply per
// node as in QEMU: the common ones at the top to the format node, "file."
// ones to its protocol node, "backing." ones to the backing file; the
// protocol node and the backing file inherit the format node's cache
// properties and force-share, the protocol node its read-only too.
func Open(co *coroutine.Co, spec Spec) (*Node, error) {
	return (&opener{names: map[string]bool{}}).open(co, spec)
}

// opener is one Open of a graph: the node names it gave out, which QEMU
// refuses to repeat.
type opener struct{ names map[string]bool }

func (o *opener) open(co *coroutine.Co, spec Spec) (*Node, error) {
	protoName := "file"
	topIsProto := false
	if d := spec.Options["file.driver"]; d != "" {
		// --image-opts driver=FMT,file.driver=PROTO,file.NAME=...
		if f, err := LookupFormat(d); err == nil && f.Protocol {
			protoName = d
		}
	}
	if p := prefixedProtocol(spec.Filename); p != nil {
		protoName = p.Name
		if spec.Format == "file" {
			spec.Format = p.Name
		}
	}
	if spec.Format != "" {
		if f, err := LookupFormat(spec.Format); err == nil && f.Protocol {
			protoName, topIsProto = f.Name, true
		}
	}
	if name, _, ok := strings.Cut(spec.Filename, "://"); ok {
		// QEMU's protocol syntax: null-co://, file://...
		if f, err := LookupFormat(name); err == nil && f.Protocol {
			protoName = name
		}
	}
	flags := nodeFlags{readOnly: spec.ReadOnly, cache: spec.Cache, unmap: !spec.NoUnmap}
	if topIsProto {
		proto, err := o.openProtocol(co, protoName, spec.Filename, spec.Options, flags, spec.ReadOnly)
		if err != nil {
			return nil, err
		}
		// A caller that only reads (Spec.ReadOnly) claims a reader's
		// permissions even when the read-only option opened the file
		// read-write: they are its user's, as QEMU's BlockBackend
		// takes them.
		if err := setPerm(co, proto, usePerm(spec, proto.ReadOnly || spec.ReadOnly), sharedPerm(spec)); err != nil {
			return nil, err
		}
		if spec.CheckOptions {
			if err := checkProtocolOptions(proto, spec.Options, ""); err != nil {
				proto.Close(co)
				return nil, &FormatOpenError{Filename: spec.Filename, Err: err}
			}
		}
		return proto, nil
	}
	// The format node's own options are checked once its file is open, as
	// QEMU's bdrv_open_common does; the file inherits some of them first,
	// and those fail there, in the same words.
	cfg, cfgErr := parseNodeOptions(spec.Options, flags)
	// The file's users only read when the image is read-only, or when
	// the caller only reads a data-only format (raw) above it. Before
	// probing, the format is not known: its users may write.
	onlyRead := cfg.readOnly
	if f, err := LookupFormat(spec.Format); err == nil && f.DataOnly && spec.ReadOnly {
		onlyRead = true
	}
	proto, err := o.openProtocol(co, protoName, spec.Filename, spec.Options.FileOptions(), cfg.childFlags(), onlyRead)
	if err != nil {
		return nil, err
	}
	if cfgErr == nil {
		cfgErr = o.claimName(cfg.nodeName)
	}
	if cfgErr != nil {
		proto.Close(co)
		return nil, &FormatOpenError{Filename: spec.Filename, Err: cfgErr}
	}
	fmtName := spec.Format
	if fmtName == "" {
		if fmtName, err = probe(co, proto); err != nil {
			proto.Close(co)
			return nil, err
		}
	}
	f, err := LookupFormat(fmtName)
	if err != nil {
		proto.Close(co)
		return nil, err
	}
	if f.Protocol {
		if err := setPerm(co, proto, usePerm(spec, proto.ReadOnly), sharedPerm(spec)); err != nil {
			return nil, err
		}
		return proto, nil
	}
	if !cfg.readOnly && proto.ReadOnly && (!f.DataOnly || !spec.ReadOnly) {
		// A read-write format node writes its file (QEMU's write
		// permission on the file child), except a data-only one whose
		// user only reads.
		proto.Close(co)
		return nil, &FormatOpenError{Filename: spec.Filename, Err: ErrReadOnlyNode}
	}
	// The file's permissions are what the format node needs of it, not
	// what the file was opened for: a read-only image over a file opened
	// read-write (file.read-only=off) claims a reader's, and so does a
	// read-write raw image that the caller only reads (raw needs of its
	// file what its own users need).
	onlyRead = cfg.readOnly || proto.ReadOnly || f.DataOnly && spec.ReadOnly
	if err := setPerm(co, proto, usePerm(spec, onlyRead), childShared(f, sharedPerm(spec))); err != nil {
		return nil, err
	}
	proto.child = true
	n := &Node{Filename: spec.Filename, Format: f, File: proto, ReadOnly: cfg.readOnly, NoIO: spec.NoIO, Cache: cfg.cache,
		Unmap: cfg.unmap, DetectZeroes: cfg.detectZeroes, NodeName: cfg.nodeName}
	drv, err := f.Open(co, n, spec.Options)
	if err != nil {
		proto.Close(co)
		return nil, &FormatOpenError{Filename: spec.Filename, Err: err}
	}
	n.drv = drv
	n.RefreshLimits()
	if n.BackingFile != "" && !spec.NoBacking {
		bspec := Spec{
			Filename: ResolveBacking(spec.Filename, n.BackingFile),
			Format:   n.BackingFormat,
			Cache:    cfg.childFlags().cache,
			ReadOnly: true,
			NoIO:     spec.NoIO,
			Options:  spec.Options.ChainOptions(),
			// Only what the user addressed to the backing file.
			CheckOptions: spec.CheckOptions,
		}
		b, err := o.open(co, bspec)
		if err != nil {
			n.Close(co)
			return nil, fmt.Errorf("could not open backing file: %w", BackingOpenReason(err))
		}
		b.child = true
		n.Backing = b
	}
	if spec.CheckOptions {
		var err error
		if n.BackingFile == "" && (!spec.NoBacking || spec.OwnBacking) && spec.Options.BackingOverridden() {
			// QEMU opens a backing file from the options alone, which
			// name no file.
			err = &OptionError{"could not open backing file: Must specify either driver or file"}
		} else {
			err = checkOptions(n, proto, spec.Options, n.Backing != nil || spec.OwnBacking)
		}
		if err != nil {
			n.Close(co)
			return nil, &FormatOpenError{Filename: spec.Filename, Err: err}
		}
	}
	return n, nil
}

// claimName records a node-name of the graph, refusing a second node of
// the same name.
func (o *opener) claimName(name string) error {
	if name == "" {
		return nil
	}
	if o.names[name] {
		return fmt.Errorf("Duplicate nodes with node-name='%s'", name)
	}
	o.names[name] = true
	return nil
}

// CheckNodeOptions refuses the options in opts that no node of the open
// image n uses, as Spec.CheckOptions does at the open, for callers that
// open with further options of their own.
func CheckNodeOptions(n *Node, opts Options) error {
	var err error
	if n.File == nil {
		err = checkProtocolOptions(n, opts, "")
	} else {
		err = checkOptions(n, n.File, opts, n.Backing != nil)
	}
	if err != nil {
		return &FormatOpenError{Filename: n.Filename, Err: err}
	}
	return nil
}

// OptionError is the refusal of options that no node uses
// (Spec.CheckOptions).
type OptionError struct{ Msg string }

func (e *OptionError) Error() string { return e.Msg }

// checkOptions refuses the options in opts that neither the format node
// n, nor its protocol node proto ("file.*"), nor an opened backing file
// ("backing.*", when backing) uses, in QEMU's words.
func checkOptions(n, proto *Node, opts Options, backing bool) error {
	fl, ok := n.drv.(OptionLister)
	if !ok {
		return nil
	}
	if err := checkProtocolOptions(proto, opts, "file."); err != nil {
		return err
	}
	for _, k := range slices.Sorted(maps.Keys(opts)) {
		if strings.HasPrefix(k, "file.") || strings.HasPrefix(k, "backing.") && backing {
			continue // the protocol node's, or checked by the backing file's open
		}
		if !hasOption(fl.OpenOptions(), k) && !hasOption(commonOptions, k) {
			return &OptionError{fmt.Sprintf("Block format '%s' does not support the option '%s'", n.Format.Name, k)}
		}
	}
	return nil
}

// checkProtocolOptions refuses the options in opts under prefix that the
// protocol node proto does not use.
func checkProtocolOptions(proto *Node, opts Options, prefix string) error {
	pl, ok := proto.drv.(OptionLister)
	if !ok {
		return nil
	}
	for _, k := range slices.Sorted(maps.Keys(opts)) {
		sub, ok := strings.CutPrefix(k, prefix)
		if ok && !hasOption(pl.OpenOptions(), sub) && !hasOption(commonOptions, sub) {
			return &OptionError{fmt.Sprintf("Block protocol '%s' doesn't support the option '%s'", proto.Format.Name, sub)}
		}
	}
	return nil
}

// hasOption reports whether name is in list, or under one of its
// "prefix." entries.
func hasOption(list []string, name string) bool {
	for _, o := range list {
		if o == name || strings.HasSuffix(o, ".") && strings.HasPrefix(name, o) {
			return true
		}
	}
	return false
}

// FormatOpenError is a format driver's refusal to open an image (bad
// header, missing key), named by its file.
type FormatOpenError struct {
	Filename string
	Err      error
}

func (e *FormatOpenError) Error() string {
	return "could not open '" + e.Filename + "': " + e.Err.Error()
}
func (e *FormatOpenError) Unwrap() error { return e.Err }

// BackingOpenReason is the failure to open a backing file as QEMU's
// bdrv_open_backing_file words it after "Could not open backing file: ":
// the file is named in protocol errors ("Could not open 'b': No such file
// or directory") but not in the format driver's ("Parameter
// 'encrypt.key-secret' is required for cipher").
func BackingOpenReason(err error) error {
	if fe, ok := err.(*FormatOpenError); ok {
		return fe.Err
	}
	return err
}

// ResolveBacking resolves a backing file name recorded in image the way QEMU
// does: absolute names and protocol URIs stay, relative names are relative
// to the directory of image.
func ResolveBacking(image, backing string) string {
	if filepath.IsAbs(backing) || HasProtocol(backing) {
		return backing
	}
	return filepath.Join(filepath.Dir(image), backing)
}

// HasProtocol reports whether name starts with a protocol ("rbd:",
// "null-co://"): a ':' before any '/', as QEMU's path_has_protocol decides.
// Such names are never relative to another image's directory.
func HasProtocol(name string) bool {
	i := strings.IndexAny(name, ":/")
	return i >= 0 && name[i] == ':'
}

// openProtocol opens the protocol node of filename with its options (the
// ones addressed to it and those it inherited) over flags. onlyRead says
// that the node's users only read it, whatever its read-only option: then
// auto-read-only may make it read-only.
func (o *opener) openProtocol(co *coroutine.Co, name, filename string, opts Options, flags nodeFlags, onlyRead bool) (*Node, error) {
	f, err := LookupFormat(name)
	if err != nil {
		return nil, fmt.Errorf("bdrv: protocol driver %q is not registered: %w", name, err)
	}
	cfg, err := parseNodeOptions(opts, flags)
	if err == nil {
		err = o.claimName(cfg.nodeName)
	}
	if err != nil {
		return nil, &FormatOpenError{Filename: filename, Err: err}
	}
	n := &Node{Filename: filename, Format: f, ReadOnly: cfg.readOnly, Cache: cfg.cache, Unmap: cfg.unmap,
		DetectZeroes: cfg.detectZeroes, NodeName: cfg.nodeName, AutoReadOnly: cfg.autoReadOnly && onlyRead}
	drv, err := f.Open(co, n, opts)
	if err != nil {
		return nil, err
	}
	n.drv = drv
	n.RefreshLimits()
	return n, nil
}

// probe picks the format whose Probe scores highest on the file's first
// bytes; raw scores 1 on anything, so it wins only when nothing else does.
func probe(co *coroutine.Co, proto *Node) (string, error) {
	head := make([]byte, 2048)
	size := min(int64(len(head)), proto.Length())
	head = head[:size]
	if size > 0 {
		al := proto.limits.RequestAlignment
		buf := head
		if al > 1 {
			buf = make([]byte, alignUp(size, al))
		}
		if err := proto.Preadv(co, 0, IOVec{buf}, 0); err != nil {
			return "", fmt.Errorf("could not read image header of '%s': %w", proto.Filename, err)
		}
		copy(head, buf)
	}
	formats.RLock()
	defer formats.RUnlock()
	best, bestScore := "", 0
	for name, f := range formats.byName {
		if f.Probe == nil {
			continue
		}
		if s := f.Probe(head, proto.Filename); s > bestScore || (s == bestScore && name < best) {
			best, bestScore = name, s
		}
	}
	if best == "" {
		return "", fmt.Errorf("could not determine the format of '%s'", proto.Filename)
	}
	return best, nil
}

// Close drains the node, flushes it, closes its driver and then its
// children. It returns the first error; everything is released regardless.
func (n *Node) Close(co *coroutine.Co) error {
	if n.closed {
		return nil
	}
	n.closed = true
	n.Drain(co)
	var errs []error
	if !n.ReadOnly {
		errs = append(errs, n.Flush(co))
	}
	errs = append(errs, n.drv.Close(co))
	if n.File != nil {
		errs = append(errs, n.File.Close(co))
	}
	if n.Backing != nil {
		errs = append(errs, n.Backing.Close(co))
	}
	return errors.Join(errs...)
}

// ForFilename returns f as it creates filename. qemu-img offers a
// format's create options together with those of the protocol the file is
// created with; raw has nothing but size of its own, so a raw image's
// options are its protocol's (an rbd image's cluster_size). Other formats
// keep theirs.
func (f *Format) ForFilename(filename string) *Format {
	p := prefixedProtocol(filename)
	if p == nil || f.Protocol || f.Name != "raw" {
		return f
	}
	c := *f
	c.CreateOptions = p.CreateOptions
	return &c
}

// prefixedProtocol returns the protocol whose FilenamePrefix starts
// filename, or nil.
func prefixedProtocol(filename string) *Format {
	formats.RLock()
	defer formats.RUnlock()
	for _, f := range formats.byName {
		if f.FilenamePrefix != "" && strings.HasPrefix(filename, f.FilenamePrefix) {
			return f
		}
	}
	return nil
}

// Create makes a new image of the named format. Creating a "file" whose
// name has a protocol's FilenamePrefix creates it with that protocol.
func Create(co *coroutine.Co, format string, req *CreateRequest) error {
	if p := prefixedProtocol(req.Filename); p != nil && format == "file" {
		format = p.Name
	}
	f, err := LookupFormat(format)
	if err != nil {
		return err
	}
	if f.Create == nil {
		return fmt.Errorf("format '%s' does not support image creation", format)
	}
	if req.Options, err = ParseOptions(f.ForFilename(req.Filename).CreateOptions, req.Options); err != nil {
		return err
	}
	return f.Create(co, req)
}

func alignDown(x, a int64) int64 { return x / a * a }
func alignUp(x, a int64) int64   { return (x + a - 1) / a * a }
