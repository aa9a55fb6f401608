#!/bin/sh
# make demo: ublkimg's first five minutes. Creates an image (qcow2 when
# ublkimg can, else raw), attaches it as /dev/ublkbN, makes an ext4 file
# system on it, mounts it, writes and reads a file, lists the device,
# detaches it and checks the image, printing each step as it happens.
#
# It runs natively when this kernel has ublk (after trying modprobe
# ublk_drv; needs root), otherwise inside the test VM booting Debian's 6.12
# kernel (vmtest), which only needs qemu and Go.
set -eu

if [ -z "${UBLKIMG_DEMO_GUEST:-}" ]; then
	cd "$(dirname "$0")/.."
	[ -e /dev/ublk-control ] || modprobe ublk_drv 2>/dev/null || true
	if [ ! -e /dev/ublk-control ]; then
		echo "demo: this kernel ($(uname -r)) has no ublk: running the demo in a VM with Debian's 6.12 kernel"
		scripts/deps.sh
		exec go run ./cmd/vmdemo scripts/demo.sh
	fi
	if [ "$(id -u)" -ne 0 ]; then
		echo "demo: serving a ublk device needs root: run 'sudo make demo'" >&2
		exit 1
	fi
	go build -o ublkimg ./cmd/ublkimg
	PATH=$PWD:$PATH
fi

step() { printf '\n==> %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

dir=$(mktemp -d /tmp/ublkimg-demo.XXXXXX)
mnt=$dir/mnt
dev=
cleanup() {
	grep -qs " $mnt " /proc/mounts && umount "$mnt"
	[ -n "$dev" ] && [ -e "$dev" ] && ublkimg detach "$dev"
	rm -rf "$dir"
}
trap cleanup EXIT

fmt=raw
if ublkimg create -f qcow2 "$dir/probe" 1M >/dev/null 2>&1; then
	fmt=qcow2
fi
rm -f "$dir/probe"
img=$dir/disk.$fmt

step "create a 1 GiB $fmt image"
run ublkimg create -f $fmt "$img" 1G
run ublkimg info "$img"

step "attach it: the server runs in the background, attach prints the device"
printf '$ ublkimg attach %s\n' "$img"
dev=$(ublkimg attach "$img")
echo "$dev"

step "make an ext4 file system on it and mount it"
run mkfs.ext4 -q "$dev"
mkdir -p "$mnt"
run mount "$dev" "$mnt"
run df -h "$mnt"

step "write a file, drop the caches, read it back"
run sh -c "echo 'hello from ublkimg' >'$mnt/hello.txt'"
run dd if=/dev/urandom of="$mnt/random.bin" bs=1M count=16 2>/dev/null
sum=$(sha256sum <"$mnt/random.bin")
run sync
echo 3 >/proc/sys/vm/drop_caches
run cat "$mnt/hello.txt"
[ "$(sha256sum <"$mnt/random.bin")" = "$sum" ] && echo "random.bin: 16 MiB read back, checksum matches"

step "list the devices ublkimg serves"
run ublkimg list

step "unmount and detach: the server flushes and closes the image, the device goes away"
run umount "$mnt"
run ublkimg detach "$dev"
dev=
ls /dev/ublkb* 2>/dev/null || echo "no /dev/ublkb* left"

step "check the image"
if ublkimg check --help >/dev/null 2>&1; then
	run ublkimg check "$img"
elif command -v qemu-img >/dev/null && [ $fmt = qcow2 ]; then
	run qemu-img check "$img"
else
	run ublkimg info "$img"
fi

step "done"
if [ -n "${UBLKIMG_DEMO_GUEST:-}" ]; then
	result demo PASS
fi
