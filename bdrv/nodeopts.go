package bdrv

import (
	"fmt"
	"strings"
)

// The options every node takes, whatever its driver (QEMU's
// bdrv_runtime_opts). The opener's flags (Spec.ReadOnly, Spec.Cache,
// Spec.NoUnmap) are their defaults: an option given wins over them, as in
// QEMU, where update_flags_from_options overrides the open flags.
const (
	OptReadOnly     = "read-only"
	OptAutoReadOnly = "auto-read-only"
	OptCacheDirect  = "cache.direct"
	OptCacheNoFlush = "cache.no-flush"
	OptDiscard      = "discard"
	OptDetectZeroes = "detect-zeroes"
	OptNodeName     = "node-name"
)

// OptCrashSafeMetadata (not a QEMU option, hence the x- prefix) asks a
// format that caches metadata to write back what a request changed before
// the request completes, so that a server that dies loses no completed
// write while the host kernel (its page cache) survives (attach
// --recovery). Formats without metadata caches ignore it; it is an option
// of the format, not one of every node.
const OptCrashSafeMetadata = "x-crash-safe-metadata"

// commonOptions are the options of every node, which no driver lists.
var commonOptions = []string{OptNodeName, "driver", OptReadOnly, OptAutoReadOnly, OptCacheDirect, OptCacheNoFlush,
	OptDiscard, OptDetectZeroes, OptForceShare}

// DetectZeroes is a node's detect-zeroes mode: whether writes of zeros
// become write-zeroes requests (QEMU's bdrv_aligned_pwritev).
type DetectZeroes int

// The detect-zeroes modes.
const (
	DetectZeroesOff DetectZeroes = iota
	// DetectZeroesOn turns a write whose data is all zeros into a
	// write-zeroes request (an unallocated or zero-flagged range where
	// the driver can make one, rather than written zeros).
	DetectZeroesOn
	// DetectZeroesUnmap also lets that request deallocate the range
	// (ReqMayUnmap); it needs discard=unmap.
	DetectZeroesUnmap
)

var detectZeroesNames = []string{"off", "on", "unmap"}

func (d DetectZeroes) String() string {
	if int(d) < len(detectZeroesNames) {
		return detectZeroesNames[d]
	}
	return "invalid"
}

// nodeFlags are what the opener asks of a node (QEMU's open flags), which
// the node's own options override.
type nodeFlags struct {
	readOnly bool
	cache    CacheMode
	unmap    bool
}

// nodeConfig is a node's common options, resolved.
type nodeConfig struct {
	nodeFlags
	autoReadOnly bool
	forceShare   bool
	detectZeroes DetectZeroes
	nodeName     string
}

// parseNodeOptions resolves the common options in opts over the opener's
// flags f, checking them in the order and words of QEMU's
// bdrv_open_common. auto-read-only matters to a protocol node whose users
// only read (Node.AutoReadOnly): QEMU's file-posix opens its file
// read-write whenever a writer needs it, so elsewhere the option changes
// no outcome.
func parseNodeOptions(opts Options, f nodeFlags) (nodeConfig, error) {
	c := nodeConfig{nodeFlags: f}
	for _, b := range []struct {
		name string
		set  func(bool)
	}{
		{OptCacheNoFlush, func(v bool) { c.cache = c.cache.with(cacheNoFlush, v) }},
		{OptCacheDirect, func(v bool) { c.cache = c.cache.with(cacheDirect, v) }},
		{OptReadOnly, func(v bool) { c.readOnly = v }},
		{OptAutoReadOnly, func(v bool) { c.autoReadOnly = v }},
		{OptForceShare, func(v bool) { c.forceShare = v }},
	} {
		s, ok := opts[b.name]
		if !ok {
			continue
		}
		v, err := ParseBool(s)
		if err != nil {
			return c, fmt.Errorf("Parameter '%s' expects 'on' or 'off'", b.name)
		}
		b.set(v)
	}
	if c.forceShare && !c.readOnly {
		return c, fmt.Errorf("%s=on can only be used with read-only images", OptForceShare)
	}
	if s, ok := opts[OptDiscard]; ok {
		switch s {
		case "off", "ignore":
			c.unmap = false
		case "on", "unmap":
			c.unmap = true
		default:
			return c, fmt.Errorf("Invalid discard option")
		}
	}
	if s, ok := opts[OptDetectZeroes]; ok {
		i := indexOf(detectZeroesNames, s)
		if i < 0 {
			return c, fmt.Errorf("invalid parameter value: %s", s)
		}
		c.detectZeroes = DetectZeroes(i)
		if c.detectZeroes == DetectZeroesUnmap && !c.unmap {
			return c, fmt.Errorf("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
		}
	}
	if s, ok := opts[OptNodeName]; ok {
		if !wellFormedID(s) {
			return c, fmt.Errorf("Invalid node-name: '%s'", s)
		}
		c.nodeName = s
	}
	return c, nil
}

// wellFormedID is QEMU's id_wellformed: a letter, then letters, digits,
// '-', '.' and '_'.
func wellFormedID(s string) bool {
	if s == "" || !isLetter(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !isLetter(c) && !(c >= '0' && c <= '9') && c != '-' && c != '.' && c != '_' {
			return false
		}
	}
	return true
}

func isLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

func indexOf(list []string, s string) int {
	for i, v := range list {
		if v == s {
			return i
		}
	}
	return -1
}

// inheritedOptions are the common options a child node takes from its
// parent's when it is not given its own (QEMU's bdrv_inherited_options
// and bdrv_backing_options copy them with qdict_copy_default).
var inheritedOptions = []string{OptCacheDirect, OptCacheNoFlush, OptForceShare}

// FileOptions are the options of a format node's protocol child: those
// addressed to it with the "file." prefix, then, where it has none of its
// own, the parent's read-only, auto-read-only and inherited options.
func (o Options) FileOptions() Options {
	out := o.childOptions("file.")
	for _, k := range append([]string{OptReadOnly, OptAutoReadOnly}, inheritedOptions...) {
		if _, ok := out[k]; !ok {
			if v, ok := o[k]; ok {
				out[k] = v
			}
		}
	}
	return out
}

// childOptions are the options in o under prefix, with the prefix taken
// off.
func (o Options) childOptions(prefix string) Options {
	out := Options{}
	for k, v := range o {
		if sub, ok := strings.CutPrefix(k, prefix); ok {
			out[sub] = v
		}
	}
	return out
}

// childFlags are the flags a child node is opened with: its parent's
// read-only and cache properties, except write-through, which is its
// parent's business (QEMU keeps it in the BlockBackend above the graph),
// and discard requests passed on (QEMU's children default to
// discard=unmap: the parent decides what to discard).
func (c nodeConfig) childFlags() nodeFlags {
	return nodeFlags{readOnly: c.readOnly, cache: c.cache &^ cacheWritethrough, unmap: true}
}
