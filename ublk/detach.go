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

// Detach removes device id and returns once it is gone. When its server
// still runs, Detach asks it to stop (SIGTERM) and waits for it to exit: a
// ublkimg server stops the device, drains, flushes and closes the image and
// deletes the device before it exits. When the server is gone (killed), the
// device is deleted directly. A device that is mounted or otherwise open
// exclusively is refused with an error matching ErrBusy unless force is
// set; forcing it fails the I/O of whoever holds it, as pulling a disk does.
func Detach(ctx context.Context, c *Ctrl, id int, force bool) error {
	path := fmt.Sprintf("/dev/ublkb%d", id)
	rec, recErr := ReadRecord(id)
	info, err := c.DevInfo(id)
	if errors.Is(err, ErrNoDevice) {
		if recErr == nil && !rec.ServerAlive() {
			// A record left behind by a server that died after its
			// device was deleted: nothing to detach but the record.
			return RemoveRecord(id, 0)
		}
		if recErr == nil {
			return waitServer(ctx, rec.PID, id)
		}
		return fmt.Errorf("%s: %w", path, err)
	}
	if err != nil {
		return err
	}
	// A quiesced device (its server died, recovery pending) may be
	// mounted as well; deleting it fails the held requests.
	if (info.State == StateLive || info.State == StateQuiesced) && !force {
		if err := checkNotBusy(path); err != nil {
			return err
		}
	}
	pid := 0
	switch {
	case recErr == nil && rec.ServerAlive():
		pid = rec.PID
	case info.PID > 1 && procStart(info.PID) != 0 && info.PID != os.Getpid():
		pid = info.PID
	}
	if pid > 1 {
		if err := stopServer(ctx, pid); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		// The server deletes its device before it exits; a server that
		// failed to leaves it to us.
		if _, err := c.DevInfo(id); errors.Is(err, ErrNoDevice) {
			RemoveRecord(id, 0)
			return nil
		}
	}
	if err := c.DelDev(id); err != nil && !errors.Is(err, ErrNoDevice) {
		return err
	}
	return RemoveRecord(id, 0)
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

// stopServer sends SIGTERM to pid and waits until it has exited.
func stopServer(ctx context.Context, pid int) error {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("server process %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	if err := unix.PidfdSendSignal(pidfd, unix.SIGTERM, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("stopping server process %d: %w", pid, err)
	}
	return waitPidfd(ctx, pidfd, pid)
}

// waitServer waits for the server of a device that is already gone, whose
// process still runs (it is closing its image).
func waitServer(ctx context.Context, pid, id int) error {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil
	}
	defer unix.Close(pidfd)
	if err := waitPidfd(ctx, pidfd, pid); err != nil {
		return fmt.Errorf("/dev/ublkb%d: %w", id, err)
	}
	return nil
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
