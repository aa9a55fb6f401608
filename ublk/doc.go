// Package ublk exports disk images as Linux block devices through the ublk
// driver (ublk_drv): /dev/ublkbN, whose requests a server in user space
// (this package) performs on a bdrv node.
//
// # Control and data plane
//
// [Ctrl] is /dev/ublk-control: ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV,
// DEL_DEV and GET_DEV_INFO, sent as io_uring commands on a ring of 128-byte
// SQEs run by a coroutine loop of its own. GET_FEATURES is probed when it
// opens; when it fails (kernels before 6.5) the legacy opcodes are used.
//
// A [Device] has one queue per hardware queue. A queue is a
// coroutine.Loop: one locked OS thread (marked PR_SET_IO_FLUSHER) with one
// io_uring that carries both the queue's ublk commands and the image I/O
// its requests cause, and one long-lived coroutine per tag. A tag's
// coroutine sends FETCH, and for every request the kernel hands it reads
// the descriptor, calls the bdrv node (READ: Preadv; WRITE: Pwritev, with
// ReqFUA for FUA writes; FLUSH: Flush; DISCARD: Pdiscard; WRITE_ZEROES:
// PwriteZeroes, with ReqMayUnmap unless NOUNMAP) and sends
// COMMIT_AND_FETCH with the result, until the kernel ends the tag with
// ENODEV when the device stops. Request data lives in per-tag buffers of
// anonymous memory outside the Go heap, which the kernel copies to and from
// during FETCH and COMMIT (copy mode); with Config.UserCopy the queue moves
// it itself with pread and pwrite of /dev/ublkcN on its thread (through the
// ring, io_uring handed every one to a worker thread: 5-6x slower in the
// test VM). Copy mode is the default: user copy is one more system call
// per request for the same two copies. The exception is a node that hands
// out its data as memory (bdrv.Node.Mappable: a raw image in tmpfs), where
// a READ with user copy is one copy from the image's pages into the
// request's, without the read into a buffer: such devices use user copy
// whenever the kernel has it, unless Config.NoUserCopy (bench/README.md has
// the figures).
//
// START_DEV is sent from the control goroutine only once every queue has
// issued FETCH for every tag and waits in io_uring_enter: the kernel scans
// the partition table, through the device, before START_DEV completes.
//
// # Lifecycle
//
// [Start] creates and starts a device; [Device.Close] stops it, waits for
// the queues, drains, flushes and closes the image, releases /dev/ublkcN
// and deletes the device, in that order (see Close). A failure after
// ADD_DEV deletes what was created. [Serve] wraps both around a context,
// in the manner of libublk's run_target.
//
// The device's parameters come from the image and the [Config]: capacity,
// logical block size (512 or 4096 ...), maximum request size, a volatile
// write cache with FUA (flushes reach the image), READ_ONLY, and discard and
// write-zeroes limits when the image's driver supports them.
//
// # Threads
//
// Each queue's loop is a locked OS thread that sleeps in io_uring_enter
// between requests; when it wakes it needs a P (a GOMAXPROCS slot), and when
// none is idle the Go runtime hands one over through another thread. A
// server should therefore run with GOMAXPROCS of at least Queues+2, with
// Queues no more than the CPUs, to which the kernel clamps it (ublkimg
// attach sets that).
//
// # Records
//
// ublkimg attach runs a server per device; [WriteRecord] keeps a small JSON
// record per device under [RecordDir] (/run/ublkimg) so that ublkimg list
// and detach can find the image and the server of each device, and a
// server leaves its exit status there ([WriteExitStatus]) for [Detach] to
// report. [ListDevices] merges the records with what the kernel reports.
// The directory is private to its owner (created 0700, refused when anyone
// else may write to it) and its files are never opened through a symbolic
// link: a record names a process that detach signals.
//
// # Statistics and the control socket
//
// Each queue counts its requests by operation (requests, bytes, errors, a
// latency histogram) in plain fields its own thread writes, and
// [Device.Stats] collects copies made on the queues' loops (stats.go).
// [ListenControl] serves a device's control socket, /run/ublkimg/ublkbN.sock:
// a line-oriented JSON protocol after QEMU's QMP ({"execute": ...} ->
// {"return": ...} or {"error": ...}, with {"event": ...} lines before the
// reply), with the commands the device serves itself
// ([Device.ControlCommands]: query-stats) and those its server adds (live
// jobs, restart); [ConnectDevice] is the client side. docs/control.md
// describes the protocol and every command.
//
// [Device.Pause] holds new requests on every queue (a flag tested on the
// queue's own thread) and waits for those in flight, so that a job can
// replace the node the device serves ([Device.SetNode]) or hand the device
// to another server ([Device.Handover], for ublkimg restart) at a moment
// when no request runs.
//
// The kernel interface this package relies on, with the kernel versions
// that introduced each part, is described in docs/ublk-uapi.md.
package ublk
