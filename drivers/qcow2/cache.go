package qcow2

import (
	"fmt"
	"slices"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Metadata caches (QEMU's Qcow2Cache, block/qcow2-cache.c).
//
// The image keeps two caches: L2 table slices and refcount blocks. Each is a
// fixed number of equally sized entries held in one slice of entries, found
// by host offset through a map and replaced least recently used first.
// Entries are reference counted while a caller works on them, so a nested
// lookup never evicts a table that is in use.
//
// Ordering between metadata writes is expressed as dependencies, as in QEMU:
//
//   - c.depends = other: before any entry of c is written, other is written
//     and the file flushed. The L2 cache depends on the refcount cache after
//     an allocation (refcounts reach the disk before the L2 entries that
//     reference the new clusters), and the refcount cache depends on the L2
//     cache after refcounts decreased (the L2 entries stop referencing a
//     cluster before its refcount can say it is free).
//   - c.dependsOnFlush: before any entry of c is written, the file (and the
//     external data file) are flushed. Set on the L2 cache after copy-on-write
//     so that copied data is stable before an L2 entry maps it.
//
// Every method is called with img.meta held; entry loads and write-backs
// yield with the lock held, as QEMU's cache does under s->lock.
type cache struct {
	img       *Image
	name      string   // table name for errors and overlap checks ("L2 table", "refcount block")
	kind      metaKind // what its entries are, for the overlap check
	entrySize int

	entries []cacheEntry
	byOff   map[uint64]int // host offset -> index in entries
	lruTick uint64

	depends        *cache
	dependsOnFlush bool

	// hits and misses count the lookups of tables to read (counters.go).
	hits, misses bdrv.StatCounter
}

type cacheEntry struct {
	off   uint64 // host offset of the table (slice); 0 = free slot
	buf   []byte
	dirty bool
	ref   int    // users holding the entry (get without put)
	lru   uint64 // lruTick at the last use
}

func newCache(img *Image, name string, kind metaKind, entries, entrySize int) *cache {
	c := &cache{img: img, name: name, kind: kind, entrySize: entrySize,
		entries: make([]cacheEntry, entries), byOff: make(map[uint64]int, entries)}
	// Entry buffers are allocated on first use: the default L2 cache may
	// be sized for a disk much larger than what is ever touched.
	return c
}

// getLocked returns the entry holding the table at off, reading it from the
// image file if it is not cached. The caller must putLocked it. Called with
// img.meta held.
func (c *cache) getLocked(co *coroutine.Co, off uint64) (*cacheEntry, error) {
	return c.doGetLocked(co, off, true)
}

// getEmptyLocked returns a zeroed entry for the table at off without reading
// it (a newly allocated table). Called with img.meta held.
func (c *cache) getEmptyLocked(co *coroutine.Co, off uint64) (*cacheEntry, error) {
	return c.doGetLocked(co, off, false)
}

func (c *cache) doGetLocked(co *coroutine.Co, off uint64, read bool) (*cacheEntry, error) {
	c.lruTick++
	if i, ok := c.byOff[off]; ok {
		if read {
			c.hits.Add(1)
		}
		e := &c.entries[i]
		e.ref++
		e.lru = c.lruTick
		if !read {
			clear(e.buf)
		}
		return e, nil
	}
	i, err := c.evictLocked(co)
	if err != nil {
		return nil, err
	}
	e := &c.entries[i]
	if e.buf == nil {
		e.buf = bdrv.AlignedBuffer(c.entrySize, 4096)
	}
	if read {
		c.misses.Add(1)
		if err := c.img.file.Preadv(co, int64(off), bdrv.IOVec{e.buf}, 0); err != nil {
			return nil, err
		}
	} else {
		clear(e.buf)
	}
	e.off = off
	e.dirty = false
	e.ref = 1
	e.lru = c.lruTick
	c.byOff[off] = i
	return e, nil
}

// evictLocked frees the least recently used entry nobody holds, writing it
// back first if it is dirty, and returns its index.
func (c *cache) evictLocked(co *coroutine.Co) (int, error) {
	for {
		best := -1
		for i := range c.entries {
			e := &c.entries[i]
			if e.ref > 0 {
				continue
			}
			if e.off == 0 {
				return i, nil
			}
			if best < 0 || e.lru < c.entries[best].lru {
				best = i
			}
		}
		if best < 0 {
			return 0, fmt.Errorf("qcow2: %s cache exhausted (%d entries all in use)", c.name, len(c.entries))
		}
		e := &c.entries[best]
		if e.dirty {
			// Writing back yields; the entry may be taken meanwhile, so
			// look again afterwards.
			e.ref++
			err := c.entryFlushLocked(co, e)
			e.ref--
			if err != nil {
				return 0, err
			}
			continue
		}
		delete(c.byOff, e.off)
		e.off = 0
		return best, nil
	}
}

// putLocked releases an entry obtained with getLocked.
func (c *cache) putLocked(e *cacheEntry) {
	if e.ref <= 0 {
		panic("qcow2: cache put without get")
	}
	e.ref--
}

// markDirtyLocked records that e must be written back.
func (c *cache) markDirtyLocked(e *cacheEntry) {
	e.dirty = true
	c.img.metaDirty.Store(true)
}

// discardLocked drops the cached tables within the host range [off,
// off+size) without writing them (their cluster was freed). Entries in use
// are only marked clean; their slot is reused once released.
func (c *cache) discardLocked(off, size uint64) {
	for i := range c.entries {
		e := &c.entries[i]
		if e.off == 0 || e.off < off || e.off >= off+size {
			continue
		}
		e.dirty = false
		if e.ref == 0 {
			delete(c.byOff, e.off)
			e.off = 0
		}
	}
}

// setDependencyLocked makes c's writes wait for dep (QEMU's
// qcow2_cache_set_dependency). A dependency in the other direction, or on a
// third cache, is resolved first by flushing.
func (c *cache) setDependencyLocked(co *coroutine.Co, dep *cache) error {
	if dep.depends != nil {
		if err := dep.flushDependencyLocked(co); err != nil {
			return err
		}
	}
	if c.depends != nil && c.depends != dep {
		if err := c.flushDependencyLocked(co); err != nil {
			return err
		}
	}
	c.depends = dep
	return nil
}

// setDependsOnFlushLocked makes c's next write wait for a flush of the
// image's files.
func (c *cache) setDependsOnFlushLocked() { c.dependsOnFlush = true }

func (c *cache) flushDependencyLocked(co *coroutine.Co) error {
	if err := c.depends.flushLocked(co); err != nil {
		return err
	}
	c.depends = nil
	c.dependsOnFlush = false
	return nil
}

// entryFlushLocked writes e back if it is dirty, after what it depends on.
func (c *cache) entryFlushLocked(co *coroutine.Co, e *cacheEntry) error {
	if !e.dirty || e.off == 0 {
		return nil
	}
	if c.depends != nil {
		if err := c.flushDependencyLocked(co); err != nil {
			return err
		}
	} else if c.dependsOnFlush {
		if err := c.img.flushFilesLocked(co); err != nil {
			return err
		}
		c.dependsOnFlush = false
	}
	if err := c.img.checkOverlapLocked(co, e.off, uint64(c.entrySize), c.kind); err != nil {
		return err
	}
	// The buffer is written from the cache: no other coroutine changes it
	// while img.meta is held.
	if err := c.img.file.Pwritev(co, int64(e.off), bdrv.IOVec{e.buf}, 0); err != nil {
		return err
	}
	e.dirty = false
	return nil
}

// writeLocked writes back every dirty entry, in offset order (QEMU's
// qcow2_cache_write).
func (c *cache) writeLocked(co *coroutine.Co) error {
	var dirty []int
	for i := range c.entries {
		if c.entries[i].dirty && c.entries[i].off != 0 {
			dirty = append(dirty, i)
		}
	}
	slices.SortFunc(dirty, func(a, b int) int {
		switch x, y := c.entries[a].off, c.entries[b].off; {
		case x < y:
			return -1
		case x > y:
			return 1
		}
		return 0
	})
	var first error
	for _, i := range dirty {
		e := &c.entries[i]
		e.ref++
		err := c.entryFlushLocked(co, e)
		e.ref--
		if err != nil && first == nil {
			first = err
		}
	}
	return first
}

// flushLocked writes back every dirty entry and flushes the image file
// (QEMU's qcow2_cache_flush).
func (c *cache) flushLocked(co *coroutine.Co) error {
	err := c.writeLocked(co)
	if ferr := c.img.file.Flush(co); err == nil {
		err = ferr
	}
	return err
}

// Cache size defaults and limits (QEMU's block/qcow2.h, Linux values).
const (
	defaultL2CacheMax    = 32 << 20 // DEFAULT_L2_CACHE_MAX_SIZE
	minL2CacheEntries    = 2        // MIN_L2_CACHE_SIZE
	minRefcountCacheSize = 4        // MIN_REFCOUNT_CACHE_SIZE, in clusters
)

// Runtime option names for the caches, as QEMU's.
const (
	OptL2CacheSize        = "l2-cache-size"
	OptL2CacheEntrySize   = "l2-cache-entry-size"
	OptRefcountCacheSize  = "refcount-cache-size"
	OptCacheSize          = "cache-size"
	OptCacheCleanInterval = "cache-clean-interval" // accepted, ignored: caches are never timed out
)

// cacheSizes computes the L2 cache size (entries), L2 entry (slice) size and
// refcount cache size (entries) from the open options, as QEMU's
// read_cache_sizes and qcow2_update_options_prepare do: by default the L2
// cache covers the whole disk up to 32 MiB, with 4 KiB slices when it
// cannot, and the refcount cache is 4 clusters.
func cacheSizes(opts bdrv.Options, g Geometry, diskSize uint64) (l2Entries, l2EntrySize, rcEntries int, err error) {
	cs := g.ClusterSize()
	size := func(name string, def uint64) (uint64, error) {
		v, err := opts.Size(name, int64(def))
		return uint64(v), err
	}
	combinedSet, l2Set, rcSet, entrySet := opts.Has(OptCacheSize), opts.Has(OptL2CacheSize),
		opts.Has(OptRefcountCacheSize), opts.Has(OptL2CacheEntrySize)
	combined, err := size(OptCacheSize, 0)
	if err != nil {
		return 0, 0, 0, err
	}
	l2Max, err := size(OptL2CacheSize, defaultL2CacheMax)
	if err != nil {
		return 0, 0, 0, err
	}
	rc, err := size(OptRefcountCacheSize, 0)
	if err != nil {
		return 0, 0, 0, err
	}
	entry, err := size(OptL2CacheEntrySize, cs)
	if err != nil {
		return 0, 0, 0, err
	}
	maxL2Entries := (diskSize + cs - 1) / cs
	maxL2Cache := (maxL2Entries*g.L2EntrySize() + cs - 1) / cs * cs
	minRC := minRefcountCacheSize * cs
	var l2 uint64
	if combinedSet {
		switch {
		case l2Set && rcSet:
			return 0, 0, 0, fmt.Errorf("%s, %s and %s may not be set at the same time", OptCacheSize, OptL2CacheSize, OptRefcountCacheSize)
		case l2Set && l2Max > combined:
			return 0, 0, 0, fmt.Errorf("%s may not exceed %s", OptL2CacheSize, OptCacheSize)
		case rc > combined:
			return 0, 0, 0, fmt.Errorf("%s may not exceed %s", OptRefcountCacheSize, OptCacheSize)
		}
		switch {
		case l2Set:
			l2, rc = l2Max, combined-l2Max
		case rcSet:
			l2 = combined - rc
		case combined >= maxL2Cache+minRC:
			l2, rc = maxL2Cache, combined-maxL2Cache
		default:
			rc = min(combined, minRC)
			l2 = combined - rc
		}
	} else {
		l2 = min(maxL2Cache, l2Max)
		if !rcSet {
			rc = minRC
		}
	}
	if l2 < maxL2Cache && !entrySet {
		entry = min(cs, 4096)
	}
	if entry < 1<<MinClusterBits || entry > cs || entry&(entry-1) != 0 {
		return 0, 0, 0, fmt.Errorf("L2 cache entry size must be a power of two between %d and the cluster size (%d)", 1<<MinClusterBits, cs)
	}
	l2n := max(l2/entry, minL2CacheEntries)
	if l2n > 1<<31-1 {
		return 0, 0, 0, fmt.Errorf("L2 cache size too big")
	}
	rcn := max(rc/cs, minRefcountCacheSize)
	if rcn > 1<<31-1 {
		return 0, 0, 0, fmt.Errorf("Refcount cache size too big")
	}
	return int(l2n), int(entry), int(rcn), nil
}
