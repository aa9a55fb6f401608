package ublk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The run directory (RecordDir) holds what servers leave for the other
// verbs: device records, server logs and exit statuses. Servers run as
// root, and detach signals the process a record names, so nobody but its
// owner may be able to plant or replace a file there: the directory is
// created 0700, refused when someone else owns it or may write to it, and
// every file in it is opened relative to the checked directory without
// following symbolic links, and written whole under a temporary name that
// is renamed into place.

// runDir is an open, checked RecordDir.
type runDir struct{ fd int }

// openRunDir opens RecordDir and checks it (checkRunDir); with create it
// makes it first when missing. Without create, a missing directory gives
// an error matching os.ErrNotExist.
func openRunDir(create bool) (*runDir, error) {
	if create {
		if err := os.Mkdir(RecordDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("creating the run directory: %w", err)
		}
	}
	fd, err := unix.Open(RecordDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil, &os.PathError{Op: "open", Path: RecordDir, Err: err}
	case errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP):
		return nil, fmt.Errorf("%s is not a directory (a symbolic link?): ublkimg keeps its device records only in a directory of its own; remove it", RecordDir)
	case err != nil:
		return nil, fmt.Errorf("opening %s: %w", RecordDir, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: %w", RecordDir, err)
	}
	if err := checkRunDir(&st); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &runDir{fd: fd}, nil
}

// checkRunDir refuses a run directory that another user owns or that its
// group or others may write to: whoever can put a file there can make
// detach signal a process of their choice, or make a server write through
// a link of theirs.
func checkRunDir(st *unix.Stat_t) error {
	if euid := os.Geteuid(); int(st.Uid) != euid {
		return fmt.Errorf("%s belongs to uid %d, not to this user (uid %d): refusing to keep device records there; remove it", RecordDir, st.Uid, euid)
	}
	if mode := st.Mode & 0o7777; mode&0o022 != 0 {
		return fmt.Errorf("%s is writable by its group or others (mode %04o): refusing to keep device records there; chmod 700 it or remove it", RecordDir, mode)
	}
	return nil
}

func (d *runDir) close() { unix.Close(d.fd) }

func (d *runDir) path(name string) string { return filepath.Join(RecordDir, name) }

// procPath names file name of the directory through the directory's open
// descriptor (/proc/self/fd/N/name), for the calls that take a path only
// (binding and connecting unix sockets): the checked directory is used,
// whatever its name leads to by now.
func (d *runDir) procPath(name string) string { return fmt.Sprintf("/proc/self/fd/%d/%s", d.fd, name) }

// open opens the regular file name in the directory without following a
// symbolic link. flags are added to O_NOFOLLOW and O_CLOEXEC; opening a
// missing file gives an error matching os.ErrNotExist.
func (d *runDir) open(name string, flags int) (*os.File, error) {
	fd, err := unix.Openat(d.fd, name, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0o600)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: d.path(name), Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, fmt.Errorf("%s is not a regular file", d.path(name))
	}
	// O_NONBLOCK only kept a FIFO planted under the name from blocking
	// the open.
	unix.SetNonblock(fd, false)
	return os.NewFile(uintptr(fd), d.path(name)), nil
}

// readFile returns the content of file name.
func (d *runDir) readFile(name string) ([]byte, error) {
	f, err := d.open(name, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// writeFile replaces file name with data: it writes name+".tmp", created
// afresh (whatever had that name is removed first), and renames it over
// name, which replaces a symbolic link there rather than following it.
func (d *runDir) writeFile(name string, data []byte) error {
	tmp := name + ".tmp"
	if err := unix.Unlinkat(d.fd, tmp, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "remove", Path: d.path(tmp), Err: err}
	}
	f, err := d.open(tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(d.fd, tmp, d.fd, name)
		if err != nil {
			err = &os.PathError{Op: "rename", Path: d.path(tmp), Err: err}
		}
	}
	if err != nil {
		unix.Unlinkat(d.fd, tmp, 0)
	}
	return err
}

// remove deletes file name; a missing one is no error.
func (d *runDir) remove(name string) error {
	if err := unix.Unlinkat(d.fd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "remove", Path: d.path(name), Err: err}
	}
	return nil
}

// names lists the directory.
func (d *runDir) names() ([]string, error) {
	dup, err := unix.Dup(d.fd)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), RecordDir)
	defer f.Close()
	return f.Readdirnames(-1)
}

// withRunDir runs fn on the opened, checked run directory (see
// openRunDir for create).
func withRunDir(create bool, fn func(d *runDir) error) error {
	d, err := openRunDir(create)
	if err != nil {
		return err
	}
	defer d.close()
	return fn(d)
}

// LogPath is the log file of device id's background server.
func LogPath(id int) string { return filepath.Join(RecordDir, logName(id)) }

func logName(id int) string { return fmt.Sprintf("ublkb%d.log", id) }

// OpenLog opens the log of device id's server for appending, creating the
// run directory and the log as needed, without following a symbolic link.
// A new log is created under a temporary name and renamed into place, so
// that whatever sat under its name is replaced, never written through.
func OpenLog(id int) (*os.File, error) {
	var f *os.File
	err := withRunDir(true, func(d *runDir) error {
		var err error
		f, err = d.open(logName(id), unix.O_WRONLY|unix.O_APPEND)
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			// Something other than a log (a link, a FIFO) sits
			// there: replace it.
			if err := d.remove(logName(id)); err != nil {
				return err
			}
		}
		if err := d.writeFile(logName(id), nil); err != nil {
			return err
		}
		f, err = d.open(logName(id), unix.O_WRONLY|unix.O_APPEND)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("server log: %w", err)
	}
	return f, nil
}

// RemoveLog deletes the log of device id's server.
func RemoveLog(id int) error {
	err := withRunDir(false, func(d *runDir) error { return d.remove(logName(id)) })
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
