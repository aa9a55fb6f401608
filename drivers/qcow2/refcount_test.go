package qcow2

import (
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestAllocManyRefblocks allocates a run of clusters that needs hundreds of
// new refcount blocks (and a larger refcount table): the 32 MiB L1 table
// of a 128 GiB image with 512-byte clusters. Each new block restarts the
// search, as QEMU's -EAGAIN does; the allocation used to give up after 64
// restarts.
func TestAllocManyRefblocks(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "big.qcow2")
	err := coroutine.Run(func(co *coroutine.Co) error {
		return bdrv.Create(co, "qcow2", &bdrv.CreateRequest{Filename: p, Size: 128 << 30,
			Options: bdrv.Options{"cluster_size": "512"}})
	})
	if err != nil {
		t.Fatal(err)
	}
	if q := ckQemu(t, p); q.rc != 0 {
		t.Errorf("qemu-img check: %v", q)
	}
}
