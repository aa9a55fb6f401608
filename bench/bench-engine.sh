#!/bin/bash
# bench-engine.sh: race `ublkimg bench` against `qemu-img bench` on the same
# preallocated raw image with the same flags, and print a table of the run
# times and of the ratio qemu-img time / ublkimg time (above 1: ublkimg is
# faster).
#
# Every combination of cache mode (writeback, none) and direction (read,
# write) runs RUNS times per tool, the tools alternating so that both see
# the same page cache and disk state. Not a test: it reports, never fails.
#
# Environment:
#   RUNS=3        runs per tool and combination
#   COUNT=200000  requests per run (qemu-img bench -c)
#   DEPTH=32      requests in flight (-d)
#   SIZE=4k       request size (-s)
#   DIR=/var/tmp  where the 1 GiB image goes (must support O_DIRECT: not tmpfs)
#   QEMU_IMG=qemu-img
set -euo pipefail

RUNS=${RUNS:-3}
COUNT=${COUNT:-200000}
DEPTH=${DEPTH:-32}
SIZE=${SIZE:-4k}
DIR=${DIR:-/var/tmp}
QEMU_IMG=${QEMU_IMG:-qemu-img}

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "$DIR/bench-engine.XXXXXX")
trap 'rm -rf "$work"' EXIT

command -v "$QEMU_IMG" >/dev/null || { echo "bench-engine: $QEMU_IMG not found (apt-get install qemu-utils)" >&2; exit 1; }

echo "building ublkimg..." >&2
(cd "$repo" && go build -o "$work/ublkimg" ./cmd/ublkimg)
UBLKIMG=$work/ublkimg

img=$work/bench.raw
"$QEMU_IMG" create -q -f raw -o preallocation=full "$img" 1G

# run TOOL CACHE RW: one bench run, prints its time in seconds.
run() {
	local tool=$1 cache=$2 rw=$3 bin flags out
	case $tool in
	qemu-img) bin=$QEMU_IMG ;;
	ublkimg) bin=$UBLKIMG ;;
	esac
	flags=(-f raw -c "$COUNT" -d "$DEPTH" -s "$SIZE" -t "$cache")
	[ "$rw" = write ] && flags+=(-w)
	out=$("$bin" bench "${flags[@]}" "$img")
	sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out"
}

# median of the arguments
median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

echo "ublkimg bench vs qemu-img bench: $COUNT requests of $SIZE, depth $DEPTH, $RUNS runs each, 1 GiB preallocated raw image in $DIR"
echo "qemu-img: $("$QEMU_IMG" --version | head -1)"
echo
printf '%-10s %-6s  %-28s %-28s %8s\n' cache rw "qemu-img times (s)" "ublkimg times (s)" "ratio"
printf '%-10s %-6s  %-28s %-28s %8s\n' ---------- ------ ---------------------------- ---------------------------- --------
for cache in writeback none; do
	for rw in read write; do
		q=() u=()
		# Warm up the page cache and the disk the same way for both.
		run qemu-img "$cache" "$rw" >/dev/null
		for ((i = 0; i < RUNS; i++)); do
			if ((i % 2 == 0)); then
				q+=("$(run qemu-img "$cache" "$rw")")
				u+=("$(run ublkimg "$cache" "$rw")")
			else
				u+=("$(run ublkimg "$cache" "$rw")")
				q+=("$(run qemu-img "$cache" "$rw")")
			fi
		done
		qm=$(median "${q[@]}") um=$(median "${u[@]}")
		ratio=$(awk -v q="$qm" -v u="$um" 'BEGIN { if (u > 0) printf "%.2f", q / u; else print "-" }')
		printf '%-10s %-6s  %-28s %-28s %8s\n' "$cache" "$rw" "${q[*]}" "${u[*]}" "$ratio"
	done
done
echo
echo "ratio = median qemu-img time / median ublkimg time (above 1: ublkimg is faster)"
