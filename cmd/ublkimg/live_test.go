package main

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"ublkimg/ublk"
)

// TestLiveUsageErrors: the device verbs' mistakes, and devices that are
// not served, are one line each with exit status 1, before any server is
// contacted.
func TestLiveUsageErrors(t *testing.T) {
	dir := tempRecordDir(t)
	plain := filepath.Join(dir, "plain.img")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"backup", "/dev/ublkb0"}, "backup: expecting a device and the image to create (ublkimg backup DEV TARGET)"},
		{[]string{"backup", plain, "t.qcow2"}, "backup: '" + plain + "' is not an attached device (/dev/ublkbN) or image"},
		{[]string{"backup", "/dev/ublkb9", "t.qcow2"}, "/dev/ublkb9: no such device served by ublkimg"},
		{[]string{"backup", "/dev/sda", "t.qcow2"}, "backup: '/dev/sda' is not an attached device"},
		{[]string{"snapshot", "--live", "/dev/ublkb0"}, "snapshot --live: expecting a device and the overlay to create"},
		{[]string{"snapshot", "--live", "-l", "/dev/ublkb0", "o.qcow2"}, "snapshot --live: -l does not apply to a live snapshot"},
		{[]string{"snapshot", "--live", "/dev/ublkb9", "o.qcow2"}, "/dev/ublkb9: no such device served by ublkimg"},
		{[]string{"commit", "--live", "-b", "base", "/dev/ublkb0"}, "commit --live: -b does not apply to a live commit"},
		{[]string{"snapshot", "--live", "--image-opts", "/dev/ublkb0", "o.qcow2"}, "snapshot --live: --image-opts does not apply to a live snapshot"},
		{[]string{"commit", "--live", "--image-opts", "/dev/ublkb0"}, "commit --live: --image-opts does not apply to a live commit"},
		{[]string{"commit", "--live", "/dev/ublkb9"}, "/dev/ublkb9: no such device served by ublkimg"},
		{[]string{"bitmap", "--clear", "/dev/ublkb9", "b0"}, "/dev/ublkb9: no such device served by ublkimg"},
		{[]string{"resize", "/dev/ublkb9", "+1G"}, "/dev/ublkb9: no such device served by ublkimg"},
		{[]string{"stats", "--output", "yaml"}, "--output must be human or json, not 'yaml'"},
		{[]string{"stats", "--interval", "0s"}, "invalid interval 0s"},
		{[]string{"stats", "9"}, "/dev/ublkb9: no such device served by ublkimg"},
		{[]string{"metrics"}, "Required flag \"listen\" not set"},
		{[]string{"metrics", "--listen", "127.0.0.1:0", "extra"}, "metrics: no arguments expected"},
		{[]string{"restart"}, "restart: expecting exactly one device"},
		{[]string{"restart", "3"}, "cannot restart /dev/ublkb3: no such device served by ublkimg"},
	} {
		r := ublkimg(t, tc.args...)
		if r.code != 1 || !strings.Contains(r.stderr, tc.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("%q: exit %d, stderr %q; want one line with %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

// TestAttachedDevice: the live verbs find a device by its path, its name,
// or the image a running server serves; an image no running server serves
// is not attached.
func TestAttachedDevice(t *testing.T) {
	dir := tempRecordDir(t)
	served := filepath.Join(dir, "served.qcow2")
	// This process stands for the server: the record names it.
	if err := ublk.WriteRecord(ublk.Record{ID: 4, Device: "/dev/ublkb4", Image: served}); err != nil {
		t.Fatal(err)
	}
	if err := ublk.WriteRecord(ublk.Record{ID: 5, Device: "/dev/ublkb5", Image: filepath.Join(dir, "dead.qcow2"), PID: 1 << 22, PIDStart: 1}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		arg string
		id  int
		ok  bool
	}{
		{"/dev/ublkb4", 4, true},
		{"ublkb4", 4, true},
		{"/dev/ublkb5", 5, true},
		{served, 4, true},
		{filepath.Join(dir, "dead.qcow2"), 0, false},
		{filepath.Join(dir, "other.qcow2"), 0, false},
	} {
		id, ok, err := attachedDevice(tc.arg)
		if err != nil || id != tc.id || ok != tc.ok {
			t.Errorf("%s: %d, %v, %v; want %d, %v", tc.arg, id, ok, err, tc.id, tc.ok)
		}
	}
}

// TestPauseTimerString: the log's account of a job's pauses.
func TestPauseTimerString(t *testing.T) {
	for _, tc := range []struct {
		p    pauseTimer
		want string
	}{
		{pauseTimer{}, "0 pauses, 0s in all, the longest 0s"},
		{pauseTimer{n: 1, total: 46343 * time.Microsecond, longest: 46343 * time.Microsecond}, "1 pause, 46.343ms in all, the longest 46.343ms"},
		{pauseTimer{n: 2, total: 80830 * time.Microsecond, longest: 51910 * time.Microsecond}, "2 pauses, 80.83ms in all, the longest 51.91ms"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.p, got, tc.want)
		}
	}
}

// TestPrintBackupKey: what ublkimg backup prints after a backup: nothing
// for a device in clear, the secret and the --image-opts of an encrypted
// backup, a warning for one written in clear as asked, and the options of
// an encrypted backing chain under a backup in clear; --plaintext on a
// device in clear gets a one-line note on stderr.
func TestPrintBackupKey(t *testing.T) {
	const opts = "backing.encrypt.key-secret=sec0,driver=qcow2,encrypt.key-secret=sec0,file.filename=/b/inc.qcow2"
	const note = "ublkimg: note: --plaintext changed nothing: the device's image is not encrypted, its backup is in clear anyway\n"
	for _, tc := range []struct {
		res       jobResult
		plaintext bool
		want      string
		wantErr   string
	}{
		{jobResult{Image: "/b/full.qcow2"}, false, "", ""},
		{jobResult{Image: "/b/full.qcow2"}, true, "", note},
		{jobResult{Image: "/b/inc.qcow2", Secret: "sec0", ImageOpts: opts}, false,
			"Backup encrypted (LUKS) with the device's secret 'sec0': open it with --object secret,id=sec0,... --image-opts '" + opts + "'\n", ""},
		{jobResult{Image: "/b/full.raw", Plaintext: true}, true,
			"Backup of an encrypted device written in clear (--plaintext): /b/full.raw holds its data unencrypted\n", ""},
		{jobResult{Image: "/b/inc.qcow2", Plaintext: true, ImageOpts: "backing.encrypt.key-secret=sec0,driver=qcow2,file.filename=/b/inc.qcow2"}, true,
			"Backup of an encrypted device written in clear (--plaintext): /b/inc.qcow2 holds its data unencrypted\n" +
				"Its backing chain is encrypted: open it with --image-opts 'backing.encrypt.key-secret=sec0,driver=qcow2,file.filename=/b/inc.qcow2'\n", ""},
	} {
		var out, errOut strings.Builder
		printBackupKey(&out, &errOut, tc.res, tc.plaintext)
		if out.String() != tc.want || errOut.String() != tc.wantErr {
			t.Errorf("%+v plaintext %v: %q and %q on stderr, want %q and %q", tc.res, tc.plaintext, out.String(), errOut.String(), tc.want, tc.wantErr)
		}
	}
}
