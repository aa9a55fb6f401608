package vm

import (
	"testing"
	"time"
)

// bootScript is TestBootUblk's scenario.
const bootScript = `
result kernel PASS "$(uname -r)"
check ublk-control test -c /dev/ublk-control
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
	k, err := Kernel(t.Context())
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
		Modules: []string{"ublk_drv", "loop", "ext4"},
	})
	want := []string{"kernel", "ublk-control", "go-static", "mke2fs", "mount-ext4", "fio"}
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
