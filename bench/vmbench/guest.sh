# Guest side of bench/vmbench: runs in the test VM (vmtest) after
# /init loaded ublk_drv, loop and nbd. The host sets DEVICES, RUNTIME, SIZE,
# JOBS, PASSES and STORAGE (tmpfs, or disk: /dev/vda) before this script.
# Jobs named tmpfs-* run on images in the guest's tmpfs whatever STORAGE
# says. Results are "@@ METRIC" lines:
#   <device>.<job>.iops@<pass>  <device>.<job>.bw_kib@<pass>
#   <device>.<job>.lat_us@<pass>  <device>.rss_kib@<pass> (server's peak RSS)
#   <device>.rss_shmem_kib@<pass> (of its RSS at the end, the tmpfs pages it
#   maps: a raw image in tmpfs is read from them)
set -u
DIR=/tmp
if [ "$STORAGE" = disk ]; then
	# The images live on ext4 on a virtio disk (host page cache behind it),
	# where O_DIRECT reads and writes are truly asynchronous; on tmpfs
	# io_uring hands every read to a worker thread. The inode tables and
	# journal are written now: ext4's lazy init would otherwise write them
	# in the background while the first device is measured.
	DIR=/data
	mkdir -p $DIR
	mke2fs -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda && mount /dev/vda $DIR || result storage FAIL "mkfs/mount /dev/vda"
fi

step() { echo "bench: $*"; }

# cputicks PID: the process's user+system CPU time in clock ticks.
cputicks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# One fio run on $2 for job spec $3 ("name rw bs depth"), with $SERVER the
# pid of the device's server process (empty for the loop device); prints
# metrics, including the server's CPU time per request.
fio_job() {
	dev=$1 path=$2
	t0=$(cputicks "$SERVER")
	set -- $3
	name=$1 rw=$2 bs=$3 qd=$4 nj=${5:-1}
	line=$(fio --name="$name" --filename="$path" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" \
		--iodepth="$qd" --numjobs="$nj" --group_reporting --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 \
		--randrepeat=0 --norandommap --output-format=terse --terse-version=3 2>/tmp/fio.err)
	if [ -z "$line" ]; then
		result "$dev.$name" FAIL "$(tail -n 1 /tmp/fio.err)"
		return
	fi
	t1=$(cputicks "$SERVER")
	echo "$line" | awk -F';' -v p="$dev.$name" -v pass="$PASS" -v ticks=$((t1 - t0)) -v rt="$RUNTIME" '{
		iops = $8 + $49; bw = $7 + $48
		lat = ($8 > 0 && $49 > 0) ? ($40 + $81) / 2 : ($8 > 0 ? $40 : $81)
		printf "%s.iops@%s %.0f\n%s.bw_kib@%s %.0f\n%s.lat_us@%s %.1f\n", p, pass, iops, p, pass, bw, p, pass, lat
		# ticks are 10 ms; the fio runtime excludes the 1 s ramp, the
		# CPU time includes it: scale by runtime/(runtime+ramp).
		if (ticks > 0 && iops > 0) printf "%s.cpu_us@%s %.1f\n", p, pass, ticks * 10000 * rt / (rt + 1) / (iops * rt)
	}' | while read -r k v; do metric "$k" "$v"; done
	step "pass $PASS $dev $name: $(echo "$line" | awk -F';' '{printf "%.0f IOPS, %.1f MiB/s", $8+$49, ($7+$48)/1024}')"
}

# run_jobs DEV PATH: the jobs of the current storage group ($GROUP_JOBS).
run_jobs() {
	for spec in $GROUP_JOBS; do
		fio_job "$1" "$2" "$(echo "$spec" | tr ':' ' ')"
	done
}

rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
rss_shmem() { awk '/RssShmem/ {print $2}' "/proc/$1/status"; }

mkdir -p /var/lock

# prepare DIR: the raw image (and its qcow2 copy when a device needs it)
# in DIR.
prepare() {
	step "preparing a $SIZE raw image in $1"
	truncate -s "$SIZE" "$1/bench.raw"
	fio --name=fill --filename="$1/bench.raw" --rw=write --bs=1M --size="$SIZE" --ioengine=psync >/dev/null 2>&1 || result fill FAIL
	case " $DEVICES " in *qcow2*)
		step "converting it to qcow2"
		check qcow2-convert qemu-img convert -f raw -O qcow2 "$1/bench.raw" "$1/bench.qcow2" ;;
	esac
}

# The jobs split by where their images live: tmpfs-* jobs in /tmp (the
# guest's tmpfs), the others in $DIR.
DISK_JOBS= TMPFS_JOBS=
for spec in $JOBS; do
	case $spec in
	tmpfs-*) TMPFS_JOBS="$TMPFS_JOBS $spec" ;;
	*) DISK_JOBS="$DISK_JOBS $spec" ;;
	esac
