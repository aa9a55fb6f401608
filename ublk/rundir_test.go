package ublk

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tempRunDir points RecordDir at a directory "run" (not yet created) in a
// new temporary directory, which it returns.
func tempRunDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	old := RecordDir
	RecordDir = filepath.Join(dir, "run")
	t.Cleanup(func() { RecordDir = old })
	return dir
}

// TestRunDirCreated: the first record creates the run directory with mode
// 0700, whatever the umask.
func TestRunDirCreated(t *testing.T) {
	tempRunDir(t)
	old := unix.Umask(0)
	defer unix.Umask(old)
	if err := WriteRecord(Record{ID: 1}); err != nil {
		t.Fatal(err)
	}
	st, err := os.Lstat(RecordDir)
	if err != nil {
		t.Fatal(err)
	}
	if !st.IsDir() || st.Mode().Perm() != 0o700 {
		t.Errorf("run directory mode %v, want drwx------", st.Mode())
	}
}

// TestRunDirRefused: a run directory that another user owns, that its
// group or others may write to, or that is a symbolic link is refused by
// every reader and writer, with one line naming it.
func TestRunDirRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the directory to another user")
	}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  string
	}{
		{"world-writable", func(t *testing.T, dir string) { mkdir(t, RecordDir, 0o777) }, "writable by its group or others (mode 0777)"},
		{"group-writable", func(t *testing.T, dir string) { mkdir(t, RecordDir, 0o770) }, "writable by its group or others (mode 0770)"},
		{"sticky-world-writable", func(t *testing.T, dir string) { mkdir(t, RecordDir, 0o1777) }, "mode 1777"},
		{"other-owner", func(t *testing.T, dir string) {
			mkdir(t, RecordDir, 0o700)
			if err := os.Chown(RecordDir, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}, "belongs to uid 65534"},
		{"symlink", func(t *testing.T, dir string) {
			mkdir(t, filepath.Join(dir, "elsewhere"), 0o700)
			if err := os.Symlink("elsewhere", RecordDir); err != nil {
				t.Fatal(err)
			}
		}, "not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tempRunDir(t)
			tc.setup(t, dir)
			ops := map[string]func() error{
				"WriteRecord": func() error { return WriteRecord(Record{ID: 1}) },
				"ReadRecord":  func() error { _, err := ReadRecord(1); return err },
				"RemoveRecord": func() error {
					return RemoveRecord(1, 0)
				},
				"OpenLog": func() error {
					f, err := OpenLog(1)
					if err == nil {
						f.Close()
					}
					return err
				},
				"WriteExitStatus": func() error { return WriteExitStatus(1, nil) },
				"recordIDs":       func() error { _, err := recordIDs(); return err },
			}
			for name, op := range ops {
				err := op()
				if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), RecordDir) ||
					strings.Contains(err.Error(), "\n") {
					t.Errorf("%s: %v, want one line with %q", name, err, tc.want)
				}
			}
			if ents, _ := os.ReadDir(filepath.Join(dir, "elsewhere")); len(ents) != 0 {
				t.Errorf("files written through the symbolic link: %v", ents)
			}
		})
	}
}

