package bdrv

import "sync/atomic"

// Filter nodes sit above another node of the graph (their child) and see
// every request on the way to it, as QEMU's filter drivers do
// (copy-before-write, mirror-top): a job inserts one above a device's
// image to act on the guest's writes while it runs, and takes it out
// again. The child keeps its own generic layer (padding, tracking); the
// filter's driver calls the child's Node methods.

// NewFilter returns a node whose driver is drv, above child: the same file
// name, size, cache mode and read-only state, child's limits. format names
// the filter ("copy-before-write"). drv must implement Filter, returning
// child. Closing the node drains and flushes it and closes drv, which
// decides whether the child is closed with it.
func NewFilter(format string, child *Node, drv Driver) *Node {
	n := &Node{Filename: child.Filename, Format: &Format{Name: format}, ReadOnly: child.ReadOnly,
		NoIO: child.NoIO, Cache: child.Cache, drv: drv}
	n.length.Store(child.Length())
	// Writes reach the child's generic layer, which emulates what its
	// driver lacks: the filter passes every flag on.
	n.writeFlags = ReqFUA
	n.limits = child.limits
	return n
}

// Unfiltered returns the first node at or below n that is not a filter:
// the image a device serves through whatever filters a job inserted.
func Unfiltered(n *Node) *Node {
	for n != nil {
		f, ok := n.drv.(Filter)
		if !ok {
			return n
		}
		n = f.FilteredChild()
	}
	return n
}

// Counters returns the figures the node's driver keeps (CounterReporter),
// or none.
func (n *Node) Counters() []Counter {
	if c, ok := n.drv.(CounterReporter); ok {
		return c.Counters()
	}
	return nil
}

// Counter is one figure a driver keeps about its work since the open
// (CounterReporter): a name in lower case with underscores
// ("l2_cache_hits") and a value that only grows.
type Counter struct {
	Name  string
	Value uint64
}

// StatCounter is a counter that drivers update from any loop without a
// lock: an atomic add, for figures updated under a lock the driver takes
// anyway or at most once per request.
type StatCounter struct{ v atomic.Uint64 }

// Add adds n.
func (c *StatCounter) Add(n uint64) { c.v.Add(n) }

// Load returns the value.
func (c *StatCounter) Load() uint64 { return c.v.Load() }
