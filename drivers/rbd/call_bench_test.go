package rbd

import (
	"runtime"
	"testing"
	"unsafe"

	"github.com/ebitengine/purego"
)

// BenchmarkCall is the cost of one call into librbd through purego
// (rbd_version: three pointer arguments, no work), which a request pays
// about six times (create the completion, submit, and take its argument,
// result and release from the poll).
func BenchmarkCall(b *testing.B) {
	if err := load(); err != nil {
		b.Skip(err)
	}
	h, err := purego.Dlopen(libName, purego.RTLD_NOW)
	if err != nil {
		b.Fatal(err)
	}
	fn, err := purego.Dlsym(h, "rbd_version")
	if err != nil {
		b.Fatal(err)
	}
	var v [3]int32
	b.ReportAllocs()
	for b.Loop() {
		call(fn, uintptr(unsafe.Pointer(&v[0])), uintptr(unsafe.Pointer(&v[1])), uintptr(unsafe.Pointer(&v[2])))
	}
}

// BenchmarkPin is the cost of pinning and unpinning a request's buffer.
func BenchmarkPin(b *testing.B) {
	buf := make([]byte, 4096)
	var p runtime.Pinner
	b.ReportAllocs()
	for b.Loop() {
		p.Pin(&buf[0])
		p.Unpin()
	}
}
