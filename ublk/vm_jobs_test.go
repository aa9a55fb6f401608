package ublk_test

import (
	"strings"
	"testing"

	"ublkimg/vmtest"
)

// jobsScript: on a qcow2 device with a mounted ext4 that fio writes and
// verifies throughout, a bitmap added through the server, a full backup
// that resets it and an incremental one from it, each started while the
// file system is frozen next to a reference copy (qemu-img convert of the
// device) and finished after the thaw, under writes; a live snapshot and a
// live commit back into the base. Every backup equals its reference
// (qemu-img compare), every image passes qemu-img check, fio verifies,
// e2fsck is clean. Then the refusals, each one line that changes nothing.
const jobsScript = `
ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
pidof() { sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb$1.json; }
LOG=/run/ublkimg/ublkb0.log
# wait_log TEXT: until the server's log holds TEXT (a job reached a point).
wait_log() {
	i=0; while ! grep -qF "$1" $LOG && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
	grep -qF "$1" $LOG
}
# backup_frozen NAME ARGS...: freeze the file system, copy the device as the
# reference, start the backup, thaw once its point in time is taken, wait.
backup_frozen() {
	_n=$1; shift
	check $_n-freeze fsfreeze --freeze /mnt
	check $_n-reference qemu-img convert -f raw -T none -O qcow2 $dev /tmp/$_n.ref.qcow2
	t0=$(ms)
	ublkimg backup -p $dev /tmp/$_n.qcow2 "$@" >/tmp/$_n.out 2>&1 &
	bk=$!
	check $_n-point-in-time wait_log "backup to /tmp/$_n.qcow2: point in time taken"
	check $_n-thaw fsfreeze --unfreeze /mnt
	wait $bk
	rc=$?
	tail -c 300 /tmp/$_n.out | tr '\r' '\n' | tail -n 2
	metric ${_n}_ms $(($(ms) - t0))
	check $_n-done test $rc -eq 0
	check $_n-check qemu-img check /tmp/$_n.qcow2
	check $_n-equal qemu-img compare /tmp/$_n.ref.qcow2 /tmp/$_n.qcow2
}

check create ublkimg create -f qcow2 /tmp/d.qcow2 128M
dev=$(ublkimg attach /tmp/d.qcow2)
check attach test -b "$dev" || exit 1
check mkfs mke2fs -q -F -t ext4 "$dev"
check mount mount "$dev" /mnt || exit 1
check bitmap-add ublkimg bitmap --add $dev b0
# At most 300 writes per second: 24 MiB of 4 KiB writes last about 20 s,
# through every job below, then fio reads everything back and verifies.
fio --name=jobs --filename=/mnt/fio --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=24M \
	--rate_iops=300 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never >/tmp/fio.out 2>&1 &
fio=$!
sleep 1
check fio-running kill -0 $fio

backup_frozen full --bitmap b0
sleep 1
backup_frozen inc --bitmap b0 --incremental /tmp/full.qcow2
check inc-backing sh -c "qemu-img info /tmp/inc.qcow2 | grep -q 'backing file: /tmp/full.qcow2'"
metric full_kib $(du -k /tmp/full.qcow2 | cut -f1)
metric inc_kib $(du -k /tmp/inc.qcow2 | cut -f1)

t0=$(ms)
check snapshot ublkimg snapshot --live $dev /tmp/top.qcow2
metric snapshot_ms $(($(ms) - t0))
check snapshot-list sh -c "ublkimg list | grep '$dev' | grep -q /tmp/top.qcow2"
check snapshot-record grep -q '"image": "/tmp/top.qcow2"' /run/ublkimg/ublkb0.json
# The base is read-only now and consistent: qemu-img checks it without -U.
check base-consistent qemu-img check /tmp/d.qcow2
check top-backing sh -c "qemu-img info -U /tmp/top.qcow2 | grep -q 'backing file: /tmp/d.qcow2'"
sleep 2
t0=$(ms)
check commit ublkimg commit --live -p $dev
metric commit_ms $(($(ms) - t0))
check commit-record grep -q '"image": "/tmp/d.qcow2"' /run/ublkimg/ublkb0.json

wait $fio
rc=$?
tail -n 5 /tmp/fio.out
check fio-verified test $rc -eq 0
grep -E 'backup|snapshot|commit' $LOG
metric jobs_log "$(grep -E 'done in|live snapshot|live commit' $LOG | tr '\n' '|')"

# Refusals: one line each, nothing changed.
expect_fail overlay-exists "overlay '/tmp/full.qcow2' already exists" ublkimg snapshot --live $dev /tmp/full.qcow2
expect_fail target-exists "backup target '/tmp/inc.qcow2' already exists" ublkimg backup $dev /tmp/inc.qcow2
expect_fail no-bitmap "Dirty bitmap 'nope' not found" ublkimg backup $dev /tmp/x.qcow2 --bitmap nope
check no-bitmap-nothing-left test ! -e /tmp/x.qcow2
expect_fail bitmap-op-missing "Operation clear on bitmap nope failed: Dirty bitmap 'nope' not found" ublkimg bitmap --clear $dev nope
expect_fail commit-no-backing "has no backing file to commit into" ublkimg commit --live $dev
expect_fail resize-old-kernel "online resize of /dev/ublkb0 needs Linux 6.16 or later \(UBLK_F_UPDATE_SIZE\); the kernel is 6\.12" ublkimg resize $dev +64M
check resize-unchanged sh -c "qemu-img info -U /tmp/d.qcow2 | grep -q 'virtual size: 128 MiB'"
expect_fail unknown-device "/dev/ublkb7: no such device served by ublkimg" ublkimg backup /dev/ublkb7 /tmp/y.qcow2
truncate -s 64M /tmp/r.img
dev2=$(ublkimg attach --recovery /tmp/r.img)
kill -KILL $(pidof ${dev2#/dev/ublkb})
expect_fail no-server "its server \(process [0-9]+\) is not running" ublkimg backup $dev2 /tmp/y.qcow2
expect_fail no-server-restart "is not running" ublkimg restart $dev2
check detach-dead ublkimg detach $dev2
check bitmap-remove ublkimg bitmap --remove $dev b0

check umount umount /mnt
check fsck e2fsck -fn "$dev"
check detach ublkimg detach "$dev"
check image-check qemu-img check /tmp/d.qcow2
check top-check qemu-img check /tmp/top.qcow2
check bitmap-gone sh -c "! qemu-img info /tmp/d.qcow2 | grep -q b0"
`

// TestVMJobs runs jobsScript.
func TestVMJobs(t *testing.T) {
	qemuImg := qemuImgTool(t)
	res := run(t, jobsScript, vmtest.RunOptions{Files: []vmtest.File{qemuImg}})
	for _, name := range []string{"full-equal", "inc-equal", "snapshot", "base-consistent", "commit", "fio-verified",
		"fsck", "image-check", "resize-old-kernel", "no-bitmap"} {
		if !strings.Contains(res.Log, "RESULT "+name+" PASS") {
			t.Errorf("%s did not pass", name)
		}
	}
	for _, m := range []string{"full_ms", "inc_ms", "snapshot_ms", "commit_ms", "full_kib", "inc_kib", "jobs_log"} {
		t.Logf("%s: %s", m, res.Metrics[m])
	}
}
