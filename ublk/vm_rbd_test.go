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
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

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
log_file = /tmp/ceph-$name.$pid.log
run_dir = /tmp
admin_socket = /tmp/ceph-$name.$pid.asok
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
	// Two file systems and fio on images whose every request crosses the
	// host's OSD: about 3 minutes on a quiet 2-core machine, and more than
	// 5 when the host is busy (the OSD shares its cores with the guest).
	res := run(t, script, vmtest.RunOptions{Files: g.files, QemuArgs: g.qemu, Modules: g.modules, Timeout: 12 * time.Minute})
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

// rbdBenchScript runs fio's jobs on $DEV (named $NAME) and reports each
// job's IOPS as metric NAME_JOB.
const rbdBenchScript = `
bench_jobs() {
	for spec in randread-4k-qd1:randread:4k:1 randread-4k-qd16:randread:4k:16 \
		randwrite-4k-qd1:randwrite:4k:1 randwrite-4k-qd16:randwrite:4k:16 \
		seqread-128k:read:128k:4 seqwrite-128k:write:128k:4; do
		IFS=: read job rw bs qd <<EOT
$spec
EOT
		out=$(fio --name=$job --filename="$DEV" --ioengine=io_uring --direct=1 --rw=$rw --bs=$bs \
			--iodepth=$qd --size=200M --time_based --runtime=$RUNTIME --ramp_time=1 \
			--output-format=terse --terse-version=3 2>&1)
		iops=$(printf '%s\n' "$out" | awk -F';' 'NF > 50 { printf "%d", $8 + $49 }')
		[ -n "$iops" ] || { result $NAME-$job FAIL "$out"; continue; }
		metric ${NAME}_$job $iops
	done
}
`

