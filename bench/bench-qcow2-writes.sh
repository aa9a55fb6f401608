#!/bin/bash
# bench-qcow2-writes.sh: the engine's qcow2 writes, ublkimg bench against
# qemu-img bench -i io_uring, whole-process time (what a user waits for,
# the closing flush included), best of RUNS, the tools alternating:
#
#   rewrite: 4 KiB writes over clusters a first run allocated
#   alloc:   4 KiB writes into a new image (a cluster allocated every 16)
#
# Both at depth 32 through the page cache (-t writeback). Prints each
# tool's best time and qemu-img's time over it (above 1: faster than
# qemu-img), and in brackets the best time of the run phase alone (the
# tool's "Run completed in", without the closing flush that writes the
# 400 MB back). Not a test: it reports, and fails only when qemu-img check
# finds an image inconsistent after a run.
#
# Environment: RUNS=5, COUNT=100000 (requests per run), DIR=/var/tmp (a disk
# file system), QEMU_IMG=qemu-img, BASE=another ublkimg binary to compare
# (e.g. an older build), run alongside.
set -euo pipefail

RUNS=${RUNS:-5}
COUNT=${COUNT:-100000}
DIR=${DIR:-/var/tmp}
QEMU_IMG=${QEMU_IMG:-qemu-img}

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "$DIR/bench-qcow2.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building ublkimg..." >&2
(cd "$repo" && go build -o "$work/ublkimg" ./cmd/ublkimg)
tools=(qemu-img "$work/ublkimg")
[ -n "${BASE:-}" ] && tools+=("$BASE")
img=$work/bench.qcow2

# run TOOL MODE: one run on a fresh image, prints its whole-process time
# (µs) and its run phase (s).
run() {
	local tool=$1 mode=$2 bin=$1 extra=() s e out
	rm -f "$img"
	"$QEMU_IMG" create -q -f qcow2 "$img" 1G
	if [ "$mode" = rewrite ]; then
		"$QEMU_IMG" bench -q -f qcow2 -w -c "$COUNT" -d 32 -s 4k -t writeback "$img" >/dev/null
	fi
	sync
	if [ "$tool" = qemu-img ]; then
		bin=$QEMU_IMG extra=(-i io_uring)
	fi
	s=$(date +%s%N)
	out=$("$bin" bench -f qcow2 -w -c "$COUNT" -d 32 -s 4k -t writeback "${extra[@]}" "$img")
	e=$(date +%s%N)
	# Outside the timing: every run must leave a consistent image.
	if ! "$QEMU_IMG" check -q -f qcow2 "$img" >&2; then
		echo "bench-qcow2-writes: qemu-img check failed after $tool ($mode)" >&2
		exit 1
	fi
	echo $(((e - s) / 1000)) "$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out")"
}

echo "qcow2 writes, $COUNT requests of 4 KiB at depth 32, page cache, best of $RUNS (host load: $(cut -d' ' -f1-3 /proc/loadavg))"
for mode in rewrite alloc; do
	declare -A best=() phase=()
	for ((i = 0; i < RUNS; i++)); do
		for tool in "${tools[@]}"; do
			r=$(run "$tool" "$mode") || exit 1
			read -r t p <<<"$r"
			if [ -z "${best[$tool]:-}" ] || [ "$t" -lt "${best[$tool]}" ]; then
				best[$tool]=$t
			fi
			if [ -z "${phase[$tool]:-}" ] || awk -v a="$p" -v b="${phase[$tool]}" 'BEGIN { exit !(a < b) }'; then
				phase[$tool]=$p
			fi
		done
	done
	line=$(printf '%-8s' "$mode")
	for tool in "${tools[@]}"; do
		name=$(basename "$tool")
		[ "$tool" = "$work/ublkimg" ] && name=ublkimg
		line+=$(awk -v n="$name" -v t="${best[$tool]}" -v q="${best[qemu-img]}" -v p="${phase[$tool]}" -v qp="${phase[qemu-img]}" \
			'BEGIN { printf "  %s %.3f s (%.2fx) [%.3f s, %.2fx]", n, t / 1e6, q / t, p, qp / p }')
	done
	echo "$line"
	unset best phase
done