done
[ -n "$DISK_JOBS" ] && prepare $DIR
[ -n "$TMPFS_JOBS" ] && [ $DIR != /tmp ] && prepare /tmp
# Write the images back and drop them from the page cache: O_DIRECT reads
# of ranges with dirty pages cannot be issued without blocking, so io_uring
# would hand them to worker threads until writeback caught up, and the
# device measured first would pay for it.
sync
echo 3 >/proc/sys/vm/drop_caches

# Every pass runs every device; odd passes in the order given, even ones
# reversed, so that a slow spell of the host does not always hit the same
# device. The host keeps the best pass.
order=$DEVICES
reversed=$(for d in $DEVICES; do echo "$d"; done | sed -n '1!G;h;$p' | tr '\n' ' ')
for PASS in $(seq "$PASSES"); do
	[ $((PASS % 2)) = 0 ] && order=$reversed || order=$DEVICES
	for group in disk tmpfs; do
	if [ $group = disk ]; then
		GROUP_JOBS=$DISK_JOBS IMGDIR=$DIR
	else
		GROUP_JOBS=$TMPFS_JOBS IMGDIR=/tmp
	fi
	[ -z "$GROUP_JOBS" ] && continue
	RAW=$IMGDIR/bench.raw QCOW2=$IMGDIR/bench.qcow2
	for dev in $order; do
		case $dev in
		ublk-*)
			# ublk-FORMAT[+OPTION...]: FORMAT raw, qcow2 or null (null-co: no
			# image at all); options qN (N queues), usercopy, gmpN
			# (GOMAXPROCS=N), wb (cache=writeback).
			kind=${dev#ublk-}
			fmt=${kind%%+*}
			img=$RAW extra="-t none" env= cmd=ublkimg
			case $fmt in
			qcow2) img=$QCOW2 ;;
			null) img=null-co:// fmt=null-co extra= ;;
			esac
			for opt in $(echo "$kind" | tr '+' ' ' | cut -d' ' -f2-); do
				[ "$opt" = "$fmt" ] && continue
				case $opt in
				q[0-9]*) extra="$extra --queues ${opt#q}" ;;
				usercopy) extra="$extra --user-copy" ;;
				wb) extra="$extra -t writeback" ;;
				gmp*) env="$env GOMAXPROCS=${opt#gmp}" ;;
				base) cmd=ublkimg-base ;;
				poll*) extra="$extra --poll-max ${opt#poll}us" ;;
				esac
			done
			step "$dev: $env $cmd attach -f $fmt $extra $img"
			path=$(env $env $cmd attach -f $fmt $extra $img) || { result "$dev" FAIL attach; continue; }
			pid=$(sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb*.json)
			SERVER=$pid
			run_jobs "$dev" "$path"
			if [ $group = disk ] || [ -z "$DISK_JOBS" ]; then
				metric "$dev.rss_kib@$PASS" "$(rss "$pid")"
				metric "$dev.rss_shmem_kib@$PASS" "$(rss_shmem "$pid")"
			fi
			check "$dev.detach" $cmd detach "$path"
			;;
		loop)
			step "loop: losetup --direct-io=on $RAW"
			path=$(losetup --direct-io=on -f --show $RAW) || { result loop FAIL losetup; continue; }
			SERVER=
			run_jobs loop "$path"
			check loop.detach losetup -d "$path"
			;;
		nbd-raw | nbd-qcow2)
			img=$RAW fmt=raw
			[ $dev = nbd-qcow2 ] && img=$QCOW2 fmt=qcow2
			step "$dev: qemu-nbd -f $fmt --cache=none --aio=io_uring -c /dev/nbd0 $img"
			qemu-nbd -f $fmt --cache=none --aio=io_uring -c /dev/nbd0 $img ||
				qemu-nbd -f $fmt --cache=none --aio=native -c /dev/nbd0 $img ||
				{ result "$dev" FAIL qemu-nbd; continue; }
			i=0; while [ "$(cat /sys/block/nbd0/size)" = 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
			pid=$(pidof qemu-nbd)
			SERVER=$pid
			run_jobs "$dev" /dev/nbd0
			[ $group = disk ] || [ -z "$DISK_JOBS" ] && metric "$dev.rss_kib@$PASS" "$(rss "$pid")"
			check "$dev.detach" qemu-nbd -d /dev/nbd0
			i=0; while pidof qemu-nbd >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
			;;
		*)
			result "$dev" FAIL "unknown device kind"
			;;
		esac
	done
done
done

# Attach and detach times (bench/attachtime), on the raw image of the
# default storage, after the fio runs.
if [ "$ATTACH" -gt 0 ]; then
	[ -f $DIR/bench.raw ] || prepare $DIR
	step "timing attach and detach: $ATTACH_KINDS"
	attachtime -n "$ATTACH" -image $DIR/bench.raw $ATTACH_KINDS >/tmp/attach.out 2>/tmp/attach.err ||
		result attachtime FAIL "$(tail -n 1 /tmp/attach.err)"
	while read -r k v; do metric "attach.$k" "$v"; done </tmp/attach.out
fi
