package coroutine

import (
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/uring"
)

// onHeap reports whether p points into memory the garbage collector never
// moves: a Go heap object (or static data). runtime.AddCleanup accepts
// exactly those and panics for any other pointer, a goroutine stack first
// of all.
func onHeap(p unsafe.Pointer) (ok bool) {
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()
	runtime.AddCleanup((*byte)(p), func(int) {}, 0).Stop()
	return true
}

// addrPtr turns an SQE address back into a pointer for onHeap. The memory
// is held by the Co until Wait, so the object stays alive meanwhile.
func addrPtr(addr uint64) unsafe.Pointer {
	return *(*unsafe.Pointer)(unsafe.Pointer(&addr))
}

// TestOnHeapSeesStacks checks the probe itself: a local array that does not
// escape is on the stack and must be reported so, a new one on the heap.
func TestOnHeapSeesStacks(t *testing.T) {
	var local [64]byte
	local[0] = 1
	u := uintptr(unsafe.Pointer(&local[0])) // an integer: local stays on the stack
	if onHeap(addrPtr(uint64(u))) {
		t.Error("a non-escaping local array is reported on the heap")
	}
	if local[0] != 1 {
		t.Fatal("local array changed")
	}
	if !onHeap(unsafe.Pointer(new([64]byte))) {
		t.Error("a new array is not reported on the heap")
	}
}

// TestIOMemoryIsHeap checks the rule of "Memory handed to the kernel":
// every address a queued read or write carries (the buffer, the iovec array
// and each iovec's buffer) is heap memory, even when the caller's buffers
// are local arrays, and the Co holds it until Wait, then lets go.
func TestIOMemoryIsHeap(t *testing.T) {
	fd, err := unix.Open(filepath.Join(t.TempDir(), "f"), unix.O_RDWR|unix.O_CREAT, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	checkVec := func(t *testing.T, what string, addr uint64, n uint32) {
		t.Helper()
		if !onHeap(addrPtr(addr)) {
			t.Errorf("%s: iovec array %#x is not on the heap", what, addr)
		}
		for i, iov := range unsafe.Slice((*unix.Iovec)(addrPtr(addr)), n) {
			if !onHeap(unsafe.Pointer(iov.Base)) {
				t.Errorf("%s: buffer %d at %p is not on the heap", what, i, iov.Base)
			}
		}
	}
	err = Run(func(co *Co) error {
		// Local arrays, and nothing in this function makes them escape
		// (not even an error message): only Co's hold on them can.
		var a [100]byte
		var b [28]byte
		for i := range a {
			a[i] = byte(i)
		}
		b[0] = 0xee
		sqe := co.Writev(int32(fd), [][]byte{a[:], nil, b[:]}, 0)
		if sqe.Len != 2 {
			t.Errorf("writev carries %d iovecs, want 2 (the empty buffer skipped)", sqe.Len)
		}
		checkVec(t, "writev", sqe.Addr, sqe.Len)
		if res := co.Wait(); res != 128 {
			t.Errorf("writev: res %d, want 128", res)
		}

		var c [64]byte
		sqe = co.Read(int32(fd), c[:], 0)
		if !onHeap(addrPtr(sqe.Addr)) {
			t.Errorf("read: buffer %#x is not on the heap", sqe.Addr)
		}
		if res := co.Wait(); res != 64 || !bytes.Equal(c[:], a[:64]) {
			t.Errorf("read: res %d, data wrong", res)
		}

		var d, e [64]byte
		sqe = co.Readv(int32(fd), [][]byte{d[:], e[:]}, 64)
		checkVec(t, "readv", sqe.Addr, sqe.Len)
		if res := co.Wait(); res != 64 || !bytes.Equal(d[:36], a[64:]) || d[36] != 0xee {
			t.Errorf("readv: res %d, data wrong", res)
		}

		// One non-empty buffer goes out as a plain read: no iovec array.
		var f [16]byte
		sqe = co.Readv(int32(fd), [][]byte{nil, f[:]}, 0)
		if sqe.Opcode != uint8(uring.OpRead) || !onHeap(addrPtr(sqe.Addr)) {
			t.Errorf("readv of one buffer: opcode %d, addr %#x", sqe.Opcode, sqe.Addr)
		}
		co.Wait()

		// After Wait nothing is held: no pins, no buffer pointers.
		if co.pinned {
			t.Error("buffers still pinned after Wait")
		}
		for slot, v := range co.iovs {
			for _, iov := range v[:cap(v)] {
				if iov.Base != nil {
					t.Errorf("slot %d still references a buffer after Wait", slot)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// rawMemoryPreps are the uring builders that put a caller's address in an
// SQE. Outside uring and this package, code uses Co.Read, Co.Write,
// Co.Readv, Co.Writev and Co.Sleep instead, which hold the memory.
var rawMemoryPreps = map[string]bool{
	"PrepRead": true, "PrepWrite": true, "PrepReadv": true, "PrepWritev": true,
	"PrepReadFixed": true, "PrepWriteFixed": true,
	"PrepTimeout": true, "PrepLinkTimeout": true,
}

// TestNoRawMemoryPreps fails when a package above coroutine builds an
// address-carrying SQE itself, where nothing holds the memory for the
// kernel (the way drivers/file once handed the ring an iovec array from
// its stack).
func TestNoRawMemoryPreps(t *testing.T) {
	root := ".." // the module root
	fset := token.NewFileSet()
	files := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != root {
			switch rel, _ := filepath.Rel(root, path); {
			case rel == "uring", rel == "coroutine", strings.HasPrefix(d.Name(), "."), d.Name() == "testdata":
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		files++
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			if sel, ok := call.Fun.(*ast.SelectorExpr); ok && rawMemoryPreps[sel.Sel.Name] {
				t.Errorf("%s: %s: use the coroutine's Read/Write/Readv/Writev, which hold the memory for the kernel",
					fset.Position(call.Pos()), sel.Sel.Name)
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 50 {
		t.Fatalf("checked only %d files: not the module's tree?", files)
	}
}

// BenchmarkRead is one coroutine reading 4 KiB of a cached file, in one
// buffer and in two: through the Co methods, which pin and hold the memory,
// and through raw Prep calls on the same heap memory, to price the hold.
func BenchmarkRead(b *testing.B) {
	fd, err := unix.Open(filepath.Join(b.TempDir(), "f"), unix.O_RDWR|unix.O_CREAT, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.Pwrite(fd, make([]byte, 4096), 0); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 4096)
	bufs := [][]byte{buf[:1024], buf[1024:]}
	iovs := []unix.Iovec{{Base: &buf[0], Len: 1024}, {Base: &buf[1024], Len: 3072}}
	for _, bc := range []struct {
		name string
		op   func(co *Co)
	}{
		{"held-1", func(co *Co) { co.Read(int32(fd), buf, 0) }},
		{"raw-1", func(co *Co) { co.SQE().PrepRead(int32(fd), buf, 0) }},
		{"held-2", func(co *Co) { co.Readv(int32(fd), bufs, 0) }},
		{"raw-2", func(co *Co) { co.SQE().PrepReadv(int32(fd), iovs, 0) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			n := b.N
			b.ResetTimer()
			err := Run(func(co *Co) error {
				for range n {
					bc.op(co)
					if res := co.Wait(); res != 4096 {
						return fmt.Errorf("read: %d", res)
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
	runtime.KeepAlive(iovs)
}
