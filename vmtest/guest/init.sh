#!/bin/busybox sh
# /init of the ublkimg test VM (vmtest). As PID 1 it mounts the virtual
# file systems, loads the kernel modules listed in /etc/vmtest/modules, runs
# /scenario.sh, sends the kernel log to the results channel and powers off.
# Lines starting with "@@ " are the harness's protocol (see doc.go).
#
# This script runs in busybox ash, whose applets win over $PATH (Debian
# builds it with FEATURE_SH_STANDALONE). The scenario runs in /bin/sh, which
# is dash, so that programs the harness added (mke2fs, losetup) are found by
# $PATH and not shadowed by the busybox applets of the same name.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /mnt /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
. /etc/vmtest/lib.sh
vm_emit BOOT "$(cut -d' ' -f1 /proc/uptime)" "$(uname -r)"

# Each line: the module's path, then "optional" for soft dependencies,
# which may fail to load (crc32c_intel on a CPU without SSE4.2).
while read -r ko opt; do
	[ -n "$ko" ] || continue
	name=${ko##*/}
	name=${name%.ko}
	if ! out=$(insmod "$ko" 2>&1); then
		if [ "$opt" = optional ]; then
			echo "vm: optional module $name did not load: $out"
		else
			result "insmod:$name" FAIL "$out"
		fi
	fi
done </etc/vmtest/modules
vm_emit READY "$(cut -d' ' -f1 /proc/uptime)"

cd /tmp
/bin/sh -c '. /etc/vmtest/lib.sh && . /scenario.sh' </dev/null
rc=$?

{
	echo "@@ DMESG BEGIN"
	dmesg
	echo "@@ DMESG END"
} >"$VM_RESULTS"
vm_emit DONE "$rc"
sync
poweroff -f
