package rbd

import (
	"sync"
	"unsafe"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// librbd feature and flag bits.
const (
	featureStripingV2   = 1 << 1
	featureFastDiff     = 1 << 4
	flagFastDiffInvalid = 1 << 1
)

// exitDiffIterate is what the callback returns to stop rbd_diff_iterate2
// once the answer is known (QEMU's choice of a value no errno takes).
const exitDiffIterate = -9000

// diffReq accumulates one block-status query's answer, as QEMU's
// RBDDiffIterateReq: the first allocated (exists) or unallocated range from
// offs.
type diffReq struct {
	offs, bytes uint64
	exists      bool
}

// diffs maps the handle passed to rbd_diff_iterate2 as its callback
// argument to the query: C gets an integer, never a Go pointer.
var diffs struct {
	sync.Mutex
	next uint64
	byID map[uintptr]*diffReq
}

// diffCallback is rbd_diff_iterate2's callback, called for each allocated
// extent in order (on whichever thread librbd calls it from).
func diffCallback(offs uint64, length uintptr, exists int32, arg uintptr) int32 {
	diffs.Lock()
	req := diffs.byID[arg]
	diffs.Unlock()
	if exists == 0 {
		return 0 // a hole: unallocated, like nothing at all
	}
	if !req.exists && offs > req.offs {
		// Started in a hole and reached data: the hole is the answer.
		req.bytes = offs - req.offs
		return exitDiffIterate
	}
	if req.exists && offs > req.offs+req.bytes {
		// Data, then a hole: the data before it is the answer.
		return exitDiffIterate
	}
	req.bytes += uint64(length)
	req.exists = true
	return 0
}

// BlockStatus implements bdrv.BlockStatuser from the object map
// (rbd_diff_iterate2 with whole objects), as QEMU's rbd driver: without a
// valid fast-diff map every range is data.
func (d *driver) BlockStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (bdrv.Status, error) {
	st := bdrv.Status{Flags: bdrv.StatusData | bdrv.StatusOffsetValid, Pnum: bytes, Map: off, File: d.node}
	var req diffReq
	var head uint64
	var r int
	ok := false
	co.Offload(func() {
		var features, flags uint64
		if call(lib.getFeatures, d.image, uintptr(unsafe.Pointer(&features))) < 0 || features&featureFastDiff == 0 {
			return
		}
		if call(lib.getFlags, d.image, uintptr(unsafe.Pointer(&flags))) < 0 || flags&flagFastDiffInvalid != 0 {
			return
		}
		// librbd before 1.17 (Ceph 17) reports wrong offsets when the
		// start is not object-aligned (Ceph tracker 53784): start at the
		// object's beginning, which whole-object answers allow, and only
		// where that is exact: default striping and no parent.
		if features&featureStripingV2 != 0 {
			return
		}
		if call(lib.getParentInfo, d.image, 0, 0, 0, 0, 0, 0) != -int(enoent) {
			return
		}
		head = uint64(off) & uint64(d.objectSize-1)
		req.offs = uint64(off) - head
		diffs.Lock()
		if diffs.byID == nil {
			diffs.byID = make(map[uintptr]*diffReq)
		}
		diffs.next++
		id := uintptr(diffs.next)
		diffs.byID[id] = &req
		diffs.Unlock()
		r = call(lib.diffIterate2, d.image, 0, uintptr(req.offs), uintptr(uint64(bytes)+head), 1, 1, lib.diffCallback, id)
		diffs.Lock()
		delete(diffs.byID, id)
		diffs.Unlock()
		ok = r >= 0 || r == exitDiffIterate
	})
	if !ok {
		return st, nil
	}
	if !req.exists {
		if r == 0 {
			// No callback at all: the whole range is a hole.
			req.bytes = uint64(bytes) + head
		}
		st.Flags = bdrv.StatusZero | bdrv.StatusOffsetValid
	}
	if req.bytes <= head {
		return st, nil
	}
	st.Pnum = min(int64(req.bytes-head), bytes)
	return st, nil
}