// mkdir makes directory path with mode (in the kernel's bits: 0o1777 is
// sticky).
func mkdir(t *testing.T, path string, mode uint32) {
	t.Helper()
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// TestRunDirNoFollow: symbolic links planted under the names a record, its
// temporary file and a log are written to are replaced, never written
// through; a FIFO under a log's name does not block the server; a record
// that is a symbolic link is not read.
func TestRunDirNoFollow(t *testing.T) {
	dir := tempRunDir(t)
	mkdir(t, RecordDir, 0o700)
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("precious\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ublkb1.json", "ublkb1.json.tmp", "ublkb1.exit.tmp", "ublkb1.log", "ublkb1.log.tmp"} {
		if err := os.Symlink(victim, filepath.Join(RecordDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mkfifo(filepath.Join(RecordDir, "ublkb2.log"), 0o600); err != nil {
		t.Fatal(err)
	}

	if err := WriteRecord(Record{ID: 1, Image: "/x.img"}); err != nil {
		t.Fatal(err)
	}
	if err := WriteExitStatus(1, errors.New("boom")); err != nil {
		t.Fatal(err)
	}
	for _, id := range []int{1, 2} {
		f, err := OpenLog(id)
		if err != nil {
			t.Fatalf("OpenLog(%d): %v", id, err)
		}
		if _, err := f.WriteString("log line\n"); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if data, _ := os.ReadFile(victim); string(data) != "precious\n" {
		t.Errorf("the link's target was written: %q", data)
	}
	for _, name := range []string{"ublkb1.json", "ublkb1.exit", "ublkb1.log", "ublkb2.log"} {
		st, err := os.Lstat(filepath.Join(RecordDir, name))
		if err != nil || !st.Mode().IsRegular() {
			t.Errorf("%s: %v, %v; want a regular file", name, st, err)
		}
	}
	for _, name := range []string{"ublkb1.json.tmp", "ublkb1.exit.tmp", "ublkb1.log.tmp"} {
		if _, err := os.Lstat(filepath.Join(RecordDir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (%v)", name, err)
		}
	}
	if r, err := ReadRecord(1); err != nil || r.Image != "/x.img" {
		t.Errorf("record %+v, %v", r, err)
	}
	// A log is appended to, not replaced.
	f, err := OpenLog(1)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("second\n")
	f.Close()
	if data, _ := os.ReadFile(LogPath(1)); string(data) != "log line\nsecond\n" {
		t.Errorf("log %q", data)
	}

	// A record that is a link to a record elsewhere is not read.
	other := filepath.Join(dir, "other.json")
	os.WriteFile(other, []byte(`{"id": 3, "pid": 1, "pid-start": 1}`), 0o644)
	os.Symlink(other, filepath.Join(RecordDir, "ublkb3.json"))
	if _, err := ReadRecord(3); err == nil {
		t.Error("a record behind a symbolic link was read")
	}
}

// TestExitStatus: a server's exit status is one line, found only for the
// server (pid and start time) that left it, removed once taken, and removed
// when a new server of the device writes its record.
func TestExitStatus(t *testing.T) {
	tempRunDir(t)
	self := Record{ID: 4, PID: os.Getpid(), PIDStart: procStart(os.Getpid())}
	if _, ok, err := takeExitStatus(self); ok || err != nil {
		t.Fatalf("status without run directory: %v, %v", ok, err)
	}
	if err := WriteExitStatus(4, errors.Join(errors.New("closing the image: qcow2: Failed to write bitmap 'b0' to file"), errors.New("no space left on device"))); err != nil {
		t.Fatal(err)
	}
	other := self
	other.PIDStart++
	if _, ok, _ := takeExitStatus(other); ok {
		t.Error("the status of another process with the same pid was taken")
	}
	st, ok, err := takeExitStatus(self)
	if !ok || err != nil || st.Error != "closing the image: qcow2: Failed to write bitmap 'b0' to file no space left on device" {
		t.Errorf("status %+v, %v, %v", st, ok, err)
	}
	if _, ok, _ := takeExitStatus(self); ok {
		t.Error("the status was taken twice")
	}
	if err := WriteExitStatus(4, nil); err != nil {
		t.Fatal(err)
	}
	if st, ok, _ := takeExitStatus(self); !ok || st.Error != "" {
		t.Errorf("clean stop: %+v, %v", st, ok)
	}
	// The record of a new server removes a stale status.
	WriteExitStatus(4, errors.New("old"))
	if err := WriteRecord(Record{ID: 4}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(RecordDir, "ublkb4.exit")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale exit status kept: %v", err)
	}
}

// TestStopServerPIDReuse: a record whose pid now belongs to another process
// (the same pid, another start time) never gets that process signalled;
// the record's own server is signalled and waited for.
func TestStopServerPIDReuse(t *testing.T) {
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- sleep.Wait() }()
	defer sleep.Process.Kill()
	pid := sleep.Process.Pid
	start := procStart(pid)
	if start == 0 {
		t.Fatal("no start time for the child")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, rec := range []Record{
		{ID: 1, PID: pid, PIDStart: start - 1}, // an older process had the pid
		{ID: 1, PID: pid, PIDStart: start + 1},
		{ID: 1, PID: pid}, // no start time recorded
	} {
		ran, err := stopServer(ctx, rec, true)
		if ran || err != nil {
			t.Errorf("record %+v: stopServer = %v, %v; want false, nil", rec, ran, err)
		}
	}
	select {
	case err := <-exited:
		t.Fatalf("the process that reused the pid was signalled: %v", err)
	default:
	}
	ran, err := stopServer(ctx, Record{ID: 1, PID: pid, PIDStart: start}, true)
	if !ran || err != nil {
		t.Errorf("the record's own process: stopServer = %v, %v; want true, nil", ran, err)
	}
	select {
	case err := <-exited:
		if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
			t.Errorf("the server ended with %v, want SIGTERM", err)
		}
	case <-ctx.Done():
		t.Error("the record's own process was not stopped")
	}
}

// TestNumberedName: the device numbers of /sys/class/ublk-char entries and
// record files, and the names that are neither.
func TestNumberedName(t *testing.T) {
	for _, tc := range []struct {
		name, prefix, suffix string
		id                   int
		ok                   bool
	}{
		{"ublkc0", "ublkc", "", 0, true},
		{"ublkc42", "ublkc", "", 42, true},
		{"ublkb7.json", "ublkb", ".json", 7, true},
		{"ublkb007.json", "ublkb", ".json", 7, true},
		{"ublkb7.json.tmp", "ublkb", ".json", 0, false},
		{"ublkb7.log", "ublkb", ".json", 0, false},
		{"ublkb.json", "ublkb", ".json", 0, false},
		{"ublkb-1.json", "ublkb", ".json", 0, false},
		{"ublkb+1.json", "ublkb", ".json", 0, false},
		{"ublkb1x.json", "ublkb", ".json", 0, false},
		{"ublkb99999999999999999999.json", "ublkb", ".json", 0, false},
		{"xublkc1", "ublkc", "", 0, false},
		{"ublkc", "ublkc", "", 0, false},
		{"ublkc 1", "ublkc", "", 0, false},
	} {
		id, ok := numberedName(tc.name, tc.prefix, tc.suffix)
		if id != tc.id || ok != tc.ok {
			t.Errorf("numberedName(%q, %q, %q) = %d, %v, want %d, %v", tc.name, tc.prefix, tc.suffix, id, ok, tc.id, tc.ok)
		}
	}
}
