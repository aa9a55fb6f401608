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
//
// The locks belong to the open file description, which outlives close(2)
// while anything else still references it: a child forked at that moment
// (until its exec closes the O_CLOEXEC fd), or an io_uring request that
// an io-wq worker ran. The worker posts the completion and only then drops
// its reference to the file, so a buffered write that had to allocate
// blocks (ext4 cannot do that without waiting, and the ring hands it to a
// worker) and is followed at once by close left the image locked for a
// moment: an image created and reopened at once by this process was found
// locked about once in 400 tries. No wait in Close can cover that, since
// the completion has already arrived. So the bytes are unlocked explicitly
// before the fd is closed, as QEMU drops its permissions before closing:
// once Close returns, the image is free, whoever still holds the file.
const (
	lockPermBase   = 100
	lockSharedBase = 200
)

// QEMU's BLK_PERM_* bits, in lock-byte order.
const (
	permConsistentRead = int(bdrv.PermConsistentRead)
	permWrite          = int(bdrv.PermWrite)
	permWriteUnchanged = int(bdrv.PermWriteUnchanged)
	permResize         = int(bdrv.PermResize)
	permAll            = int(bdrv.PermAll)
)

var permNames = []string{"consistent read", "write", "write unchanged", "resize"}

// SetPerm implements bdrv.PermSetter: it claims the image for what the
// node's users do (perm) and for what they do not let others do (every
// permission not in shared, all shared with force-share). The opener
// calls it once, before any write.
func (d *driver) SetPerm(perm, shared bdrv.Perm) error {
	if !d.locking {
		return nil
	}
	if d.forceShare {
		shared = bdrv.PermAll
	}
	if err := lockPerms(d.fd, int(perm), int(shared), d.node.Filename); err != nil {
		return err
	}
	d.locked = true
	return nil
}

// Permissions of image creation (QEMU's raw_co_create): it writes and
// resizes, and shares everything but resizing, so that the file has the
// requested size when creation ends. A process that only writes an image
// and shares writing (qemu-io on a raw image) does not stop it; one that
// does not share writing (any qemu-img, a qcow2 user) or that resizes
// does.
const (
	createPerm   = permWrite | permResize
	createShared = permAll &^ permResize
)

// lockPerms takes the lock bytes for perm and for every permission not in
// shared on fd, then checks that no other open file description holds a
// conflicting byte. On failure it releases what it took.
func lockPerms(fd, perm, shared int, filename string) error {
	err := applyLocks(fd, perm, shared)
	if err == nil {
		err = checkLocks(fd, perm, shared, filename)
	}
	if err != nil {
		unlockAll(fd)
	}
	return err
}

func applyLocks(fd, perm, shared int) error {
	for i := range permNames {
		if perm&(1<<i) != 0 {
			if err := setLock(fd, unix.F_RDLCK, lockPermBase+i, 1); err != nil {
				return fmt.Errorf("Failed to lock byte %d: %w", lockPermBase+i, syscallErr(err))
			}
		}
	}
	for i := range permNames {
		if shared&(1<<i) == 0 {
			if err := setLock(fd, unix.F_RDLCK, lockSharedBase+i, 1); err != nil {
				return fmt.Errorf("Failed to lock byte %d: %w", lockSharedBase+i, syscallErr(err))
			}
		}
	}
	return nil
}

// checkLocks finds the first conflict in QEMU's order (every permission
// wanted, then every permission not shared), so that the message names
// the same permission as qemu-img's would.
func checkLocks(fd, perm, shared int, filename string) error {
	for i, name := range permNames {
		if perm&(1<<i) != 0 && lockedByOther(fd, lockSharedBase+i) {
			return lockedError{fmt.Sprintf("Failed to get \"%s\" lock", name), filename}
		}
	}
	for i, name := range permNames {
		if shared&(1<<i) == 0 && lockedByOther(fd, lockPermBase+i) {
			return lockedError{fmt.Sprintf("Failed to get shared \"%s\" lock", name), filename}
		}
	}
	return nil
}

// unlockAll releases every lock byte fd's open file description holds.
func unlockAll(fd int) error {
	err := setLock(fd, unix.F_UNLCK, lockPermBase, lockSharedBase+len(permNames)-lockPermBase)
	if err != nil {
		return fmt.Errorf("Failed to unlock the image: %w", syscallErr(err))
	}
	return nil
}

// lockedError is QEMU's message for an image another process holds; it
// matches bdrv.ErrLocked. Hint is the line QEMU adds below the message.
type lockedError struct{ msg, filename string }

func (e lockedError) Error() string { return e.msg }

// Hint is the advice qemu-img prints on the line after the error
// (error_append_hint).
func (e lockedError) Hint() string {
	return fmt.Sprintf("Is another process using the image [%s]?", e.filename)
}

func (e lockedError) Is(target error) bool { return target == bdrv.ErrLocked }

func setLock(fd int, typ int16, off, n int) error {
	lk := unix.Flock_t{Type: typ, Whence: unix.SEEK_SET, Start: int64(off), Len: int64(n)}
	return fcntlLock(fd, unix.F_OFD_SETLK, &lk)
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
