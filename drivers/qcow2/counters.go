package qcow2

import "ublkimg/bdrv"

// Counters implements bdrv.CounterReporter: the lookups of L2 tables and
// refcount blocks that found them in their cache (hits) or read them
// (misses), the guest data clusters allocated by writes, and the bytes of
// old data copied around partial writes into newly allocated clusters
// (copy-on-write), since the open.
func (img *Image) Counters() []bdrv.Counter {
	return []bdrv.Counter{
		{Name: "l2_cache_hits", Value: img.l2Cache.hits.Load()},
		{Name: "l2_cache_misses", Value: img.l2Cache.misses.Load()},
		{Name: "refcount_cache_hits", Value: img.rcCache.hits.Load()},
		{Name: "refcount_cache_misses", Value: img.rcCache.misses.Load()},
		{Name: "clusters_allocated", Value: img.counters.clustersAllocated.Load()},
		{Name: "cow_bytes", Value: img.counters.cowBytes.Load()},
	}
}
