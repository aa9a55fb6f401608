// Package vmtest runs end-to-end tests in a virtual machine booting a Debian
// 6.12 kernel, which builds ublk (the host's kernel need not).
//
// The pieces, each usable alone:
//
//   - Kernel / LoadKernel fetch the kernel package with `apt-get download`,
//     unpack it with `dpkg-deb -x` into CacheDir(), and resolve modules with
//     their dependencies (KernelFiles.Modules), decompressed for busybox
//     insmod.
//   - BuildInitramfs builds a newc cpio archive: static busybox with its
//     applet links, dash as /bin/sh, a generated /init, the modules, and
//     the caller's files with the shared libraries `ldd` lists.
//   - Run appends the scenario script, boots qemu-system-x86_64 (TCG
//     unless told otherwise), streams the serial console, parses the
//     results and fails on anything amiss.
//   - RequireTools and RunTest adapt them to tests; VM tests are off unless
//     UBLKIMG_VM=1 or -vm is given.
//
// # Guest protocol
//
// The scenario is a POSIX sh script (dash) run by /init from /tmp, with
// these helpers already defined (guest/lib.sh):
//
//	result NAME PASS|FAIL|SKIP [DETAIL...]   report a case
//	check NAME CMD [ARG...]                  run CMD; PASS if it exits 0
//	metric NAME VALUE                        report a measurement
//
// They print protocol lines on the console and on a second serial port, the
// results channel, which nothing else writes to:
//
//	@@ BOOT <uptime> <release>      /init started
//	@@ READY <uptime>               modules loaded, scenario starting
//	@@ RESULT <name> <status> <detail...>
//	@@ METRIC <name> <value>
//	@@ DMESG BEGIN ... @@ DMESG END the kernel log (results channel only)
//	@@ DONE <scenario exit status>
//
// Run fails when a case is not PASS or SKIP, when the kernel log shows a
// panic, oops, BUG, WARNING, lockup or hung task, when DONE is missing or
// the scenario exited non-zero, and on timeout.
//
// # Environment
//
//	UBLKIMG_VM=1|0           turn VM tests on or off (default off; -vm also turns them on)
//	UBLKIMG_VM_CACHE=DIR     cache directory (default $XDG_CACHE_HOME/ublkimg-vm)
//	UBLKIMG_VM_KERNEL_PKG=P  Debian kernel package (default DefaultKernelPackage)
//	UBLKIMG_VM_ACCEL=tcg|kvm accelerator (default tcg)
//	UBLKIMG_VM_TIMEOUT=D     per-run timeout (default DefaultTimeout)
package vmtest
