package ublk_test

import (
	"strings"
	"testing"

	"ublkimg/vmtest"
)

// jobsHelpers are the shell functions of the jobs' scenarios.
const jobsHelpers = `
ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
pidof() { sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb$1.json; }
LOG=/run/ublkimg/ublkb0.log
# wait_log TEXT: until the server's log holds TEXT (a job reached a point).
wait_log() {
	i=0; while ! grep -qF "$1" $LOG && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
	grep -qF "$1" $LOG
}
# backup_frozen NAME ARGS...: freeze the file system, copy the device as the
# reference, start the backup, thaw once its point in time is taken, wait;
# then bk_check NAME and bk_compare NAME (qemu-img check of the backup, and
# compare with its reference), which a script may redefine.
bk_check() { qemu-img check /tmp/$1.qcow2; }
bk_compare() { qemu-img compare /tmp/$1.ref.qcow2 /tmp/$1.qcow2; }
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
	tail -c 400 /tmp/$_n.out | tr '\r' '\n' | tail -n 2
	metric ${_n}_ms $(($(ms) - t0))
	check $_n-done test $rc -eq 0
	check $_n-check bk_check $_n
	check $_n-equal bk_compare $_n
}
`

// jobsScript: on a qcow2 device with a mounted ext4 that fio writes and
// verifies throughout, a bitmap added through the server, a full backup
// that resets it and an incremental one from it, each started while the
// file system is frozen next to a reference copy (qemu-img convert of the
// device) and finished after the thaw, under writes; a live snapshot and a
// live commit back into the base. Every backup equals its reference
// (qemu-img compare), every image passes qemu-img check, fio verifies,
// e2fsck is clean. Then the refusals, each one line that changes nothing.
const jobsScript = jobsHelpers + `
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
# A merge through the server, under fio: b1 (disabled) gets what b0 marked.
check bitmap-add-disabled ublkimg bitmap --add --disable $dev b1
check bitmap-merge ublkimg bitmap --merge b0 $dev b1
expect_fail bitmap-merge-missing "Operation merge on bitmap b1 failed: Dirty bitmap 'nope' not found" ublkimg bitmap --merge nope $dev b1
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
# The bitmaps stay in the base, as QEMU leaves them: backup says so.
expect_fail bitmap-in-base "Dirty bitmap 'b0' not found: it is in the backing file '/tmp/d.qcow2', read-only since a live snapshot" \
	ublkimg backup $dev /tmp/z.qcow2 --bitmap b0
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
check bitmap-remove-b1 ublkimg bitmap --remove $dev b1

check umount umount /mnt
check fsck e2fsck -fn "$dev"
check detach ublkimg detach "$dev"
check image-check qemu-img check /tmp/d.qcow2
check top-check qemu-img check /tmp/top.qcow2
check bitmap-gone sh -c "! qemu-img info /tmp/d.qcow2 | grep -Eq 'b0|b1'"
`

// TestVMJobs runs jobsScript.
func TestVMJobs(t *testing.T) {
	qemuImg := qemuImgTool(t)
	res := run(t, jobsScript, vmtest.RunOptions{Files: []vmtest.File{qemuImg}})
	for _, name := range []string{"full-equal", "inc-equal", "snapshot", "base-consistent", "commit", "fio-verified",
		"fsck", "image-check", "resize-old-kernel", "no-bitmap", "bitmap-merge", "bitmap-merge-missing", "bitmap-in-base"} {
		if !strings.Contains(res.Log, "RESULT "+name+" PASS") {
			t.Errorf("%s did not pass", name)
		}
	}
	for _, m := range []string{"full_ms", "inc_ms", "snapshot_ms", "commit_ms", "full_kib", "inc_kib", "jobs_log"} {
		t.Logf("%s: %s", m, res.Metrics[m])
	}
}

