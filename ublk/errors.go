package ublk

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/ublk/internal/uapi"
)

// Errors a user can act on. Each is matched with errors.Is and prints as one
// line that says what to do.
var (
	// ErrNoDriver means /dev/ublk-control does not exist: the ublk_drv
	// module is not loaded (or the kernel does not build it).
	ErrNoDriver = errors.New("ublk driver not loaded: /dev/ublk-control is missing (run: modprobe ublk_drv)")
	// ErrPermission means the caller may not use /dev/ublk-control or
	// create devices: ublk servers need root (CAP_SYS_ADMIN).
	ErrPermission = errors.New("permission denied: serving a ublk device needs root (CAP_SYS_ADMIN)")
	// ErrIDTaken means ADD_DEV was asked for a device id that exists.
	ErrIDTaken = errors.New("device id is already in use")
	// ErrNoDevice means no ublk device has the requested id.
	ErrNoDevice = errors.New("no such ublk device")
	// ErrNotSupported is matched by [UnsupportedFeatureError]: the running
	// kernel's ublk driver lacks something that was asked for.
	ErrNotSupported = errors.New("not supported by the kernel's ublk driver")
)

// UnsupportedFeatureError reports a ublk feature (a UBLK_F_* name) that the
// kernel did not offer. errors.Is(err, ErrNotSupported) matches it.
type UnsupportedFeatureError struct {
	// Name is the kernel's name of the feature, e.g. "UBLK_F_USER_COPY".
	Name string
}

func (e *UnsupportedFeatureError) Error() string {
	return e.Name + " is not supported by the kernel's ublk driver"
}

// Is matches ErrNotSupported.
func (e *UnsupportedFeatureError) Is(target error) bool { return target == ErrNotSupported }

// CmdError is a control command the kernel failed. It unwraps to the
// unix.Errno, and also matches ErrIDTaken (EEXIST on ADD_DEV), ErrNoDevice
// (ENODEV on a device command) and ErrPermission (EPERM or EACCES, as its
// message and OpenCtrl take both).
type CmdError struct {
	Op    string // command name, e.g. "ADD_DEV"
	DevID int    // target device, -1 for none or "any"
	Errno unix.Errno
}

func (e *CmdError) Error() string {
	switch {
	case e.Op == "ADD_DEV" && e.Errno == unix.EEXIST:
		return fmt.Sprintf("ublk device id %d is already in use", e.DevID)
	case e.Errno == unix.ENODEV && e.DevID >= 0:
		return fmt.Sprintf("ublk device %d does not exist", e.DevID)
	case e.Errno == unix.EPERM || e.Errno == unix.EACCES:
		return fmt.Sprintf("ublk %s: %v: serving a ublk device needs root (CAP_SYS_ADMIN)", e.Op, e.Errno)
	case e.DevID >= 0:
		return fmt.Sprintf("ublk %s (device %d): %v", e.Op, e.DevID, e.Errno)
	}
	return fmt.Sprintf("ublk %s: %v", e.Op, e.Errno)
}

// Unwrap returns the errno.
func (e *CmdError) Unwrap() error { return e.Errno }

// Is matches the sentinel errors described on CmdError.
func (e *CmdError) Is(target error) bool {
	switch target {
	case ErrIDTaken:
		return e.Op == "ADD_DEV" && e.Errno == unix.EEXIST
	case ErrNoDevice:
		return e.Errno == unix.ENODEV
	case ErrPermission:
		return e.Errno == unix.EPERM || e.Errno == unix.EACCES
	}
	return false
}

// cmdName is the short name of a control opcode for messages
// ("UBLK_U_CMD_ADD_DEV" becomes "ADD_DEV").
func cmdName(op uapi.CmdOp) string {
	s := op.String()
	for _, p := range []string{"UBLK_U_CMD_", "UBLK_CMD_", "UBLK_U_IO_", "UBLK_IO_"} {
		if len(s) > len(p) && s[:len(p)] == p {
			return s[len(p):]
		}
	}
	return s
}

// resultOf maps the error of a bdrv request to the result a COMMIT carries:
// 0 for success, else -errno. Errors without an errno (which the I/O path
// should not produce) become -EIO. This is the only place that decides what
// the kernel reports for a failed request (libublk's UblkError::errno).
func resultOf(err error) int32 {
	if err == nil {
		return 0
	}
	var errno unix.Errno
	if errors.As(err, &errno) && errno > 0 && errno < 4096 {
		return -int32(errno)
	}
	return -int32(unix.EIO)
}