// TestVMRbdBench (run with UBLKIMG_RBD_BENCH=1; it reports, never fails on
// figures) measures fio in the guest on one image in RBD through ublkimg,
// rbd-nbd (nbd.ko) and the kernel's rbd driver, one after the other.
func TestVMRbdBench(t *testing.T) {
	if os.Getenv("UBLKIMG_RBD_BENCH") != "1" {
		t.Skip("set UBLKIMG_RBD_BENCH=1 to run the rbd benchmark")
	}
	qemutest.Require(t, "qemu-img", "rbd", "rbd-nbd")
	conf := cephtest.Conf(t)
	g := newRbdGuest(t, conf)
	name := cephtest.ImageName(t)
	// Data everywhere, so that reads reach the OSD's objects.
	src := filepath.Join(t.TempDir(), "src.raw")
	if out, err := exec.Command("sh", "-c", "head -c 256M /dev/urandom >"+src).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if out, err := exec.Command("qemu-img", "convert", "-O", "raw", src, cephtest.Spec(conf, name)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	data, _ := os.ReadFile(conf)
	v2 := regexp.MustCompile(`v2:(127\.0\.0\.1:\d+)`).FindSubmatch(data)
	if v2 == nil {
		t.Fatalf("%s: no msgr2 monitor address", conf)
	}
	nbd, err := vmtest.Tool("rbd-nbd")
	if err != nil {
		t.Fatal(err)
	}
	runtime := os.Getenv("UBLKIMG_RBD_BENCH_RUNTIME")
	if runtime == "" {
		runtime = "5"
	}
	spec := "rbd:" + cephtest.Pool + "/" + name + ":conf=/etc/ceph/ceph.conf"
	devices := os.Getenv("UBLKIMG_RBD_BENCH_DEVICES")
	if devices == "" {
		devices = "ublk,ublk-wb,nbd,krbd"
	}
	script := g.setup + rbdBenchScript + "RUNTIME=" + runtime + "\n"
	for _, dev := range strings.Split(devices, ",") {
		switch dev {
		case "ublk":
			script += `NAME=ublk DEV=$(ublkimg attach -f raw -t none "` + spec + `")
check ublk-attach test -b "$DEV" && bench_jobs
check ublk-detach ublkimg detach "$DEV"
`
		case "ublk-wb":
			// ublkimg's default cache mode, writeback: librbd's cache on,
			// as rbd-nbd has it.
			script += `NAME=ublkwb DEV=$(ublkimg attach -f raw "` + spec + `")
check ublkwb-attach test -b "$DEV" && bench_jobs
check ublkwb-detach ublkimg detach "$DEV"
`
		case "nbd":
			script += `NAME=nbd DEV=$(rbd-nbd map --conf /etc/ceph/ceph.conf ` + cephtest.Pool + "/" + name + `)
check nbd-map test -b "$DEV" && bench_jobs
check nbd-unmap rbd-nbd unmap "$DEV"
`
		case "krbd":
			// The kernel client speaks msgr2 in crc mode to the
			// monitor's v2 address; auth is none.
			script += `check krbd-map sh -c 'echo "` + string(v2[1]) + ` name=admin,ms_mode=crc ` + cephtest.Pool + " " + name + ` -" >/sys/bus/rbd/add_single_major' || dmesg | tail -n 20
NAME=krbd DEV=/dev/rbd0
check krbd-dev test -b $DEV && bench_jobs
check krbd-unmap sh -c 'echo 0 >/sys/bus/rbd/remove_single_major'
`
		}
	}
	files := append(g.files, nbd)
	res := run(t, script, vmtest.RunOptions{Files: files, QemuArgs: g.qemu,
		Modules: append(g.modules, "nbd", "rbd")})
	var b strings.Builder
	fmt.Fprintf(&b, "%-18s %8s %8s %8s %8s %9s %9s\n", "job", "ublk", "ublk-wb", "rbd-nbd", "krbd", "ublk/nbd", "ublk/krbd")
	for _, job := range []string{"randread-4k-qd1", "randread-4k-qd16", "randwrite-4k-qd1", "randwrite-4k-qd16", "seqread-128k", "seqwrite-128k"} {
		u, _ := strconv.ParseFloat(res.Metrics["ublk_"+job], 64)
		n, _ := strconv.ParseFloat(res.Metrics["nbd_"+job], 64)
		k, _ := strconv.ParseFloat(res.Metrics["krbd_"+job], 64)
		w, _ := strconv.ParseFloat(res.Metrics["ublkwb_"+job], 64)
		fmt.Fprintf(&b, "%-18s %8.0f %8.0f %8.0f %8.0f %8.2fx %8.2fx\n", job, u, w, n, k, u/n, u/k)
	}
	t.Logf("IOPS, fio in the guest (TCG), %s s per job:\n%s", runtime, b.String())
}

// osdRestartScript writes with fio through an rbd image's device and
// verifies, while the host restarts the OSD (on the "@@ OSD-RESTART" line).
const osdRestartScript = `
dev=$(ublkimg attach -f raw "$IMG")
check osd-attach test -b "$dev" || exit 1
fio --name=osd --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
	--iodepth=16 --size=24M --rate_iops=400 --verify=crc32c --do_verify=1 --verify_fatal=1 \
	>/tmp/fio.osd 2>&1 &
fio=$!
sleep 3
check osd-fio-mid-stream kill -0 $fio
echo "@@ OSD-RESTART"
t0=$(date +%s)
wait $fio
rc=$?
metric fio_s_after_restart_request $(($(date +%s) - t0))
# The longest write: the stall while the OSD was away.
grep -E ' (clat|lat) \((u|m)?sec\)' /tmp/fio.osd
tail -n 6 /tmp/fio.osd
check osd-fio-verified test $rc -eq 0
check osd-no-io-errors sh -c '! grep -q "error=" /tmp/fio.osd'
check osd-detach ublkimg detach "$dev"
`

// TestVMRbdOSDRestart restarts the OSD of a private cluster while fio
// writes through an attached rbd image: I/O stalls, resumes with no error,
// and fio's verification finds every write.
func TestVMRbdOSDRestart(t *testing.T) {
	vmtest.RequireTools(t)
	p := cephtest.NewPrivate(t, cephtest.PrivateOptions{})
	g := newRbdGuest(t, p.Conf)
	cephtest.Rbd(t, p.Conf, "create", "--size", "64M", cephtest.Pool+"/osd")
	restarted := make(chan error, 1)
	var restartTook time.Duration
	con := &markerWriter{marker: "@@ OSD-RESTART", fn: func() {
		t0 := time.Now()
		err := p.RestartOSD()
		restartTook = time.Since(t0)
		restarted <- err
	}}
	script := g.setup + "IMG=rbd:" + cephtest.Pool + "/osd:conf=/etc/ceph/ceph.conf\n" + osdRestartScript
	run(t, script, vmtest.RunOptions{Files: g.files, QemuArgs: g.qemu, Modules: g.modules, Console: con})
	select {
	case err := <-restarted:
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("the OSD restart took %v", restartTook.Round(100*time.Millisecond))
	default:
		t.Fatal("the guest never asked for the OSD restart")
	}
}

// markerWriter receives the console and runs fn, once, in its own
// goroutine, when a line holding marker arrives.
type markerWriter struct {
	marker string
	fn     func()
	mu     sync.Mutex
	buf    []byte
	fired  bool
}

func (w *markerWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fired {
		return len(p), nil
	}
	w.buf = append(w.buf, p...)
	if strings.Contains(string(w.buf), w.marker+"\n") || strings.Contains(string(w.buf), w.marker+"\r") {
		w.fired = true
		w.buf = nil
		go w.fn()
		return len(p), nil
	}
	if i := strings.LastIndexByte(string(w.buf), '\n'); i >= 0 {
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}