// liveEncryptedScript: an encrypted (LUKS) qcow2 image attached with
// --image-opts and recovery, ext4 on it under fio verify: a live snapshot
// (the overlay encrypted with the same secret, the record's option string
// naming it and the base as backing.*), a restart onto the overlay from
// the record, a backup running while a second job is tried (refused in one
// line, the backup completes), a live commit back into the base. Then
// qemu-img check and compare read the base, with the secret, as the
// device read; no file holds a marker written after the snapshot in clear.
const liveEncryptedScript = jobsHelpers + `
printf 'correct horse' >/tmp/key
SEC="--object secret,id=sec0,file=/tmp/key"
OPTS=driver=qcow2,file.filename=/tmp/e.qcow2,encrypt.key-secret=sec0
TOPOPTS=driver=qcow2,file.filename=/tmp/e-top.qcow2,encrypt.key-secret=sec0
check create ublkimg create -f qcow2 $SEC -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 /tmp/e.qcow2 128M
dev=$(ublkimg attach --recovery $SEC --image-opts "$OPTS")
check attach test -b "$dev" || exit 1
check mkfs mke2fs -q -F -t ext4 "$dev"
check mount mount "$dev" /mnt || exit 1
# 48 MiB for the backup to copy: it runs for seconds, long enough for a
# second job to find it running.
check fill dd if=/dev/urandom of=/mnt/big bs=1M count=48 conv=fsync
fio --name=enc --filename=/mnt/fio --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=24M \
	--rate_iops=200 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never >/tmp/fio.out 2>&1 &
fio=$!
sleep 1
check fio-running kill -0 $fio

t0=$(ms)
check snapshot ublkimg snapshot --live $dev /tmp/e-top.qcow2
metric snapshot_ms $(($(ms) - t0))
check record-opts grep -q '"image-opts": "backing.encrypt.key-secret=sec0,driver=qcow2,encrypt.key-secret=sec0,file.filename=/tmp/e-top.qcow2' /run/ublkimg/ublkb0.json
check top-encrypted sh -c "qemu-img info -U $SEC --image-opts '$TOPOPTS' | grep -q 'encrypted: yes'"
check base-check qemu-img check $SEC --image-opts "$OPTS"
echo MARKER-written-after-the-snapshot-0123456789 >/mnt/marker
sync /mnt/marker
t0=$(ms)
check restart ublkimg restart $SEC $dev
metric restart_ms $(($(ms) - t0))
check restart-record grep -q '"image": "/tmp/e-top.qcow2"' /run/ublkimg/ublkb0.json

# Backups of the encrypted device: the CLI prints the --image-opts that open
# them (secret, and the backing chain's); check and compare read them so.
bk_opts() { sed -n "s/.*--image-opts '\([^']*\)'.*/\1/p" /tmp/$1.out; }
bk_check() { qemu-img check $SEC --image-opts "$(bk_opts $1)"; }
bk_compare() { qemu-img compare $SEC --image-opts driver=qcow2,file.filename=/tmp/$1.ref.qcow2 "$(bk_opts $1)"; }
check bitmap-add ublkimg bitmap --add $dev b0
# A full backup, its point in time with the file system frozen next to a
# reference copy; a second job while it runs: refused, the backup goes on.
check bk-freeze fsfreeze --freeze /mnt
check bk-reference qemu-img convert -f raw -T none -O qcow2 $dev /tmp/bk.ref.qcow2
check marker-in-reference grep -q MARKER-written-after /tmp/bk.ref.qcow2
t0=$(ms)
ublkimg backup -p $dev /tmp/bk.qcow2 --bitmap b0 >/tmp/bk.out 2>&1 &
bk=$!
check backup-started wait_log "backup to /tmp/bk.qcow2: point in time taken"
check bk-thaw fsfreeze --unfreeze /mnt
expect_fail second-commit "/dev/ublkb0 is busy with a backup job: wait for it to end" ublkimg commit --live $dev
expect_fail second-snapshot "/dev/ublkb0 is busy with a backup job: wait for it to end" ublkimg snapshot --live $dev /tmp/x.qcow2
check second-nothing-left test ! -e /tmp/x.qcow2
wait $bk
check backup-done test $? -eq 0
metric backup_ms $(($(ms) - t0))
tail -c 400 /tmp/bk.out | tr '\r' '\n' | tail -n 2
check backup-secret-told grep -q "Backup encrypted (LUKS) with the device's secret 'sec0': open it with --object secret,id=sec0,... --image-opts 'driver=qcow2,encrypt.key-secret=sec0,file.filename=/tmp/bk.qcow2'" /tmp/bk.out
check backup-encrypted sh -c "qemu-img info $SEC --image-opts '$(bk_opts bk)' | grep -q 'encrypted: yes'"
check backup-check bk_check bk
check backup-equal bk_compare bk
rm -f /tmp/bk.ref.qcow2

# An incremental one over it, encrypted too, opened with its backing's secret.
echo MARKER-before-the-incremental-0123456789 >/mnt/marker2
sync /mnt/marker2
sleep 1
backup_frozen bkinc --bitmap b0 --incremental /tmp/bk.qcow2
check inc-marker-in-reference grep -q MARKER-before-the-incremental /tmp/bkinc.ref.qcow2
check inc-opts grep -q "open it with --object secret,id=sec0,... --image-opts 'backing.encrypt.key-secret=sec0,driver=qcow2,encrypt.key-secret=sec0,file.filename=/tmp/bkinc.qcow2'" /tmp/bkinc.out
check inc-backing sh -c "qemu-img info $SEC --image-opts 'driver=qcow2,file.filename=/tmp/bkinc.qcow2,encrypt.key-secret=sec0' | grep -q 'backing file: /tmp/bk.qcow2'"
rm -f /tmp/bkinc.ref.qcow2
metric bk_kib $(du -k /tmp/bk.qcow2 | cut -f1)
metric bk_inc_kib $(du -k /tmp/bkinc.qcow2 | cut -f1)

# Raw: refused in one line unless asked for in clear.
expect_fail raw-refused "backup: the device's image is encrypted and a raw target would hold its data in clear: use -f qcow2 \(encrypted with the image's secret\), or --plaintext to write it in clear$" \
	ublkimg backup -f raw $dev /tmp/bk.raw
check raw-refused-nothing-left test ! -e /tmp/bk.raw
t0=$(ms)
check raw-plaintext ublkimg backup -f raw --plaintext $dev /tmp/bk.raw
metric raw_ms $(($(ms) - t0))
check raw-in-clear grep -q MARKER-before-the-incremental /tmp/bk.raw
rm -f /tmp/bk.raw
check bitmap-remove ublkimg bitmap --remove $dev b0

t0=$(ms)
check commit ublkimg commit --live -p $dev
metric commit_ms $(($(ms) - t0))
check commit-record grep -q '"image-opts": "driver=qcow2,encrypt.key-secret=sec0,file.filename=/tmp/e.qcow2"' /run/ublkimg/ublkb0.json
wait $fio
rc=$?
tail -n 5 /tmp/fio.out
check fio-verified test $rc -eq 0
grep -E 'backup|snapshot|commit|restart' $LOG
metric jobs_log "$(grep -E 'done in|live snapshot|live commit' $LOG | tr '\n' '|')"
check umount umount /mnt
check fsck e2fsck -fn "$dev"
check device-copy dd if=$dev of=/tmp/dev.raw bs=1M
check detach ublkimg detach "$dev"
check qemu-check qemu-img check $SEC --image-opts "$OPTS"
check qemu-check-top qemu-img check $SEC --image-opts "$TOPOPTS,backing.encrypt.key-secret=sec0"
check qemu-compare qemu-img compare $SEC --image-opts "$OPTS" driver=raw,file.filename=/tmp/dev.raw
check no-plaintext sh -c "! grep -q -e MARKER-written-after -e MARKER-before-the-incremental /tmp/e.qcow2 /tmp/e-top.qcow2 /tmp/bk.qcow2 /tmp/bkinc.qcow2"
`

