package ublk_test

import (
	"strings"
	"testing"

	"ublkimg/vmtest"
)

// detachScript: detach reports, in one line and with exit status 1, a
// server whose final close failed (a qcow2 image with a persistent bitmap
// on a file system that filled up while it was served: storing the bitmap
// needs new clusters), and never signals a process that took the pid of a
// dead server (started under that pid through ns_last_pid, as pid reuse
// would); the run directory is private.
const detachScript = `
pidof() { sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb$1.json; }

mkdir -p /small
check small-fs mount -t tmpfs -o size=16M tmpfs /small || exit 1
check full-create ublkimg create -f qcow2 /small/full.qcow2 64M
check full-bitmap ublkimg bitmap --add /small/full.qcow2 b0
dev=$(ublkimg attach /small/full.qcow2)
check full-attach test -b "$dev" || exit 1
check rundir-private sh -c 'test "$(stat -c %a /run/ublkimg)" = 700'
check full-write dd if=/dev/urandom of="$dev" bs=64k count=32 oflag=direct
dd if=/dev/zero of=/small/fill bs=64k 2>/dev/null
check full-fs-full sh -c '! dd if=/dev/zero of=/small/more bs=4k count=1 2>/dev/null'
expect_fail detach-reports-close-error "its server \(process [0-9]+\) failed: closing the image: .*[Nn]o space left on device \(log: /run/ublkimg/ublkb0.log\)" \
	ublkimg detach "$dev"
check full-gone sh -c "! test -e $dev && ! test -e /dev/ublkc0 && ! test -e /run/ublkimg/ublkb0.json && ! test -e /run/ublkimg/ublkb0.exit"
check full-log-kept grep -qi 'no space left' /run/ublkimg/ublkb0.log
rm -f /small/fill /small/more
dev=$(ublkimg attach /small/full.qcow2)
check clean-detach ublkimg detach "$dev"
check clean-no-log sh -c '! test -e /run/ublkimg/ublkb0.log && ! test -e /run/ublkimg/ublkb0.exit'

# The server of a device attached with --recovery is killed: the device
# stays (quiesced), and the kernel still names the dead server's pid. A
# sleep takes that pid; detach must delete the device without signalling it.
truncate -s 64M /tmp/p.img
dev=$(ublkimg attach --recovery /tmp/p.img)
id=${dev#/dev/ublkb}
pid=$(pidof $id)
check dead-pid test -n "$pid"
kill -KILL "$pid"
i=0; while ! ublkimg list | grep -q 'quiesced (server gone)' && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
imp=
i=0
while [ $i -lt 50 ] && [ "$imp" != "$pid" ]; do
	[ -n "$imp" ] && kill "$imp"
	echo $((pid - 1)) >/proc/sys/kernel/ns_last_pid
	sleep 600 >/dev/null 2>&1 &
	imp=$!
	i=$((i+1))
done
check pid-reused test "$imp" = "$pid"
check detach-dead-server ublkimg detach "$dev"
check reused-pid-not-signalled kill -0 "$imp"
check dead-gone sh -c "! test -e $dev && ! test -e /dev/ublkc$id && ! test -e /run/ublkimg/ublkb$id.json"
kill "$imp"
`

// TestVMDetach runs detachScript.
func TestVMDetach(t *testing.T) {
	vmtest.RequireTools(t)
	res := run(t, detachScript, vmtest.RunOptions{})
	for _, name := range []string{"detach-reports-close-error", "full-gone", "reused-pid-not-signalled", "dead-gone"} {
		if !strings.Contains(res.Log, "RESULT "+name+" PASS") {
			t.Errorf("%s did not pass", name)
		}
	}
}
