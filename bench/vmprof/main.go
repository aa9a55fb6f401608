// Command vmprof profiles the whole test VM (vmtest) with perf while
// fio runs against one device, to see where a request's time goes: the
// ublkimg server, the kernel's ublk and io_uring paths, fio, virtio.
//
//	go run ./bench/vmprof [-device ublk-raw|loop] [-rw randread] [-bs 4k] [-depth 16] [-storage disk|tmpfs] [-attach-args "--poll-max 100us"]
//
// It prints perf's flat profile (by command, object and symbol) of the
// guest, sampled with the cpu-clock software event (TCG has no PMU).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"ublkimg/vmtest"
)

const script = `
set -u
mkdir -p /data /var/lock
IMG=/tmp/bench.raw
if [ $STORAGE = disk ]; then
	mke2fs -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda && mount /dev/vda /data || result storage FAIL mkfs
	IMG=/data/bench.raw
fi
truncate -s 256M $IMG
fio --name=fill --filename=$IMG --rw=write --bs=1M --size=256M --ioengine=psync >/dev/null 2>&1
sync; echo 3 >/proc/sys/vm/drop_caches
case $DEVICE in
ublk-raw) path=$(ublkimg attach -f raw -t none $ATTACH_ARGS $IMG) ;;
loop) path=$(losetup --direct-io=on -f --show $IMG) ;;
esac
echo "device $DEVICE at $path"
perf record -a -e cpu-clock -F 2000 -o /tmp/perf.data -- fio --name=p --filename=$path --ioengine=io_uring --direct=1 \
	--rw=$RW --bs=$BS --iodepth=$DEPTH --size=256M --time_based --runtime=$RUNTIME --randrepeat=0 --norandommap \
	--output-format=terse --terse-version=3 | awk -F';' '{print "fio iops", $8+$49}'
perf report -i /tmp/perf.data --stdio --no-children --sort comm,dso,sym 2>/dev/null | grep -v '^#' | grep -v '^$' | head -70
perf report -i /tmp/perf.data --stdio --no-children --sort comm 2>/dev/null | grep -v '^#' | grep -v '^$' | head -20
result prof PASS
`

func main() {
	device := flag.String("device", "ublk-raw", "ublk-raw or loop")
	rw := flag.String("rw", "randread", "fio rw")
	depth := flag.Int("depth", 16, "fio iodepth")
	bs := flag.String("bs", "4k", "fio block size")
	storage := flag.String("storage", "disk", "where the image lives: disk (ext4 on virtio) or tmpfs")
	runtime := flag.Int("runtime", 5, "seconds")
	attachArgs := flag.String("attach-args", "", "more ublkimg attach options, e.g. \"--poll-max 100us\"")
	flag.Parse()
	ctx := context.Background()
	bin, err := vmtest.GoBinary(ctx, "ublkimg/cmd/ublkimg")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	files := []vmtest.File{bin, vmtest.HostFile("/etc/mke2fs.conf")}
	for _, t := range []string{"fio", "losetup", "mke2fs", "perf"} {
		f, err := vmtest.Tool(t)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		files = append(files, f)
	}
	disk, err := os.CreateTemp("", "vmprof-disk-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer os.Remove(disk.Name())
	disk.Close()
	if err := os.Truncate(disk.Name(), 1<<30); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_, err = vmtest.Run(ctx, vmtest.RunOptions{
		Script:   fmt.Sprintf("DEVICE=%s RW=%s BS=%s DEPTH=%d RUNTIME=%d STORAGE=%s ATTACH_ARGS=%q\n%s", *device, *rw, *bs, *depth, *runtime, *storage, *attachArgs, script),
		Files:    files,
		Modules:  []string{"ublk_drv", "loop", "virtio_blk", "ext4"},
		QemuArgs: []string{"-drive", "file=" + disk.Name() + ",format=raw,if=virtio,cache=unsafe,aio=threads"},
		CPUs:     2,
		Memory:   2048,
		Timeout:  10 * time.Minute,
		Console:  os.Stdout,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
