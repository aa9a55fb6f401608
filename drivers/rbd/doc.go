// Package rbd is the protocol driver for Ceph RBD images (QEMU's
// block/rbd.c): file names rbd:pool[/namespace]/image[@snapshot][:conf=FILE]
// [:id=USER][:key=value...], or --image-opts driver=rbd,pool=,namespace=,
// image=,snapshot=,conf=,user=,key-secret= (the cephx key from an --object
// secret, never on the command line).
//
// # Loading librbd
//
// librbd (Debian's librbd1, which brings librados) is loaded at the first
// open with dlopen, through github.com/ebitengine/purego, which needs no
// cgo: CGO_ENABLED=0 builds keep working and no Ceph headers or libraries
// are needed to build. Without librbd everything else works and an rbd:
// image gives one line, "rbd: librbd.so.1 not found (install librbd1)".
// The price is that a program importing this package is dynamically linked
// against the C library (purego needs the system's dlopen and a C-compatible
// runtime; a static Go binary cannot load a C++ shared library): it still
// runs on any glibc host without Ceph. cmd/ublkimg imports the package
// unless built with -tags norbd, which, with CGO_ENABLED=0, gives a static
// binary without rbd (with cgo, package net links the C library anyway).
// The alternative, cgo behind a build tag, would need librbd-dev to build
// and give two binaries that differ in what they open.
//
// A call through purego costs about 110 ns (BenchmarkCall: one allocation,
// the argument slice); a request makes about six (create the completion,
// submit, and take its argument, result and release), plus pinning its
// buffers (~100 ns): under 1 µs, against librbd's own tens of microseconds
// and the network round trip to the OSD.
//
// # I/O
//
// Reads, writes, flushes, discards and write-zeroes are librbd aio calls,
// completed through an eventfd that a loop reads as an ordinary ring
// operation (aio.go says how, and how buffers stay valid while librbd holds
// them). One image handle per node serves every queue of a device. FUA is
// a flush (the generic layer's emulation). Calls that block (connect, open,
// close, resize, snapshots, block status) run off the loop (Co.Offload).
//
// librados gets timeouts for connecting and for monitor operations (an
// unreachable cluster is an error after about 20 s, not a hang) but none for
// OSD operations: a restarting OSD stalls I/O, which then resumes.
package rbd
