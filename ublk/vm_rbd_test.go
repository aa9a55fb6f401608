package ublk_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"ublkimg/internal/cephtest"
	"ublkimg/internal/qemutest"
	"ublkimg/vmtest"
)

func TestMain(m *testing.M) { cephtest.Main(m) }

// rbdGuest is what a VM scenario needs to reach the throwaway cluster,
// which listens on the host's 127.0.0.1: a NIC on QEMU's user network, on
// which the host's 127.0.0.1 is 10.0.2.2; tcpfwd in the guest, forwarding
// the cluster's ports of the guest's 127.0.0.1 there, so that the addresses
// the cluster's maps hold work unchanged; a ceph.conf naming the monitor;
// librbd and its libraries.
type rbdGuest struct {
	files   []vmtest.File
	qemu    []string
	modules []string
	// setup brings the network and the forwarder up (a script prelude).
	setup string
}

func newRbdGuest(t *testing.T, conf string) rbdGuest {
	t.Helper()
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	get := func(key string) string {
		m := regexp.MustCompile(`(?m)^` + key + ` = (.*)$`).FindSubmatch(data)
		if m == nil {
			t.Fatalf("%s: no %s", conf, key)
		}
		return string(m[1])
	}
	monHost, osdMin, osdMax := get("mon_host"), get("ms_bind_port_min"), get("ms_bind_port_max")
	var ports []string
	for _, m := range regexp.MustCompile(`127\.0\.0\.1:(\d+)`).FindAllStringSubmatch(monHost, -1) {
		ports = append(ports, m[1])
	}
	ports = append(ports, osdMin+"-"+osdMax)
	guestConf := fmt.Sprintf(`[global]
fsid = %s
mon_host = %s
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
client_mount_timeout = 60
`, get("fsid"), monHost)
	fwd, err := vmtest.GoBinary(t.Context(), "ublkimg/vmtest/tcpfwd")
	if err != nil {
		t.Fatal(err)
	}
	return rbdGuest{
		files: []vmtest.File{fwd, vmtest.HostFile("/usr/lib/x86_64-linux-gnu/librbd.so.1"),
			vmtest.DataFile("/etc/ceph/ceph.conf", []byte(guestConf), 0o644)},
		qemu:    []string{"-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="},
		modules: []string{"ublk_drv", "ext4", "virtio_net"},
		setup: `
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
tcpfwd 10.0.2.2 ` + strings.Join(ports, " ") + ` >/tmp/fwd.log 2>&1 &
i=0; while ! grep -q ready /tmp/fwd.log && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
check forwarder grep -q ready /tmp/fwd.log || exit 1
`,
	}
}

// rbdAttachScript attaches $IMG (format $FMT), makes an ext4 file system on
// it, writes files and verifies them with fio, reports the device's
// checksum after unmounting (sha256_$FMT), and detaches.
const rbdAttachScript = `
dev=$(ublkimg attach -f $FMT "$IMG")
check attach-$FMT test -b "$dev" || exit 1
check mkfs-$FMT mke2fs -q -F -t ext4 "$dev"
check mount-$FMT mount "$dev" /mnt || exit 1
check files-$FMT sh -c 'for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i*4)) 2>/dev/null || exit 1; done'
fio_verify fio-4k-$FMT /mnt/fio4k --rw=randwrite --bs=4k --iodepth=16 --size=16M
fio_verify fio-128k-$FMT /mnt/fio128k --rw=write --bs=128k --iodepth=4 --size=32M
sums >/tmp/sums.before
check umount-$FMT umount /mnt
metric sha256_$FMT $(sha256sum "$dev" | cut -d' ' -f1)
check detach-$FMT ublkimg detach "$dev"
dev=$(ublkimg attach -f $FMT "$IMG")
check fsck-$FMT e2fsck -fn "$dev"
check remount-$FMT mount -o ro "$dev" /mnt
sums >/tmp/sums.after
check same-files-$FMT cmp /tmp/sums.before /tmp/sums.after
check umount2-$FMT umount /mnt
check detach2-$FMT ublkimg detach "$dev"
`

