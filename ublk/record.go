package ublk

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// RecordDir is the run directory: it holds one record per device served by
// ublkimg (ublkbN.json), written once the device is live and removed when
// the server stops it, the logs of background servers (ublkbN.log) and the
// exit status of servers that stopped (ublkbN.exit). It is a tmpfs on every
// systemd machine, so nothing in it outlives a reboot, like the devices. It
// is created 0700 and refused when it is not safe (rundir.go).
var RecordDir = "/run/ublkimg"

// Record describes a device ublkimg serves: what list shows and what
// detach needs to find the server. Its JSON field names are part of
// `ublkimg list --output json`.
type Record struct {
	ID        int    `json:"id"`
	Device    string `json:"device"`
	Image     string `json:"image"`
	Format    string `json:"format"`
	Queues    int    `json:"queues"`
	Depth     int    `json:"depth"`
	BlockSize int    `json:"block-size"`
	ReadOnly  bool   `json:"read-only"`
	Cache     string `json:"cache"`
	Discard   string `json:"discard"`
	UserCopy  bool   `json:"user-copy,omitempty"`
	// PollMax is the queue threads' maximum poll time (Config.PollMax).
	PollMax time.Duration `json:"poll-max-ns,omitempty"`
	// Recovery is set for a device attached with recovery: when its
	// server dies, `ublkimg recover` serves it again from this record.
	Recovery bool `json:"recovery,omitempty"`
	// ImageOpts is the --image-opts string the image was attached with
	// ("driver=qcow2,file.filename=X,encrypt.key-secret=sec0"), which
	// recover reopens it with. It names secrets by ID only: their data
	// comes from --object and is never recorded.
	ImageOpts string `json:"image-opts,omitempty"`
	// PID is the server process; PIDStart its start time in clock ticks
	// since boot (/proc/PID/stat field 22), which tells it apart from a
	// later process that reuses the pid.
	PID      int       `json:"pid"`
	PIDStart uint64    `json:"pid-start"`
	Started  time.Time `json:"started"`
}

func recordName(id int) string { return fmt.Sprintf("ublkb%d.json", id) }
func exitName(id int) string   { return fmt.Sprintf("ublkb%d.exit", id) }

// WriteRecord stores r (atomically: a reader sees the old record or the
// new one), creating the run directory if needed. PID and PIDStart default
// to the calling process. The exit status a previous server of the device
// left is removed: it belongs to a server that is gone.
func WriteRecord(r Record) error {
	if r.PID == 0 {
		r.PID = os.Getpid()
		r.PIDStart = procStart(r.PID)
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("device record: %w", err)
	}
	err = withRunDir(true, func(d *runDir) error {
		if err := d.writeFile(recordName(r.ID), append(data, '\n')); err != nil {
			return err
		}
		return d.remove(exitName(r.ID))
	})
	if err != nil {
		return fmt.Errorf("device record: %w", err)
	}
	return nil
}

// ReadRecord returns the record of device id; the error matches
// os.ErrNotExist when there is none.
func ReadRecord(id int) (Record, error) {
	var r Record
	var data []byte
	err := withRunDir(false, func(d *runDir) error {
		var err error
		data, err = d.readFile(recordName(id))
		return err
	})
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return r, fmt.Errorf("device record %s: %w", filepath.Join(RecordDir, recordName(id)), err)
	}
	return r, nil
}

