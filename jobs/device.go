package jobs

import (
	"context"
	"errors"
	"fmt"
	"os"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Device is what a job needs of the device that serves the image.
type Device interface {
	// Pause holds new requests and returns once none is in flight;
	// Resume lets them go on to the node the device serves then.
	Pause(ctx context.Context) error
	Resume()
	// Node is the node the device serves; SetNode replaces it, only
	// while paused. The device owns the node it serves.
	Node() *bdrv.Node
	SetNode(node *bdrv.Node)
}

// OpenOptions say how a job opens the images it creates or reopens: as
// the device's image was opened.
type OpenOptions struct {
	Cache bdrv.CacheMode
	// Options are driver options for every image opened (the recovery
	// option of a device attached with --recovery).
	Options bdrv.Options
	// Image are the options the device's image was opened with (those of
	// an --image-opts string but the driver and the file name: encryption
	// secret, cache, discard, "file." ones for its file, "backing." ones
	// for its backing chain), nil for none. A job reopens the image with
	// them, and derives from them those of the image it switches to
	// (PivotFunc).
	Image bdrv.Options
}

// Progress receives a job's progress: done bytes of total, total growing
// while the guest writes.
type Progress func(done, total int64)

// PivotFunc is told, while the device is paused, which image the device
// is about to serve (after a snapshot or a commit) and the options it was
// opened with (OpenOptions.Image for it: nil when the device's were nil),
// so that the caller records them before any write reaches that image; an
// error aborts the job, which then leaves the device on its image.
type PivotFunc func(image, format string, opts bdrv.Options) error

// ErrJobCancelled is matched by the error of a job whose context ended.
var ErrJobCancelled = errors.New("job cancelled")

// activeImage returns the image the device serves, which must not be
// under a filter (another job) nor, unless readOnlyOK, read-only.
func activeImage(dev Device, what string, readOnlyOK bool) (*bdrv.Node, error) {
	node := dev.Node()
	if node == nil {
		return nil, errors.New("the device serves no image")
	}
	if bdrv.Unfiltered(node) != node {
		return nil, fmt.Errorf("%s: another job runs on the device", what)
	}
	if node.ReadOnly && !readOnlyOK {
		return nil, fmt.Errorf("%s: the device is read-only", what)
	}
	return node, nil
}

// pause pauses dev from a coroutine: Pause blocks its caller, so it runs
// off the loop.
func pause(co *coroutine.Co, ctx context.Context, dev Device) error {
	var err error
	co.Offload(func() { err = dev.Pause(ctx) })
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ErrJobCancelled, ctx.Err())
	}
	return err
}

// cancelled returns ErrJobCancelled once ctx ended.
func cancelled(ctx context.Context) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ErrJobCancelled, ctx.Err())
	}
	return nil
}

// checkNew refuses a path that exists: jobs create their images, they
// never overwrite a file.
func checkNew(path, what string) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s '%s' already exists: give a new file name", what, path)
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s '%s': %w", what, path, err)
	}
	return nil
}

// reopen opens image n again (same file and format, with its backing
// chain, taking discards as n did) with its options opts, read-only or
// read-write: the way a job changes an image's mode, after closing n.
func reopen(co *coroutine.Co, n *bdrv.Node, readOnly bool, o OpenOptions, opts bdrv.Options) (*bdrv.Node, error) {
	all := opts.Merge(o.Options)
	delete(all, bdrv.OptReadOnly) // the mode is the job's
	return bdrv.Open(co, bdrv.Spec{Filename: n.Filename, Format: n.Format.Name, Cache: o.Cache,
		ReadOnly: readOnly, NoUnmap: !n.Unmap, Options: all})
}