// rbdRecoveryScript: $IMG attached with --recovery keeps its device when
// the server is killed under fio's verified writes, and recover serves it
// again (the new server takes over RBD's exclusive lock from the dead one)
// with fio going on to verify everything.
const rbdRecoveryScript = `
pidof() { sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb$1.json; }
dev=$(ublkimg attach -f raw "$IMG" --recovery --queues 2)
check rec-attach test -b "$dev" || exit 1
id=${dev#/dev/ublkb}
fio --name=rec --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--iodepth=16 --size=16M --rate_iops=500 --verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/fio.rec 2>&1 &
fio=$!
sleep 2
check rec-fio-mid-stream kill -0 $fio
kill -KILL $(pidof $id)
sleep 1
check rec-device-kept test -b "$dev"
t0=$(date +%s)
check rec-recover ublkimg recover "$dev" "$IMG"
wait $fio
rc=$?
metric rbd_fio_after_recover_s $(($(date +%s) - t0))
tail -n 4 /tmp/fio.rec
check rec-fio-verified test $rc -eq 0
check rec-detach ublkimg detach "$dev"
`

// TestVMRbd attaches a raw image and a qcow2 image stored in RBD as
// /dev/ublkbN in the guest (one image handle per device, shared by its
// queues), runs a file system and fio's verification on each, and then
// reads them on the host with qemu-img: the same bytes as the guest's
// device, and qemu-img compare agrees with Ceph's own rbd export. Then a
// device attached with --recovery survives its server's SIGKILL and
// recover (rbdRecoveryScript).
func TestVMRbd(t *testing.T) {
	qemutest.Require(t, "qemu-img", "rbd")
	conf := cephtest.Conf(t)
	g := newRbdGuest(t, conf)
	images := map[string]string{"raw": cephtest.ImageName(t), "qcow2": cephtest.ImageName(t), "recovery": cephtest.ImageName(t)}
	for kind, name := range images {
		f := kind
		if kind == "recovery" {
			f = "raw"
		}
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", f, cephtest.Spec(conf, name), "128M").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v: %s", err, out)
		}
	}
	guestSpec := func(name string) string { return "rbd:" + cephtest.Pool + "/" + name + ":conf=/etc/ceph/ceph.conf" }
	script := g.setup
	for _, f := range []string{"raw", "qcow2"} {
		script += "FMT=" + f + " IMG=" + guestSpec(images[f]) + "\n" + rbdAttachScript
	}
	script += "IMG=" + guestSpec(images["recovery"]) + "\n" + rbdRecoveryScript
	res := run(t, script, vmtest.RunOptions{Files: g.files, QemuArgs: g.qemu, Modules: g.modules})
	dir := t.TempDir()
	for _, f := range []string{"raw", "qcow2"} {
		spec := cephtest.Spec(conf, images[f])
		local := filepath.Join(dir, f+".raw")
		if out, err := exec.Command("qemu-img", "convert", "-f", f, "-O", "raw", spec, local).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img convert: %v: %s", err, out)
		}
		if got, want := sha256File(t, local), res.Metrics["sha256_"+f]; got != want {
			t.Errorf("%s: qemu-img reads sha256 %s, the guest's device read %s", f, got, want)
		}
		if f == "raw" {
			// Ceph's own reader agrees with qemu-img's.
			exported := filepath.Join(dir, "export.raw")
			cephtest.Rbd(t, conf, "export", "--no-progress", cephtest.Pool+"/"+images[f], exported)
			if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", exported, spec).CombinedOutput(); err != nil {
				t.Errorf("qemu-img compare with rbd export: %v: %s", err, out)
			}
		} else {
			if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", spec, local).CombinedOutput(); err != nil {
				t.Errorf("qemu-img compare: %v: %s", err, out)
			}
			if out, err := exec.Command("qemu-img", "check", spec).CombinedOutput(); err != nil {
				t.Errorf("qemu-img check: %v: %s", err, out)
			}
		}
	}
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
