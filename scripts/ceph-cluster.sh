#!/usr/bin/env bash
# A throwaway Ceph cluster for the tests: one monitor and one bluestore OSD
# on a sparse file, no manager, no authentication, every daemon bound to
# 127.0.0.1 only, all its state under one directory.
#
#   scripts/ceph-cluster.sh start DIR   brings it up, prints DIR/ceph.conf
#   scripts/ceph-cluster.sh stop DIR    stops its daemons by PID
#   scripts/ceph-cluster.sh restart-osd DIR   stops the OSD and starts it again
#   scripts/ceph-cluster.sh run CMD [ARG...]  runs CMD with a cluster in a new
#       temporary directory named by UBLKIMG_CEPH_CONF (its ceph.conf), and
#       stops and removes the cluster when CMD ends, whatever its status
#
# The monitor listens on a free port chosen at start (msgr2 and msgr1), so
# several clusters (parallel test processes) can run side by side; the OSD
# takes free ports from a range above it. A pool "rbd" is created and
# initialised for RBD. Needs ceph-mon, ceph-osd and ceph (ceph-common).
#
# CEPH_AUTH=cephx at start makes a cluster that requires cephx, with keys
# in DIR/keyring (mon., client.admin) and DIR/osd/keyring; the admin key
# alone is in DIR/admin.key.
set -euo pipefail

usage() { echo "usage: $0 start|stop|restart-osd DIR | run CMD [ARG...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
if [ "$cmd" = run ]; then
	shift
	dir=$(mktemp -d /tmp/ublkimg-ceph.XXXXXX)
	trap '"$0" stop "$dir"; rm -rf "$dir"' EXIT
	t0=$(date +%s%N)
	UBLKIMG_CEPH_CONF=$("$0" start "$dir") || { echo "ceph-cluster: the cluster did not start; logs in $dir/log" >&2; exit 1; }
	ms=$((($(date +%s%N) - t0) / 1000000))
	echo "ceph-cluster: up in $((ms / 1000)).$((ms % 1000 / 100)) s ($UBLKIMG_CEPH_CONF)"
	export UBLKIMG_CEPH_CONF
	"$@"
	exit
fi
[ $# -eq 2 ] || usage
dir=$(realpath -m "$2")
conf=$dir/ceph.conf

# free_port prints a TCP port on 127.0.0.1 that nothing listens on, picked
# at random in 20000-29999 (outside Linux's ephemeral range 32768-60999).
free_port() {
	local p
	for _ in $(seq 100); do
		p=$((20000 + RANDOM % 10000))
		if ! ss -Htln "sport = :$p" | grep -q . && ! ss -Htln "sport = :$((p + 1))" | grep -q .; then
			echo "$p"
			return
		fi
	done
	echo "ceph-cluster: no free port" >&2
	exit 1
}

# wait_pid_gone waits up to 30 s for the process to exit.
wait_pid_gone() {
	for _ in $(seq 300); do
		kill -0 "$1" 2>/dev/null || return 0
		sleep 0.1
	done
	echo "ceph-cluster: process $1 did not stop" >&2
	return 1
}

stop_daemon() {
	local pidfile=$dir/run/$1.pid pid
	[ -s "$pidfile" ] || return 0
	pid=$(cat "$pidfile")
	kill "$pid" 2>/dev/null || true
	wait_pid_gone "$pid"
	rm -f "$pidfile"
}

start_osd() {
	ceph-osd -c "$conf" -i 0 2>>"$dir/log/osd.0.stderr"
}

case $cmd in
start)
	for tool in ceph-mon ceph-osd ceph monmaptool; do
		command -v "$tool" >/dev/null || { echo "ceph-cluster: $tool not installed (scripts/deps.sh installs it)" >&2; exit 1; }
	done
	[ ! -e "$conf" ] || { echo "ceph-cluster: $dir already holds a cluster" >&2; exit 1; }
	mkdir -p "$dir"/{mon,osd,run,log}
	fsid=$(cat /proc/sys/kernel/random/uuid)
	auth=${CEPH_AUTH:-none}
	case $auth in none | cephx) ;; *) echo "ceph-cluster: CEPH_AUTH is none or cephx" >&2; exit 2 ;; esac
	port=$(free_port)
	# The OSD's four messengers take ports from a range of their own.
	osdport=$((port + 2))
	cat >"$conf" <<CONF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = $auth
auth_service_required = $auth
auth_client_required = $auth
keyring = $dir/keyring
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_allow_pool_delete = true
# The host disk may be fuller than the monitor likes (it shuts down below 5% free).
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mon_warn_on_insecure_global_id_reclaim_allowed = false
run_dir = $dir/run
log_file = $dir/log/\$name.log
# Clients give up instead of retrying for ever when the cluster is gone.
client_mount_timeout = 30
[mon]
mon_data = $dir/mon
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
[osd]
osd_data = $dir/osd
keyring = $dir/osd/keyring
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
ms_bind_port_min = $osdport
ms_bind_port_max = $((osdport + 40))
osd_objectstore = bluestore
# A sparse file: it takes only what is written (memstore would hold it all in memory).
bluestore_block_path = $dir/osd.block
bluestore_block_size = 21474836480
bluestore_block_create = true
bluestore_cache_size = 134217728
osd_memory_target = 939524096
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
CONF
	monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" "$dir/run/monmap" >/dev/null
	mkfs_keyring=()
	if [ "$auth" = cephx ]; then
		ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
		ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
		ceph-authtool "$dir/keyring" -n client.admin -p >"$dir/admin.key"
		mkfs_keyring=(--keyring "$dir/keyring")
	fi
	ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/run/monmap" "${mkfs_keyring[@]}" >"$dir/log/mkfs.log" 2>&1
	ceph-mon -c "$conf" -i a
	id=$(ceph -c "$conf" osd create)
	[ "$id" = 0 ] || { echo "ceph-cluster: osd create gave $id" >&2; exit 1; }
	ceph-osd -c "$conf" -i 0 --mkfs --mkkey --no-mon-config >>"$dir/log/mkfs.log" 2>&1
	if [ "$auth" = cephx ]; then
		ceph -c "$conf" auth add osd.0 osd 'allow *' mon 'allow profile osd' -i "$dir/osd/keyring" >/dev/null 2>&1
	fi
	start_osd
	ceph -c "$conf" osd pool create rbd 8 8 >/dev/null 2>&1
	rbd -c "$conf" pool init rbd
	echo "$conf"
	;;
stop)
	stop_daemon osd.0
	stop_daemon mon.a
	;;
restart-osd)
	stop_daemon osd.0
	start_osd
	;;
*)
	usage
	;;
esac
