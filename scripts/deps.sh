#!/usr/bin/env bash
# Installs what `make test` needs when it is missing, with apt-get (Debian 12)
# and the Go module proxy. Safe to re-run: it does nothing when everything is
# present. Needs root (or sudo) only when something has to be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img           || need+=(qemu-utils)
have qemu-system-x86_64 || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
have fio                || need+=(fio)
# cmd/ublkimg's option tests compare the flags images are opened with.
have strace             || need+=(strace)
have mke2fs             || need+=(e2fsprogs)
have cpio               || need+=(cpio)
have xz                 || need+=(xz-utils)
have zstd               || need+=(zstd)
# Peak memory of qemu-img and ublkimg runs (GNU time -f %M).
[ -x /usr/bin/time ]    || need+=(time)
have dpkg-deb           || need+=(dpkg)
# vmtest: the guest's /bin/sh is the host's dash, with ldd's libraries.
have dash               || need+=(dash)
have ldd                || need+=(libc-bin)
# -race needs cgo: the unit tests and the race-enabled guest binaries.
have gcc                || need+=(gcc libc6-dev)
# The rbd driver: a throwaway Ceph cluster (scripts/ceph-cluster.sh), librbd
# for ublkimg, qemu-img's rbd driver as the oracle, rbd-nbd for the bench.
have ceph-mon           || need+=(ceph-mon)
have ceph-osd           || need+=(ceph-osd)
have rbd                || need+=(ceph-common)
have rbd-nbd            || need+=(rbd-nbd)
have ss                 || need+=(iproute2)
dpkg -s librbd1 >/dev/null 2>&1 || need+=(librbd1)
dpkg -s qemu-block-extra >/dev/null 2>&1 || need+=(qemu-block-extra)

if [ ${#need[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	echo "deps: installing ${need[*]}"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# staticcheck is a Go tool: built once into the project's cache, pinned.
if [ ! -x .cache/bin/staticcheck ]; then
	echo "deps: building staticcheck"
	mkdir -p .cache/bin
	GOBIN="$PWD/.cache/bin" go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi
