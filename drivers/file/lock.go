package file

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
)

// Image locking, compatible with QEMU's file-posix (raw_apply_lock_bytes and
// raw_check_lock_bytes): open-file-description locks on single bytes. A
// process holds a shared lock on byte 100+i for each permission i it uses,
// and on byte 200+i for each permission it does not share. It may take a
// permission only if nobody locks 200+i, and may refuse to share one only if
// nobody locks 100+i. So ublkimg and QEMU (qemu-img, qemu-nbd, a VM) refuse
// to write one image at the same time, and readers see a writer.
const (
	lockPermBase   = 100
	lockSharedBase = 200
)

// QEMU's BLK_PERM_* bits, in lock-byte order.
const (
	permConsistentRead = 1 << iota
	permWrite
	permWriteUnchanged
	permResize
	permAll = permConsistentRead | permWrite | permWriteUnchanged | permResize
)

var permNames = []string{"consistent read", "write", "write unchanged", "resize"}

// lock claims the image the way qemu-img does: readers need consistent
// reads, writers also write and resize, and neither shares write or resize
// unless forceShare (qemu-img -U, read-only only) shares everything.
func (d *driver) lock(forceShare bool) error {
	perm := permConsistentRead
	if !d.node.ReadOnly {
		perm |= permWrite | permResize
	}
	shared := permConsistentRead | permWriteUnchanged
	if forceShare {
		if !d.node.ReadOnly {
			return fmt.Errorf("force-share=on can only be used with read-only images")
		}
		shared = permAll
	}
	for i := range permNames {
		bit := 1 << i
		if perm&bit != 0 {
			if err := setLock(d.fd, lockPermBase+i); err != nil {
				return err
			}
		}
		if shared&bit == 0 {
			if err := setLock(d.fd, lockSharedBase+i); err != nil {
				return err
			}
		}
	}
	for i, name := range permNames {
		bit := 1 << i
		if perm&bit != 0 && lockedByOther(d.fd, lockSharedBase+i) {
			return lockedError{fmt.Sprintf("Failed to get \"%s\" lock\nIs another process using the image [%s]?", name, d.node.Filename)}
		}
		if shared&bit == 0 && lockedByOther(d.fd, lockPermBase+i) {
			return lockedError{fmt.Sprintf("Failed to get shared \"%s\" lock\nIs another process using the image [%s]?", name, d.node.Filename)}
		}
	}
	return nil
}

// lockedError is QEMU's message for an image another process holds; it
// matches bdrv.ErrLocked.
type lockedError struct{ msg string }

func (e lockedError) Error() string { return e.msg }

func (e lockedError) Is(target error) bool { return target == bdrv.ErrLocked }

func setLock(fd, off int) error {
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: unix.SEEK_SET, Start: int64(off), Len: 1}
	if err := fcntlLock(fd, unix.F_OFD_SETLK, &lk); err != nil {
		return fmt.Errorf("Failed to lock byte %d: %w", off, syscallErr(err))
	}
	return nil
}

// lockedByOther reports whether another open file description holds a lock
// on byte off (our own locks never conflict with us).
func lockedByOther(fd, off int) bool {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: unix.SEEK_SET, Start: int64(off), Len: 1}
	if err := fcntlLock(fd, unix.F_OFD_GETLK, &lk); err != nil {
		return false
	}
	return lk.Type != unix.F_UNLCK
}

func fcntlLock(fd, cmd int, lk *unix.Flock_t) error {
	for {
		_, _, e := unix.Syscall(unix.SYS_FCNTL, uintptr(fd), uintptr(cmd), uintptr(unsafe.Pointer(lk)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		return nil
	}
}
