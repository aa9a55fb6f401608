package vmtest

import (
	"strings"
	"testing"
	"time"
)

// bootScript is TestBootUblk's scenario.
const bootScript = `
result kernel PASS "$(uname -r)"
check harness sh -c '[ "$(cat /proc/sys/kernel/hung_task_timeout_secs)" = 30 ] && [ "$(readlink -f /bin/sh)" = /bin/sh ]'
check ublk-control test -c /dev/ublk-control
check nbd test -b /dev/nbd0
check go-static guestprobe
check mke2fs sh -c 'truncate -s 64M /tmp/fs.img && mke2fs -F -q -t ext4 /tmp/fs.img'
check mount-ext4 sh -c '
	set -e
	mount -o loop /tmp/fs.img /mnt
	dd if=/dev/urandom of=/mnt/f bs=1M count=4 2>/dev/null
	a=$(sha256sum </mnt/f)
	umount /mnt
	mount -o loop,ro /tmp/fs.img /mnt
	b=$(sha256sum </mnt/f)
	umount /mnt
	[ "$a" = "$b" ]'
check fio fio --name=smoke --filename=/tmp/fio.dat --size=16M --rw=randrw --bs=4k \
	--ioengine=io_uring --iodepth=8 --runtime=1 --time_based --verify=crc32c
`

func TestBootUblk(t *testing.T) {
	RequireTools(t)
	start := time.Now()
	k, err := LoadKernel(t.Context(), KernelOptions{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s (%s %s) ready in %v", k.Release, k.Package, k.PackageVersion, time.Since(start).Round(time.Millisecond))
	for _, sym := range []string{"BLK_DEV_UBLK", "BLK_DEV_LOOP", "BLK_DEV_NBD", "EXT4_FS"} {
		v, err := k.ConfigValue(sym)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("CONFIG_%s=%s", sym, v)
	}

	var files []File
	for _, name := range []string{"mke2fs", "fio"} {
		f, err := Tool(name)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	files = append(files, HostFile("/etc/mke2fs.conf"))
	probe, err := GoBinary(t.Context(), "./testdata/guestprobe")
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, probe)

	res := RunTest(t, RunOptions{
		Kernel:  k,
		Script:  bootScript,
		Files:   files,
		Modules: []string{"ublk_drv", "nbd", "loop", "ext4"},
	})
	want := []string{"kernel", "harness", "ublk-control", "nbd", "go-static", "mke2fs", "mount-ext4", "fio"}
	for _, name := range want {
		c := res.Case(name)
		switch {
		case c == nil:
			t.Errorf("case %s: not reported", name)
		case c.Status != "PASS":
			t.Errorf("case %s: %s %s", name, c.Status, c.Detail)
		}
	}
	if c := res.Case("kernel"); c != nil && c.Detail != k.Release {
		t.Errorf("guest runs kernel %q, want %q", c.Detail, k.Release)
	}
}

// TestRunFailures checks that Run fails loudly on each kind of trouble.
func TestRunFailures(t *testing.T) {
	RequireTools(t)
	k, err := LoadKernel(t.Context(), KernelOptions{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, script, want string
		timeout            time.Duration
	}{
		{name: "case", script: "result a PASS; result b FAIL broken", want: "case b: FAIL broken"},
		{name: "exit", script: "exit 3", want: "scenario exited with status 3"},
		{name: "no-done", script: "poweroff -f; sleep 60", want: "no @@ DONE"},
		{name: "panic", script: "echo c >/proc/sysrq-trigger; sleep 60", want: "Kernel panic"},
		{name: "timeout", script: "sleep 600", want: "timed out", timeout: 15 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			res, err := Run(t.Context(), RunOptions{Kernel: k, Script: tc.script, Modules: []string{}, Timeout: tc.timeout})
			t.Logf("run took %v", time.Since(start).Round(time.Millisecond))
			if err == nil {
				t.Fatalf("Run succeeded; log:\n%s", res.Log)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}
