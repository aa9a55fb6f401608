package ublk_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"ublkimg/vmtest"
)

// The VM tests boot Debian's 6.12 kernel with ublk_drv (vmtest) and run
// the ublkimg command in it. They are skipped unless UBLKIMG_VM=1.
//
// With UBLKIMG_VM_RACE=1 the ublkimg command and the guest test binary are
// built with the race detector; every process of a scenario (the servers
// above all) writes its race reports to /tmp/race.<pid>, and a scenario
// that leaves any fails (case no-data-races).

// cliPkg is the ublkimg command the scenarios run.
const cliPkg = "ublkimg/cmd/ublkimg"

// raceVM: UBLKIMG_VM_RACE=1 runs the scenarios with race-enabled binaries.
var raceVM = os.Getenv("UBLKIMG_VM_RACE") == "1"

var guestTools = struct {
	once  sync.Once
	files []vmtest.File
	err   error
}{}

// tools returns the ublkimg binary (built without cgo) and the guest programs the
// scenarios use (mke2fs, e2fsck, fio, fstrim).
func tools(t *testing.T) []vmtest.File {
	t.Helper()
	vmtest.RequireTools(t)
	guestTools.once.Do(func() {
		build := vmtest.GoBinary
		if raceVM {
			build = vmtest.GoRaceBinary
		}
		bin, err := build(t.Context(), cliPkg)
		if err != nil {
			guestTools.err = err
			return
		}
		files := []vmtest.File{bin, vmtest.HostFile("/etc/mke2fs.conf"),
			vmtest.DataFile("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"), 0o644),
			vmtest.DataFile("/etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)}
		for _, name := range []string{"mke2fs", "e2fsck", "fio", "fstrim"} {
			f, err := vmtest.Tool(name)
			if err != nil {
				guestTools.err = err
				return
			}
			files = append(files, f)
		}
		guestTools.files = files
	})
	if guestTools.err != nil {
		t.Fatal(guestTools.err)
	}
	return guestTools.files
}

// prelude defines shell helpers for every scenario.
const prelude = `
set -u
# fio_verify NAME FILE ARGS...: a fio job that writes and verifies with crc32c.
fio_verify() {
	_n=$1 _f=$2
	shift 2
	check "$_n" fio --name="$_n" --filename="$_f" --ioengine=io_uring --direct=1 \
		--verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 "$@"
}
# expect_fail NAME REGEX CMD...: CMD must fail with exactly one line of
# output, which matches the extended regular expression REGEX.
expect_fail() {
	_n=$1 _p=$2
	shift 2
	_out=$("$@" 2>&1) && { result "$_n" FAIL "succeeded: $_out"; return; }
	echo "  [$_n] $_out"
	_lines=$(printf '%s\n' "$_out" | wc -l)
	if ! printf '%s\n' "$_out" | grep -Eq "$_p"; then
		result "$_n" FAIL "want '$_p': $_out"
	elif [ "$_lines" -ne 1 ]; then
		result "$_n" FAIL "$_lines lines: $_out"
	else
		result "$_n" PASS "$_out"
	fi
}
sums() { (cd /mnt && find . -type f | sort | xargs sha256sum); }
`

func run(t *testing.T, script string, opts vmtest.RunOptions) *vmtest.Result {
	t.Helper()
	opts.Files = append(tools(t), opts.Files...)
	if opts.Modules == nil {
		opts.Modules = []string{"ublk_drv", "ext4"}
	}
	opts.Script = prelude + script
	if raceVM {
		opts.Script = raceCheck(opts.Script)
		if opts.Timeout == 0 && os.Getenv("UBLKIMG_VM_TIMEOUT") == "" {
			opts.Timeout = 3 * vmtest.DefaultTimeout
		}
	}
	return vmtest.RunTest(t, opts)
}

// raceCheck wraps a scenario for race-enabled binaries: reports go to
// files, and any file left at the end (or at an early exit) fails the run.
// The race runtime slows every process several times over, so run gives
// such runs three times the default timeout.
func raceCheck(script string) string {
	return `export GORACE="log_path=/tmp/race halt_on_error=0"
no_data_races() {
	set -- /tmp/race.*
	if [ -e "$1" ]; then
		cat "$@"
		result no-data-races FAIL "$# race report(s): $*"
	else
		result no-data-races PASS
	fi
}
trap no_data_races EXIT
` + script
}

// lifecycleScript is the main scenario on one image format ($FMT): attach,
// mkfs, mount, files and fio verification, detach, re-attach and compare,
// fsck, fstrim shrinking the image, list and records.
const lifecycleScript = `
IMG=/tmp/disk.$FMT
check create mkimg $IMG 256M || exit 1
dev=$(ublkimg attach $IMG)
check attach test -b "$dev" || exit 1
check record test -f /run/ublkimg/ublkb0.json
check list sh -c "ublkimg list | grep '$dev' | grep -q 'live'"
check list-json sh -c "ublkimg list --output json | grep -q '\"image\": \"$IMG\"'"
check mkfs mke2fs -q -F -t ext4 "$dev"
check mount mount "$dev" /mnt || exit 1
check files sh -c 'for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i*4)) 2>/dev/null || exit 1; done'
fio_verify fio-4k-randwrite /mnt/fio4k --rw=randwrite --bs=4k --iodepth=16 --size=24M
fio_verify fio-128k-seq /mnt/fio128k --rw=write --bs=128k --iodepth=4 --size=48M
sums >/tmp/sums.before
check umount umount /mnt
check detach ublkimg detach "$dev"
check gone sh -c "! test -e $dev && ! test -e /dev/ublkc0 && ! test -e /run/ublkimg/ublkb0.json"
dev=$(ublkimg attach $IMG)
check reattach test -b "$dev" || exit 1
check fsck e2fsck -fn "$dev"
check remount mount "$dev" /mnt
sums >/tmp/sums.after
check same-data cmp /tmp/sums.before /tmp/sums.after
before=$(du -k $IMG | cut -f1)
rm -f /mnt/fio128k /mnt/fio4k /mnt/f8 /mnt/f7
sync
check fstrim fstrim -v /mnt
after=$(du -k $IMG | cut -f1)
metric image_kib_before_trim $before
metric image_kib_after_trim $after
check trim-shrinks test "$after" -lt $((before - 40000))
check umount2 umount /mnt
check detach2 ublkimg detach 0
check list-empty sh -c 'test -z "$(ublkimg list)"'
check image-check imgcheck $IMG
`

func TestVMLifecycleRaw(t *testing.T) {
	run(t, `FMT=raw
mkimg() { truncate -s "$2" "$1"; }
imgcheck() { true; }
`+lifecycleScript, vmtest.RunOptions{})
}

// qemuImgTool is the host's qemu-img, for scenarios that check images
// with it.
func qemuImgTool(t *testing.T) vmtest.File {
	t.Helper()
	vmtest.RequireTools(t)
	f, err := vmtest.Tool("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestVMLifecycleQcow2 is the same scenario on a qcow2 image ublkimg
// creates, checked with qemu-img check at the end.
func TestVMLifecycleQcow2(t *testing.T) {
	qemuImg := qemuImgTool(t)
	run(t, `FMT=qcow2
mkimg() { ublkimg create -f qcow2 "$1" "$2"; }
imgcheck() { qemu-img check "$1"; }
`+lifecycleScript, vmtest.RunOptions{Files: []vmtest.File{qemuImg}})
}

// qcow2FeaturesScript: an encrypted (LUKS) qcow2 image served with its key
// from a secret object, refused with a wrong key, a raw LUKS volume
// (format luks), and a qcow2 image with a
// persistent dirty bitmap that records the device's writes; both pass
// qemu-img check, and qemu-img sees the bitmap consistent after detach.
const qcow2FeaturesScript = `
printf 'correct horse' >/tmp/key
printf 'wrong horse' >/tmp/badkey
SEC="--object secret,id=sec0,file=/tmp/key"
OPTS="driver=qcow2,file.filename=/tmp/enc.qcow2,encrypt.key-secret=sec0"
check enc-create ublkimg create -f qcow2 $SEC -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 /tmp/enc.qcow2 64M
dev=$(ublkimg attach $SEC --image-opts "$OPTS")
check enc-attach test -b "$dev" || exit 1
check enc-mkfs mke2fs -q -F -t ext4 "$dev"
fio_verify enc-fio "$dev" --rw=randwrite --bs=4k --iodepth=16 --size=16M --offset=32M
check enc-detach ublkimg detach "$dev"
check enc-no-plaintext sh -c "! grep -q 'lost+found' /tmp/enc.qcow2"
expect_fail enc-wrong-key "Invalid password" ublkimg attach --object secret,id=sec0,file=/tmp/badkey --image-opts "$OPTS"
dev=$(ublkimg attach $SEC --image-opts "$OPTS")
check enc-fsck e2fsck -fn "$dev"
check enc-detach2 ublkimg detach "$dev"
check enc-qemu-check qemu-img check $SEC --image-opts "$OPTS"
dev=$(ublkimg attach --object secret,id=sec0,data='correct horse' --image-opts "$OPTS")
check enc-attach-data test -b "$dev" || exit 1
pid=$(sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb${dev#/dev/ublkb}.json)
check enc-no-secret-in-cmdline sh -c "test -n '$pid' && ! tr '\\0' ' ' </proc/$pid/cmdline | grep -q 'correct horse'"
check enc-detach3 ublkimg detach "$dev"

check luks-create ublkimg create -f luks $SEC -o key-secret=sec0,iter-time=10 /tmp/vol.luks 32M
dev=$(ublkimg attach $SEC --image-opts driver=luks,file.filename=/tmp/vol.luks,key-secret=sec0)
check luks-attach test -b "$dev" || exit 1
fio_verify luks-fio "$dev" --rw=randwrite --bs=4k --iodepth=16 --size=8M
check luks-detach ublkimg detach "$dev"
check luks-qemu-read qemu-img convert $SEC --image-opts driver=luks,file.filename=/tmp/vol.luks,key-secret=sec0 -O raw /tmp/vol.raw

check bm-create ublkimg create -f qcow2 /tmp/bm.qcow2 64M
check bm-add qemu-img bitmap --add /tmp/bm.qcow2 b0
dev=$(ublkimg attach /tmp/bm.qcow2)
check bm-attach test -b "$dev" || exit 1
check bm-write dd if=/dev/urandom of="$dev" bs=64k count=4 seek=100 oflag=direct
check bm-in-use-while-attached sh -c "qemu-img info -U /tmp/bm.qcow2 | grep -q 'in-use'"
check bm-detach ublkimg detach "$dev"
check bm-consistent sh -c "qemu-img info /tmp/bm.qcow2 | grep -q 'auto' && ! qemu-img info /tmp/bm.qcow2 | grep -q 'in-use'"
check bm-qemu-check qemu-img check /tmp/bm.qcow2
`

// TestVMQcow2Features serves an encrypted qcow2 image and one with a
// persistent bitmap through ublk.
func TestVMQcow2Features(t *testing.T) {
	qemuImg := qemuImgTool(t)
	run(t, qcow2FeaturesScript, vmtest.RunOptions{Files: []vmtest.File{qemuImg}})
}

// miscScript: read-only attach (--read-only, and read-only=on in --image-opts),
// discard and detect-zeroes options, two queues under concurrent fio jobs, 4 KiB
// blocks, data moved with UBLK_F_USER_COPY, detach refusing a mounted device,
// and every error line.
const miscScript = `
truncate -s 128M /tmp/a.img /tmp/b.img
dev=$(ublkimg attach /tmp/a.img)
check mkfs mke2fs -q -F -t ext4 "$dev"
check detach ublkimg detach "$dev"

dev=$(ublkimg attach --read-only /tmp/a.img)
check ro-flag sh -c "test \$(blockdev --getro $dev) = 1"
expect_fail ro-write "Operation not permitted|Read-only|Permission denied" \
	sh -c 'dd if=/dev/zero of="$1" bs=4k count=1 oflag=direct 2>/tmp/dd.err; rc=$?; grep -v records /tmp/dd.err; exit $rc' _ "$dev"
check ro-mount mount -o ro "$dev" /mnt
expect_fail ro-fs-write "Read-only file system" touch /mnt/x
expect_fail detach-busy "in use" ublkimg detach "$dev"
check ro-umount umount /mnt
check ro-detach ublkimg detach "$dev"

# --image-opts options reach the device: read-only=on makes it read-only
# without --read-only, discard=ignore takes its discard away, and
# detect-zeroes=unmap deallocates what is overwritten with zeros.
dev=$(ublkimg attach --image-opts driver=raw,file.filename=/tmp/a.img,read-only=on)
check ro-opts-flag sh -c "test \$(blockdev --getro $dev) = 1"
expect_fail ro-opts-write "Operation not permitted|Read-only|Permission denied" \
	sh -c 'dd if=/dev/zero of="$1" bs=4k count=1 oflag=direct 2>/tmp/dd.err; rc=$?; grep -v records /tmp/dd.err; exit $rc' _ "$dev"
check ro-opts-record grep -q '"read-only": true' /run/ublkimg/$(basename $dev).json
check ro-opts-detach ublkimg detach "$dev"
dev=$(ublkimg attach /tmp/b.img)
check discard-default sh -c "test \$(cat /sys/block/$(basename $dev)/queue/discard_max_bytes) -gt 0"
check discard-default-detach ublkimg detach "$dev"
dev=$(ublkimg attach --image-opts driver=raw,file.filename=/tmp/b.img,discard=ignore)
check discard-ignore sh -c "test \$(cat /sys/block/$(basename $dev)/queue/discard_max_bytes) = 0"
check discard-ignore-detach ublkimg detach "$dev"
truncate -s 16M /tmp/z.img
dev=$(ublkimg attach --image-opts driver=raw,file.filename=/tmp/z.img,detect-zeroes=unmap)
check dz-data dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct
check dz-allocated sh -c "test \$(stat -c %b /tmp/z.img) -ge 8192"
check dz-zeros dd if=/dev/zero of="$dev" bs=1M count=4 oflag=direct
check dz-detach ublkimg detach "$dev"
check dz-freed sh -c "test \$(stat -c %b /tmp/z.img) -lt 1024"

dev=$(ublkimg attach --queues 2 --depth 64 /tmp/b.img)
check two-queues sh -c "ublkimg list | grep '$dev' | awk '{print \$5}' | grep -qx 2"
check mq-dirs sh -c "test \$(ls /sys/block/ublkb0/mq | wc -l) -eq 2"
fio_verify fio-2q "$dev" --rw=randrw --bs=4k --iodepth=16 --size=32M --numjobs=2 --offset_increment=32M \
	--cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting
check detach-2q ublkimg detach "$dev"

dev=$(ublkimg attach --block-size 4096 /tmp/b.img)
check bs4k sh -c "test \$(blockdev --getss $dev) = 4096"
fio_verify fio-bs4k "$dev" --rw=randwrite --bs=4k --iodepth=8 --size=8M
check detach-bs4k ublkimg detach "$dev"

dev=$(ublkimg attach --user-copy --queues 2 /tmp/b.img)
check user-copy-record grep -q '"user-copy": true' /run/ublkimg/ublkb${dev#/dev/ublkb}.json
fio_verify fio-user-copy "$dev" --rw=randrw --bsrange=4k-128k --iodepth=16 --size=32M --numjobs=2 --offset_increment=32M \
	--group_reporting
check detach-user-copy ublkimg detach "$dev"

# A raw image in tmpfs gets user copy unasked and READs copy from the
# image's pages: reading its holes allocates nothing, and bytes another
# process writes to the file read back through the device.
truncate -s 64M /tmp/sparse.img
dev=$(ublkimg attach /tmp/sparse.img)
check tmpfs-user-copy grep -q '"user-copy": true' /run/ublkimg/ublkb${dev#/dev/ublkb}.json
check tmpfs-holes-read dd if="$dev" of=/dev/null bs=1M iflag=direct
check tmpfs-holes-unfilled sh -c "test \$(stat -c %b /tmp/sparse.img) -lt 256"
check tmpfs-data dd if=/dev/urandom of=/tmp/sparse.img bs=1M count=4 seek=8 conv=notrunc
check tmpfs-data-read sh -c "dd if=$dev bs=1M iflag=direct 2>/dev/null | cmp - /tmp/sparse.img"
check tmpfs-detach ublkimg detach "$dev"
rm -f /tmp/sparse.img

ublkimg attach --foreground /tmp/b.img >/tmp/fg.out 2>/tmp/fg.err &
fg=$!
i=0; while [ ! -s /tmp/fg.out ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
dev=$(cat /tmp/fg.out)
check fg-attach test -b "$dev"
kill -INT $fg
wait $fg
check fg-sigint-exit test $? -eq 0
check fg-gone sh -c "! test -e $dev && ! test -e /run/ublkimg/ublkb0.json"

dev=$(cd /tmp && ublkimg attach b.img)
check relative-path sh -c "ublkimg list | grep -q '/tmp/b.img'"
check relative-detach ublkimg detach "$dev"

dev=$(ublkimg attach --id 3 /tmp/a.img)
check id3 test "$dev" = /dev/ublkb3
expect_fail err-in-use "lock" ublkimg attach /tmp/a.img
expect_fail err-id-taken "device id 3 is already in use" ublkimg attach --id 3 /tmp/b.img
check detach-id3 ublkimg detach 3
expect_fail err-missing "No such file or directory" ublkimg attach /tmp/missing.img
expect_fail err-not-root "root" su -s /bin/sh nobody -c '/usr/local/bin/ublkimg attach /tmp/a.img' 
expect_fail err-detach-none "does not exist" ublkimg detach 7
expect_fail err-bad-device "not a ublk device" ublkimg detach /dev/sda
check rmmod rmmod ublk_drv
expect_fail err-no-driver "modprobe ublk_drv" ublkimg attach /tmp/a.img
`

func TestVMMisc(t *testing.T) {
	run(t, miscScript, vmtest.RunOptions{})
}

// killScript: SIGKILL of the server under load leaves the VM usable.
const killScript = `
truncate -s 128M /tmp/k.img
dev=$(ublkimg attach /tmp/k.img)
pid=$(sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb0.json)
check have-pid test -n "$pid"
fio --name=load --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
	--iodepth=16 --time_based --runtime=100 >/tmp/fio.out 2>&1 &
fio=$!
sleep 3
start=$(date +%s)
kill -KILL "$pid"
wait $fio
end=$(date +%s)
tail -n 3 /tmp/fio.out
metric fio_end_after_kill_s $((end - start))
check fio-ended test $((end - start)) -lt 60
i=0; while [ -e "$dev" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
check disk-gone test ! -e "$dev"
ublkimg list
check list-dead sh -c "ublkimg list | grep -q 'server gone'"
check detach-dead ublkimg detach 0
check cleaned sh -c '! test -e /dev/ublkc0 && ! test -e /run/ublkimg/ublkb0.json'
dev=$(ublkimg attach /tmp/k.img)
check reattach dd if="$dev" of=/dev/null bs=1M count=4 iflag=direct
check detach ublkimg detach "$dev"
`

func TestVMKill(t *testing.T) {
	res := run(t, killScript, vmtest.RunOptions{})
	if !strings.Contains(res.Log, "RESULT disk-gone PASS") {
		t.Error("the disk did not disappear after the server was killed")
	}
}

// TestVMGuestTests runs this package's TestGuest tests inside the VM, where
// the kernel has ublk: start and close in every way, start failures at every
// point after ADD_DEV, a device stopped from outside, I/O errors, each with
// goroutine and file-descriptor leak checks.
func TestVMGuestTests(t *testing.T) {
	vmtest.RequireTools(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "ublk.test")
	args, cgo := []string{"test", "-c", "-trimpath", "-o", bin}, "CGO_ENABLED=0"
	if raceVM {
		args, cgo = append(args, "-race"), "CGO_ENABLED=1"
	}
	cmd := exec.CommandContext(t.Context(), "go", append(args, ".")...)
	cmd.Env = append(os.Environ(), cgo)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go test -c: %v\n%s", err, out)
	}
	run(t, `check guest-tests /usr/local/bin/ublk.test -test.run '^TestGuest' -test.v -test.count=1 -test.timeout=4m`,
		vmtest.RunOptions{Files: []vmtest.File{{Src: bin, Dst: "/usr/local/bin/ublk.test"}}})
}

// recoveryScript: devices attached with --recovery survive a SIGKILL of
// their server (QUIESCED, I/O held), and `ublkimg recover` serves them
// again while fio keeps writing and verifying on a mounted ext4, for a raw
// and a qcow2 image; recover's refusals; detach of a quiesced device; the
// image lock of a killed server does not stop an attach or recover right
// after the kill.
const recoveryScript = `
pidof() { sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb$1.json; }
recovery_case() {
	F=$1 IMG=/tmp/r.$1
	mkimg $IMG 256M
	dev=$(ublkimg attach $IMG --recovery --queues 2)
	check $F-attach test -b "$dev" || return 1
	id=${dev#/dev/ublkb}
	check $F-record grep -q '"recovery": true' /run/ublkimg/ublkb$id.json
	expect_fail $F-recover-live "is running" ublkimg recover $id
	check $F-mkfs mke2fs -q -F -t ext4 "$dev"
	check $F-mount mount "$dev" /mnt || return 1
	# 4096 writes at most 500 per second: still writing when the server
	# is killed 2 s in, however fast the machine.
	fio --name=rec --filename=/mnt/fio --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
		--iodepth=16 --size=16M --rate_iops=500 --verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/fio.$F 2>&1 &
	fio=$!
	sleep 2
	check $F-fio-mid-stream kill -0 $fio
	kill -KILL $(pidof $id)
	dd if="$dev" of=/dev/null bs=4k count=1 skip=4000 iflag=direct 2>/dev/null &
	dd=$!
	sleep 2
	ublkimg list
	check $F-device-kept test -b "$dev"
	check $F-list-quiesced sh -c "ublkimg list | grep '$dev' | grep -q 'quiesced (server gone)'"
	check $F-read-blocks kill -0 $dd
	check $F-fio-blocks kill -0 $fio
	expect_fail $F-recover-other "served $IMG, not /tmp/other.img" ublkimg recover $id /tmp/other.img
	t0=$(date +%s)
	check $F-recover ublkimg recover "$dev" $IMG
	wait $dd
	check $F-read-done test $? -eq 0
	wait $fio
	rc=$?
	metric ${F}_fio_after_recover_s $(($(date +%s) - t0))
	tail -n 4 /tmp/fio.$F
	check $F-fio-verified test $rc -eq 0
	check $F-list-live sh -c "ublkimg list | grep '$dev' | grep -q 'live'"
	check $F-umount umount /mnt
	check $F-fsck e2fsck -fn "$dev"
	check $F-detach ublkimg detach "$dev"
	imgcheck $IMG
}
mkimg() { truncate -s "$2" "$1"; }
imgcheck() { true; }
recovery_case raw
mkimg() { ublkimg create -f qcow2 "$1" "$2" >/dev/null; }
imgcheck() {
	qemu-img check "$1"
	rc=$?
	metric qcow2_check_exit $rc
	# 3: leaked clusters only, which a kill between a cluster's refcount
	# and its L2 entry leaves (as a killed QEMU does); 0: clean.
	check qcow2-check test $rc -eq 0 -o $rc -eq 3
}
recovery_case qcow2

# Recover right after the kill (the dead server's rings, and the image
# lock they hold, are released asynchronously), then kill again and detach
# the quiesced device. The writes before the kill are acknowledged without
# any flush, and allocate qcow2 clusters: they must survive the server.
ublkimg create -f qcow2 /tmp/q.qcow2 64M >/dev/null
dev=$(ublkimg attach --recovery /tmp/q.qcow2)
dd if=/dev/urandom of=/tmp/q.data bs=64k count=128 2>/dev/null
check write-unflushed sh -c "test \$(wc -c </tmp/q.data) -eq 8388608 && dd if=/tmp/q.data of=$dev bs=64k seek=16 oflag=direct"
kill -KILL $(pidof 0)
check recover-at-once ublkimg recover 0
check acknowledged-kept sh -c "dd if=$dev bs=64k skip=16 count=128 iflag=direct 2>/dev/null | cmp - /tmp/q.data"
kill -KILL $(pidof 0)
sleep 1
check detach-quiesced ublkimg detach 0
check quiesced-gone sh -c '! test -e /dev/ublkb0 && ! test -e /dev/ublkc0 && ! test -e /run/ublkimg/ublkb0.json'

# An encrypted qcow2 image attached with --image-opts: its record keeps the
# option string (the secret's ID, not its data), and recover reopens the
# image with it once given the secret again with --object.
t0=$(date +%s)
printf 'correct horse' >/tmp/key
SEC="--object secret,id=sec0,file=/tmp/key"
OPTS="driver=qcow2,file.filename=/tmp/enc.qcow2,encrypt.key-secret=sec0"
ublkimg create -f qcow2 $SEC -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 /tmp/enc.qcow2 64M >/dev/null
# A relative file name reaches the server (and the record) made absolute.
dev=$(cd /tmp && ublkimg attach --recovery $SEC --image-opts driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=sec0)
id=${dev#/dev/ublkb}
check enc-record grep -qF '"image-opts": "driver=qcow2,encrypt.key-secret=sec0,file.filename=/tmp/enc.qcow2"' /run/ublkimg/ublkb$id.json
check enc-write-unflushed dd if=/tmp/q.data of="$dev" bs=64k seek=16 oflag=direct
kill -KILL $(pidof $id)
expect_fail enc-recover-no-secret "No secret with id 'sec0'" ublkimg recover $id
check enc-recover ublkimg recover $SEC $id
check enc-kept sh -c "dd if=$dev bs=64k skip=16 count=128 iflag=direct 2>/dev/null | cmp - /tmp/q.data"
check enc-no-key-recorded sh -c "! grep -q 'correct horse' /run/ublkimg/ublkb$id.json /run/ublkimg/ublkb$id.log"
check enc-detach ublkimg detach "$dev"
check enc-qemu-check qemu-img check $SEC --image-opts "$OPTS"
metric encrypted_recovery_s $(($(date +%s) - t0))

# Without --recovery: a kill fails the I/O and deletes the disk; attaching
# the image again at once succeeds; recover refuses the old device.
truncate -s 64M /tmp/n.img
dev=$(ublkimg attach /tmp/n.img)
kill -KILL $(pidof 0)
dev2=$(ublkimg attach /tmp/n.img)
check attach-at-once test -b "$dev2"
expect_fail recover-not-recoverable "not attached with recovery" ublkimg recover 0
check detach-dead ublkimg detach 0
check detach-new ublkimg detach "$dev2"
expect_fail recover-none "no record" ublkimg recover 5
check list-empty sh -c 'test -z "$(ublkimg list)"'
`

// TestVMRecovery runs recoveryScript; qemu-img checks the qcow2 image.
func TestVMRecovery(t *testing.T) {
	qemuImg := qemuImgTool(t)
	res := run(t, recoveryScript, vmtest.RunOptions{Files: []vmtest.File{qemuImg}})
	for _, name := range []string{"raw-fio-verified", "qcow2-fio-verified", "recover-at-once", "acknowledged-kept", "attach-at-once",
		"enc-recover-no-secret", "enc-recover", "enc-kept", "enc-qemu-check"} {
		if !strings.Contains(res.Log, "RESULT "+name+" PASS") {
			t.Errorf("%s did not pass", name)
		}
	}
}
