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

// CacheMode is qemu-img's -t cache mode.
type CacheMode int

// Cache modes, as in qemu-img: O_DIRECT or not, and what a flush does.
const (
	CacheWriteback    CacheMode = iota // page cache; flush syncs
	CacheNone                          // O_DIRECT; flush syncs
	CacheWritethrough                  // page cache; every write is FUA
	CacheDirectsync                    // O_DIRECT; every write is FUA
	CacheUnsafe                        // page cache; flushes are ignored
)

var cacheNames = []string{"writeback", "none", "writethrough", "directsync", "unsafe"}

func (c CacheMode) String() string {
	if int(c) < len(cacheNames) {
		return cacheNames[c]
	}
	return "invalid"
}

// Direct reports whether the mode bypasses the page cache (O_DIRECT).
func (c CacheMode) Direct() bool { return c == CacheNone || c == CacheDirectsync }

// ParseCacheMode parses a -t argument ("off" is accepted as "none", as
// qemu-img does).
func ParseCacheMode(s string) (CacheMode, error) {
	if s == "off" {
		return CacheNone, nil
	}
	for i, n := range cacheNames {
		if s == n {
			return CacheMode(i), nil
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
	// Options are driver options (format and protocol), like -o / --image-opts.
	Options Options
	Cache   CacheMode
	// ReadOnly opens the image, and everything below it, read-only.
	ReadOnly bool
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
}

// ErrNoFile wraps the error of an image that does not exist.
var ErrNoFile = errors.New("no such file")

// ErrLocked is matched by the error of an image another process holds: its
// lock forbids what this open needs (QEMU's "Failed to get \"write\" lock").
var ErrLocked = errors.New("image is locked by another process")

// Open opens the image described by spec: a protocol node for the file, the
// format node over it (probed when spec.Format is empty), and the backing
// chain the image names, each backing file read-only, resolved relative to
// the directory of the image that names it, and opened with the format that
// image records (probed only when it records none).
func Open(co *coroutine.Co, spec Spec) (*Node, error) {
	protoName := "file"
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
			protoName = f.Name
		}
	}
	if name, _, ok := strings.Cut(spec.Filename, "://"); ok {
		// QEMU's protocol syntax: null-co://, file://...
		if f, err := LookupFormat(name); err == nil && f.Protocol {
			protoName = name
		}
	}
	proto, err := openProtocol(co, protoName, spec)
	if err != nil {
		return nil, err
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
		return proto, nil
	}
	n := &Node{Filename: spec.Filename, Format: f, File: proto, ReadOnly: spec.ReadOnly, NoIO: spec.NoIO, Cache: spec.Cache}
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
			Cache:    spec.Cache,
			ReadOnly: true,
			NoIO:     spec.NoIO,
			Options:  spec.Options.ChainOptions(),
			// Only what the user addressed to the backing file.
			CheckOptions: spec.CheckOptions,
		}
		b, err := Open(co, bspec)
		if err != nil {
			n.Close(co)
			return nil, fmt.Errorf("could not open backing file: %w", BackingOpenReason(err))
		}
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

// CheckNodeOptions refuses the options in opts that no node of the open
// image n uses, as Spec.CheckOptions does at the open, for callers that
// open with further options of their own.
func CheckNodeOptions(n *Node, opts Options) error {
	proto := n.File
	if proto == nil {
		proto = n
	}
	if err := checkOptions(n, proto, opts, n.Backing != nil); err != nil {
		return &FormatOpenError{Filename: n.Filename, Err: err}
	}
	return nil
}

// OptionError is the refusal of options that no node uses
// (Spec.CheckOptions).
type OptionError struct{ Msg string }

func (e *OptionError) Error() string { return e.Msg }

// commonOptions are the options of every node (QEMU's bdrv_runtime_opts
// and the ones this layer adds), which no driver lists.
var commonOptions = []string{"node-name", "driver", "read-only", "auto-read-only", "cache.", "discard",
	"detect-zeroes", OptForceShare, OptLocking}

// checkOptions refuses the options in opts that neither the format node
// n, nor its protocol node proto ("file.*"), nor an opened backing file
// ("backing.*", when backing) uses, in QEMU's words.
func checkOptions(n, proto *Node, opts Options, backing bool) error {
	fl, ok := n.drv.(OptionLister)
	if !ok {
		return nil
	}
	pl, _ := proto.drv.(OptionLister)
	for _, k := range slices.Sorted(maps.Keys(opts)) {
		if sub, ok := strings.CutPrefix(k, "file."); ok {
			if pl != nil && !hasOption(pl.OpenOptions(), sub) && !hasOption(commonOptions, sub) {
				return &OptionError{fmt.Sprintf("Block protocol '%s' doesn't support the option '%s'", proto.Format.Name, sub)}
			}
			continue
		}
		if strings.HasPrefix(k, "backing.") && backing {
			continue // checked by the backing file's open
		}
		if !hasOption(fl.OpenOptions(), k) && !hasOption(commonOptions, k) {
			return &OptionError{fmt.Sprintf("Block format '%s' does not support the option '%s'", n.Format.Name, k)}
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

func openProtocol(co *coroutine.Co, name string, spec Spec) (*Node, error) {
	f, err := LookupFormat(name)
	if err != nil {
		return nil, fmt.Errorf("bdrv: protocol driver %q is not registered: %w", name, err)
	}
	n := &Node{Filename: spec.Filename, Format: f, ReadOnly: spec.ReadOnly, Cache: spec.Cache}
	drv, err := f.Open(co, n, spec.Options)
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
