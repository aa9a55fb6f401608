#!/usr/bin/env bash
# Side-by-side benchmark in the test VM: ublkimg vs the kernel loop device vs
# qemu-nbd over nbd, fio 4 KiB random and 128 KiB sequential I/O. Writes
# bench/results/{results.json,results.dat,results.png} and prints the table.
#
#   bench/run.sh                 # images on ext4 on a virtio disk (default)
#   STORAGE=tmpfs bench/run.sh   # images on the guest's tmpfs
#   RUNTIME=10 bench/run.sh      # seconds per fio run
#
# qcow2 devices are included when ublkimg can create qcow2 images. gnuplot
# (Debian: gnuplot-nox) draws the chart; it is installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if ! command -v gnuplot >/dev/null; then
	sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
	$sudo apt-get install -y -qq gnuplot-nox >/dev/null || echo "bench: no gnuplot, no chart"
fi
devices=ublk-raw,loop,nbd-raw
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if go run ./cmd/ublkimg create -f qcow2 "$tmp/probe.qcow2" 1M >/dev/null 2>&1; then
	devices=$devices,ublk-qcow2,nbd-qcow2
fi
exec go run ./bench/vmbench -devices "${DEVICES:-$devices}" -runtime "${RUNTIME:-5}" \
	-storage "${STORAGE:-disk}" -out "${OUT:-bench/results}" "$@"
