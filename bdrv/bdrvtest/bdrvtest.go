// Package bdrvtest is test support for the block layer and its drivers:
// what their tests (and those of the packages above) share about opening
// nodes. Only tests import it.
package bdrvtest

import (
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// WithNode opens spec on a private loop, runs fn on it with the node, and
// closes the node. It fails t with the first error of the open, fn and the
// close; the node is closed even when fn fails.
func WithNode(t testing.TB, spec bdrv.Spec, fn func(co *coroutine.Co, n *bdrv.Node) error) {
	t.Helper()
	withNode(t, spec, fn, true)
}

// WithCorruptNode is WithNode for images expected to be found corrupt:
// closing them reports the corruption again, which is not a failure here.
func WithCorruptNode(t testing.TB, spec bdrv.Spec, fn func(co *coroutine.Co, n *bdrv.Node) error) {
	t.Helper()
	withNode(t, spec, fn, false)
}

func withNode(t testing.TB, spec bdrv.Spec, fn func(co *coroutine.Co, n *bdrv.Node) error, closeMatters bool) {
	t.Helper()
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, spec)
		if err != nil {
			return err
		}
		ferr := fn(co, n)
		if cerr := n.Close(co); ferr == nil && closeMatters {
			ferr = cerr
		}
		return ferr
	})
	if err != nil {
		t.Fatal(err)
	}
}

// OpenError opens spec on a private loop, closes the node at once if it
// opened, and returns the open's error: for tests of what an open refuses.
func OpenError(spec bdrv.Spec) error {
	return coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, spec)
		if err == nil {
			n.Close(co)
		}
		return err
	})
}