// RemoveRecord deletes the record of device id if it belongs to pid (or
// unconditionally for pid 0), so a server never removes its successor's.
func RemoveRecord(id, pid int) error {
	if pid != 0 {
		if r, err := ReadRecord(id); err != nil || r.PID != pid {
			return nil
		}
	}
	err := withRunDir(false, func(d *runDir) error { return d.remove(recordName(id)) })
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// RecordIDs returns the ids of the devices ublkimg serves or served: those
// the run directory has records of, in increasing order (none when it does
// not exist).
func RecordIDs() ([]int, error) {
	ids, err := recordIDs()
	sort.Ints(ids)
	return ids, err
}

// recordIDs returns the ids of the devices the run directory has records
// of (none when it does not exist).
func recordIDs() ([]int, error) {
	var names []string
	err := withRunDir(false, func(d *runDir) error {
		var err error
		names, err = d.names()
		return err
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ids []int
	for _, name := range names {
		if id, ok := numberedName(name, "ublkb", ".json"); ok {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// ExitStatus is what a server leaves in the run directory as it exits
// (WriteExitStatus): how its final stop, flush and close went. detach
// reads it to tell the truth about a server it stopped.
type ExitStatus struct {
	// PID and PIDStart identify the server, as in its Record.
	PID      int    `json:"pid"`
	PIDStart uint64 `json:"pid-start"`
	// Error is the server's error, on one line; "" for a clean stop.
	Error string `json:"error,omitempty"`
}

// WriteExitStatus records how the calling process, the server of device
// id, ends: err is what stopping, flushing and closing returned, nil for
// a clean stop. Call it last, before the record is removed.
func WriteExitStatus(id int, err error) error {
	st := ExitStatus{PID: os.Getpid(), PIDStart: procStart(os.Getpid())}
	if err != nil {
		st.Error = strings.TrimSpace(strings.ReplaceAll(err.Error(), "\n", " "))
		if st.Error == "" {
			st.Error = "failed"
		}
	}
	data, jerr := json.Marshal(st)
	if jerr != nil {
		return fmt.Errorf("exit status: %w", jerr)
	}
	if werr := withRunDir(true, func(d *runDir) error { return d.writeFile(exitName(id), append(data, '\n')) }); werr != nil {
		return fmt.Errorf("exit status: %w", werr)
	}
	return nil
}

// takeExitStatus returns the exit status the server of rec left, and
// removes it; ok is false when there is none (another server's status is
// neither returned nor removed).
func takeExitStatus(rec Record) (st ExitStatus, ok bool, err error) {
	err = withRunDir(false, func(d *runDir) error {
		data, err := d.readFile(exitName(rec.ID))
		if err != nil {
			return err
		}
		if err := json.Unmarshal(data, &st); err != nil {
			return fmt.Errorf("%s: %w", d.path(exitName(rec.ID)), err)
		}
		if st.PID != rec.PID || st.PIDStart != rec.PIDStart {
			return nil
		}
		ok = true
		return d.remove(exitName(rec.ID))
	})
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	return st, ok, err
}

// DeadServerRecord returns the record of a device that served image
// (an absolute path) and whose server is no longer running, if there is
// one. Such a server's image lock may outlive it briefly: the kernel tears
// a dead process's io_uring down asynchronously, and the ring holds the
// image file open until then.
func DeadServerRecord(image string) (Record, bool) {
	ids, _ := recordIDs()
	for _, id := range ids {
		if r, err := ReadRecord(id); err == nil && r.Image == image && !r.ServerAlive() {
			return r, true
		}
	}
	return Record{}, false
}

// procStart returns the start time of process pid in clock ticks since
// boot, or 0 if it does not exist.
func procStart(pid int) uint64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) may contain spaces and parentheses: the
	// fields after it start after the last ')'.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64) // field 22: starttime
	return v
}

// ServerAlive reports whether the record's server process still runs.
func (r *Record) ServerAlive() bool {
	return r.PID > 0 && procStart(r.PID) == r.PIDStart && r.PIDStart != 0
}

// Status is one device as ListDevices sees it: the kernel's view merged
// with ublkimg's record.
type Status struct {
	Record
	// HasRecord is false for devices another program serves (or whose
	// record was lost): only the kernel's fields are known.
	HasRecord bool
	// InKernel is false for a record whose device no longer exists (a
	// server killed with its device deleted by someone else).
	InKernel bool
	// Kernel is GET_DEV_INFO's answer when InKernel.
	Kernel DevInfo
	// State is the kernel's state in lower case ("live", "dead",
	// "quiesced", "fail_io"), "gone" without a kernel device, and
	// "live (server gone)" or "dead (server gone)" when the serving
	// process died.
	State string
	// ServerRunning reports whether the server process is alive.
	ServerRunning bool
}

// numberedName returns N of a name prefix+N+suffix (N decimal digits):
// ublkcN in /sys/class/ublk-char, ublkbN.json in the run directory.
// (Parsed by hand: a package-level regexp would be compiled at the start
// of every ublkimg process.)
func numberedName(name, prefix, suffix string) (int, bool) {
	rest, hasPrefix := strings.CutPrefix(name, prefix)
	digits, hasSuffix := strings.CutSuffix(rest, suffix)
	if !hasPrefix || !hasSuffix || digits == "" {
		return 0, false
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(digits)
	if err != nil {
		return 0, false
	}
	return n, true
}

// ListDevices returns every ublk device the kernel has and every device
// record, by id. It needs the control device (root) for the kernel's view.
func ListDevices(c *Ctrl) ([]Status, error) {
	ids := map[int]bool{}
	if ents, err := os.ReadDir("/sys/class/ublk-char"); err == nil {
		for _, e := range ents {
			if id, ok := numberedName(e.Name(), "ublkc", ""); ok {
				ids[id] = true
			}
		}
	}
	recIDs, err := recordIDs()
	if err != nil {
		return nil, err
	}
	for _, id := range recIDs {
		ids[id] = true
	}
	var out []Status
	for id := range ids {
		s := Status{Record: Record{ID: id, Device: fmt.Sprintf("/dev/ublkb%d", id)}}
		if r, err := ReadRecord(id); err == nil {
			s.Record, s.HasRecord = r, true
		}
		info, err := c.DevInfo(id)
		switch {
		case err == nil:
			s.InKernel, s.Kernel = true, info
		case errors.Is(err, ErrNoDevice):
		default:
			return nil, err
		}
		s.fill()
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// fill derives State and the fields a device without record lacks.
func (s *Status) fill() {
	if !s.HasRecord && s.InKernel {
		s.Queues, s.Depth, s.PID = s.Kernel.Queues, s.Kernel.Depth, s.Kernel.PID
		s.UserCopy = s.Kernel.Flags.Has(FeatureUserCopy)
	}
	if s.HasRecord {
		s.ServerRunning = s.ServerAlive()
	} else {
		s.ServerRunning = s.PID > 0 && procStart(s.PID) != 0
	}
	switch {
	case !s.InKernel:
		s.State = "gone"
	default:
		s.State = strings.ToLower(s.Kernel.State.String())
		if !s.ServerRunning {
			s.State += " (server gone)"
		}
	}
}

// ParseDeviceID accepts a device as ublkimg prints it ("/dev/ublkb3"), its
// name ("ublkb3"), its character device ("/dev/ublkc3") or its number
// ("3").
func ParseDeviceID(s string) (int, error) {
	name := strings.TrimPrefix(s, "/dev/")
	for _, p := range []string{"ublkb", "ublkc"} {
		if rest, ok := strings.CutPrefix(name, p); ok {
			name = rest
			break
		}
	}
	id, err := strconv.Atoi(name)
	if err != nil || id < 0 || id >= 1<<20 {
		return 0, fmt.Errorf("%q is not a ublk device (expected /dev/ublkbN or N)", s)
	}
	return id, nil
}