// TestVMLiveEncrypted runs liveEncryptedScript.
func TestVMLiveEncrypted(t *testing.T) {
	qemuImg := qemuImgTool(t)
	res := run(t, liveEncryptedScript, vmtest.RunOptions{Files: []vmtest.File{qemuImg}})
	for _, name := range []string{"snapshot", "record-opts", "top-encrypted", "restart", "second-commit", "second-snapshot",
		"backup-done", "commit", "commit-record", "fio-verified", "fsck", "qemu-check",
		"qemu-check-top", "qemu-compare", "no-plaintext", "marker-in-reference", "backup-secret-told", "backup-encrypted",
		"backup-check", "backup-equal", "bkinc-done", "bkinc-check", "bkinc-equal", "inc-marker-in-reference",
		"inc-opts", "inc-backing", "raw-refused", "raw-refused-nothing-left", "raw-plaintext", "raw-in-clear"} {
		if !strings.Contains(res.Log, "RESULT "+name+" PASS") {
			t.Errorf("%s did not pass", name)
		}
	}
	for _, m := range []string{"snapshot_ms", "restart_ms", "backup_ms", "bkinc_ms", "raw_ms", "bk_kib", "bk_inc_kib", "commit_ms", "jobs_log"} {
		t.Logf("%s: %s", m, res.Metrics[m])
	}
}
