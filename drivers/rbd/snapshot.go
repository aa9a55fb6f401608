package rbd

import (
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

// snapInfo is librbd's rbd_snap_info_t.
type snapInfo struct {
	ID, Size uint64
	Name     uintptr // C string, freed by rbd_snap_list_end
}

// ListSnapshots implements bdrv.Snapshotter as QEMU's rbd driver maps RBD
// snapshots: the name is also the ID, the VM state size is the image size
// at the snapshot, and there is no date or clock.
func (d *driver) ListSnapshots(co *coroutine.Co) ([]bdrv.SnapshotInfo, error) {
	var out []bdrv.SnapshotInfo
	var r int
	co.Offload(func() {
		max := 16
		for {
			snaps := make([]snapInfo, max)
			m := int32(max)
			r = call(lib.snapList, d.image, uintptr(unsafe.Pointer(&snaps[0])), uintptr(unsafe.Pointer(&m)))
			if r == -int(unix.ERANGE) {
				max = int(m) + 1
				continue
			}
			if r < 0 {
				return
			}
			for _, s := range snaps[:r] {
				name := goString(s.Name)
				out = append(out, bdrv.SnapshotInfo{ID: name, Name: name, VMStateSize: s.Size})
			}
			call(lib.snapListEnd, uintptr(unsafe.Pointer(&snaps[0])))
			return
		}
	})
	if r < 0 {
		return nil, errnoText(r)
	}
	return out, nil
}

// CreateSnapshot implements bdrv.Snapshotter with rbd_snap_create.
func (d *driver) CreateSnapshot(co *coroutine.Co, name string) error {
	if name == "" {
		return uring.NewErrno(unix.EINVAL, true) // RBD snapshots need a name
	}
	return d.snapCall(co, lib.snapCreate, name)
}

// ApplySnapshot implements bdrv.Snapshotter with rbd_snap_rollback.
func (d *driver) ApplySnapshot(co *coroutine.Co, name string) error {
	return d.snapCall(co, lib.snapRollback, name)
}

// DeleteSnapshot implements bdrv.Snapshotter with rbd_snap_remove.
func (d *driver) DeleteSnapshot(co *coroutine.Co, name string) error {
	return d.snapCall(co, lib.snapRemove, name)
}

// snapCall runs fn(image, name) off the loop and returns its errno.
func (d *driver) snapCall(co *coroutine.Co, fn uintptr, name string) error {
	var r int
	co.Offload(func() { r = call(fn, d.image, uintptr(unsafe.Pointer(cstring(name)))) })
	if r < 0 {
		return errnoText(r)
	}
	return nil
}
