package rbd

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// libName is the library loaded at the first open; Debian's librbd1
// installs it (and librados.so.2, which it links).
const libName = "librbd.so.1"

// errNoLib is the one line a user without librbd sees.
var errNoLib = errors.New("rbd: " + libName + " not found (install librbd1)")

// lib holds the addresses of the librados and librbd functions the driver
// calls, resolved once by load.
var lib struct {
	once sync.Once
	err  error

	radosCreate, radosConfReadFile, radosConfSet, radosConnect, radosShutdown uintptr
	radosIoctxCreate, radosIoctxDestroy, radosIoctxSetNamespace               uintptr

	open, openReadOnly, close, stat, getFeatures, getFlags, getParentInfo uintptr
	resize2, create4                                                      uintptr
	optsCreate, optsDestroy, optsSetUint64                                uintptr
	namespaceExists                                                       uintptr

	aioCreateCompletion, aioRelease, aioGetReturnValue, aioGetArg uintptr
	aioReadv, aioWritev, aioFlush, aioDiscard, aioWriteZeroes     uintptr
	setImageNotification, pollIOEvents                            uintptr

	diffIterate2                                                uintptr
	snapList, snapListEnd, snapCreate, snapRemove, snapRollback uintptr
	snapGetTimestamp, snapGetID                                 uintptr
	invalidateCache                                             uintptr

	// diffCallback and progressCallback are C function pointers to Go
	// functions (purego callbacks are never freed, so there is one of
	// each for the process).
	diffCallback, progressCallback uintptr
}

// load opens librbd (which brings librados) and resolves every function
// the driver uses. It runs once; later calls return the first result.
func load() error {
	lib.once.Do(func() { lib.err = doLoad(libName) })
	return lib.err
}

// doLoad loads the library name (libName but in tests).
func doLoad(name string) error {
	h, err := purego.Dlopen(name, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return errNoLib
	}
	syms := []struct {
		p    *uintptr
		name string
	}{
		{&lib.radosCreate, "rados_create"},
		{&lib.radosConfReadFile, "rados_conf_read_file"},
		{&lib.radosConfSet, "rados_conf_set"},
		{&lib.radosConnect, "rados_connect"},
		{&lib.radosShutdown, "rados_shutdown"},
		{&lib.radosIoctxCreate, "rados_ioctx_create"},
		{&lib.radosIoctxDestroy, "rados_ioctx_destroy"},
		{&lib.radosIoctxSetNamespace, "rados_ioctx_set_namespace"},
		{&lib.open, "rbd_open"},
		{&lib.openReadOnly, "rbd_open_read_only"},
		{&lib.close, "rbd_close"},
		{&lib.stat, "rbd_stat"},
		{&lib.getFeatures, "rbd_get_features"},
		{&lib.getFlags, "rbd_get_flags"},
		{&lib.getParentInfo, "rbd_get_parent_info"},
		{&lib.resize2, "rbd_resize2"},
		{&lib.create4, "rbd_create4"},
		{&lib.optsCreate, "rbd_image_options_create"},
		{&lib.optsDestroy, "rbd_image_options_destroy"},
		{&lib.optsSetUint64, "rbd_image_options_set_uint64"},
		{&lib.namespaceExists, "rbd_namespace_exists"},
		{&lib.aioCreateCompletion, "rbd_aio_create_completion"},
		{&lib.aioRelease, "rbd_aio_release"},
		{&lib.aioGetReturnValue, "rbd_aio_get_return_value"},
		{&lib.aioGetArg, "rbd_aio_get_arg"},
		{&lib.aioReadv, "rbd_aio_readv"},
		{&lib.aioWritev, "rbd_aio_writev"},
		{&lib.aioFlush, "rbd_aio_flush"},
		{&lib.aioDiscard, "rbd_aio_discard"},
		{&lib.aioWriteZeroes, "rbd_aio_write_zeroes"},
		{&lib.setImageNotification, "rbd_set_image_notification"},
		{&lib.pollIOEvents, "rbd_poll_io_events"},
		{&lib.diffIterate2, "rbd_diff_iterate2"},
		{&lib.snapList, "rbd_snap_list"},
		{&lib.snapListEnd, "rbd_snap_list_end"},
		{&lib.snapCreate, "rbd_snap_create"},
		{&lib.snapRemove, "rbd_snap_remove"},
		{&lib.snapRollback, "rbd_snap_rollback"},
	}
	for _, s := range syms {
		if *s.p, err = purego.Dlsym(h, s.name); err != nil {
			return fmt.Errorf("rbd: %s has no %s (librbd1 of Ceph 14 or later is needed)", libName, s.name)
		}
	}
	lib.diffCallback = purego.NewCallback(diffCallback)
	lib.progressCallback = purego.NewCallback(func(offset, total uint64, arg uintptr) int32 { return 0 })
	return nil
}

// The call helpers pass their arguments to purego.SyscallN. An argument
// that is a Go pointer must be converted to uintptr in the helper's own
// argument list (uintptr(unsafe.Pointer(p))): with //go:uintptrescapes the
// object it points to is heap-allocated and kept alive until the C function
// returns, as for syscall.Syscall. Memory C keeps after it returns is kept
// alive by other means (see request).

// call calls the C function fn and returns its int result, sign-extended:
// librados and librbd return 0 or a negative errno.
//
//go:uintptrescapes
func call(fn uintptr, args ...uintptr) int {
	r, _, _ := purego.SyscallN(fn, args...)
	return int(int32(r))
}

// call64 is call for functions returning ssize_t or int64_t.
//
//go:uintptrescapes
func call64(fn uintptr, args ...uintptr) int64 {
	r, _, _ := purego.SyscallN(fn, args...)
	return int64(r)
}

// callPtr is call for functions returning a pointer.
//
//go:uintptrescapes
func callPtr(fn uintptr, args ...uintptr) uintptr {
	r, _, _ := purego.SyscallN(fn, args...)
	return r
}

// cstring returns s as a NUL-terminated C string in Go memory, to pass as
// uintptr(unsafe.Pointer(cstring(s))) in a call helper's arguments.
func cstring(s string) *byte {
	b := make([]byte, len(s)+1)
	copy(b, s)
	return &b[0]
}

// goString copies a NUL-terminated C string.
func goString(p uintptr) string {
	if p == 0 {
		return ""
	}
	// C memory: the conversion through a pointer keeps vet's uintptr
	// check quiet; nothing here is Go memory the collector could move.
	base := *(*unsafe.Pointer)(unsafe.Pointer(&p))
	var n int
	for *(*byte)(unsafe.Add(base, n)) != 0 {
		n++
	}
	return string(unsafe.Slice((*byte)(base), n))
}
