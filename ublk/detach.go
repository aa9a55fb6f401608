package ublk

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrBusy means a device is open exclusively (mounted, or held by a
// program that asked for exclusive access) and Detach was not forced.
var ErrBusy = errors.New("device is in use")

// Detach removes device id and returns once it is gone.
//
// When the server its record names still runs (the record's pid, started
// at the record's start time), Detach asks it to stop (SIGTERM), waits for
// it to exit and returns the error it left in its exit status
// (WriteExitStatus): a ublkimg server stops the device, drains, flushes and
// closes the image and deletes the device before it exits, and a failure
// of any of that is Detach's failure too, as is a server that exits
// without saying how it closed the image.
//
// No other process is ever signalled. Without a record, or when the
// record's server is gone (killed, its pid perhaps reused by another
// process since), the device is deleted through the kernel (DEL_DEV),
// which ends the queues of whatever server is left.
//
// A device that is mounted or otherwise open exclusively is refused with
// an error matching ErrBusy unless force is set; forcing it fails the I/O
// of whoever holds it, as pulling a disk does.
func Detach(ctx context.Context, c *Ctrl, id int, force bool) error {
	path := fmt.Sprintf("/dev/ublkb%d", id)
	rec, err := ReadRecord(id)
	hasRec := err == nil
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s: %w", path, err)
	}
	info, err := c.DevInfo(id)
	inKernel := err == nil
	switch {
	case errors.Is(err, ErrNoDevice) && !hasRec:
		return fmt.Errorf("%s: %w", path, err)
	case err != nil && !errors.Is(err, ErrNoDevice):
		return err
	}
	// A quiesced device (its server died, recovery pending) may be
	// mounted as well; deleting it fails the held requests.
	if inKernel && (info.State == StateLive || info.State == StateQuiesced) && !force {
		if err := checkNotBusy(path); err != nil {
			return err
		}
	}
	var status error
	if hasRec {
		// With its device already gone, a server that still runs is
		// closing its image: it is waited for, not signalled.
		ran, err := stopServer(ctx, rec, inKernel)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if ran {
			status = exitStatusError(path, rec)
			// The server deletes its device before it exits; a
			// server that failed to leaves it to us.
			_, err := c.DevInfo(id)
			inKernel = !errors.Is(err, ErrNoDevice)
		}
	}
	if inKernel {
		if err := c.DelDev(id); err != nil && !errors.Is(err, ErrNoDevice) {
			return errors.Join(status, err)
		}
	}
	if hasRec {
		return errors.Join(status, RemoveRecord(id, rec.PID))
	}
	return status
}

// exitStatusError returns the error of the exit status rec's server left
// (nil for a clean stop) and removes the status.
func exitStatusError(path string, rec Record) error {
	st, ok, err := takeExitStatus(rec)
	switch {
	case err != nil:
		return fmt.Errorf("%s: reading the exit status of its server (process %d): %w", path, rec.PID, err)
	case !ok:
		return fmt.Errorf("%s: its server (process %d) exited without reporting how it closed the image (killed?)", path, rec.PID)
	case st.Error != "":
		log := ""
		if _, err := os.Lstat(LogPath(rec.ID)); err == nil {
			log = " (log: " + LogPath(rec.ID) + ")"
		}
		return fmt.Errorf("%s: its server (process %d) failed: %s%s", path, rec.PID, st.Error, log)
	}
	return nil
}

// checkNotBusy fails with ErrBusy when path is open exclusively (a mounted
// file system holds its device that way).
func checkNotBusy(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("%s: %w (mounted or held open): unmount it first, or force the detach", path, ErrBusy)
	}
	if err == nil {
		unix.Close(fd)
	}
	return nil
}

// stopServer waits until the server rec names has exited, after sending
// it SIGTERM when signal is set. It reports whether that server was
// running: a pid whose process started at another time than the record
// says belongs to another process now, which is left alone. The pid is
// opened (pidfd) before its start time is checked, so that the signal
// cannot reach a process that took the pid after the check.
func stopServer(ctx context.Context, rec Record, signal bool) (bool, error) {
	if rec.PID <= 1 || rec.PIDStart == 0 || rec.PID == os.Getpid() {
		return false, nil
	}
	pidfd, err := unix.PidfdOpen(rec.PID, 0)
	if errors.Is(err, unix.ESRCH) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("server process %d: %w", rec.PID, err)
	}
	defer unix.Close(pidfd)
	if !rec.ServerAlive() {
		return false, nil
	}
	if signal {
		if err := unix.PidfdSendSignal(pidfd, unix.SIGTERM, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			return true, fmt.Errorf("stopping server process %d: %w", rec.PID, err)
		}
	}
	return true, waitPidfd(ctx, pidfd, rec.PID)
}

// waitPidfd waits until the process behind pidfd exits or ctx ends.
func waitPidfd(ctx context.Context, pidfd, pid int) error {
	for {
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 100)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("waiting for server process %d: %w", pid, err)
		}
		if n > 0 {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("server process %d still running: %w", pid, ctx.Err())
		}
	}
}

// WaitServerExit waits until the server rec names has exited (or ctx
// ends). A server that is not running, or a pid now used by another
// process, is not waited for.
func WaitServerExit(ctx context.Context, rec Record) error {
	_, err := stopServer(ctx, rec, false)
	return err
}
