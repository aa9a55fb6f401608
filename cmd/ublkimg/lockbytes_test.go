package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/internal/qemutest"
)

// TestLockBytesAsQemuImg: a verb claims the image lock bytes that qemu-img
// 7.2 claims, seen through what it refuses. Another process (here a second
// open file description of this one) holds one lock byte at a time, and
// ublkimg must succeed or refuse, with the same words, as qemu-img does:
// a byte 200+i refuses a verb that uses permission i, a byte 100+i one
// that does not share it.
func TestLockBytesAsQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, `
qemu-img create -q -f qcow2 a.qcow2 1M
qemu-img create -q -f raw r.raw 1M
`)
	const roOverRW = "driver=qcow2,read-only=on,file.read-only=off,file.filename=a.qcow2"
	all := []int{100, 101, 102, 103, 200, 201, 202, 203}
	for _, tc := range []struct {
		held  string // the image whose lock byte is held
		args  []string
		bytes []int // the bytes to try; nil for all
	}{
		// qemu-img resize shares writing and resizing: a raw image is
		// resized beside a writer that shares them too (qemu-io -f raw);
		// qcow2 never shares its file's writing.
		{"r.raw", []string{"resize", "-f", "raw", "r.raw", "2M"}, nil},
		{"r.raw", []string{"resize", "--shrink", "-f", "raw", "r.raw", "512K"}, nil},
		{"r.raw", []string{"resize", "r.raw", "+1M"}, nil},
		{"a.qcow2", []string{"resize", "a.qcow2", "+1M"}, nil},
		// The file's bytes follow what the image's users do: a
		// read-only image over a file opened read-write reads.
		{"a.qcow2", []string{"check", "--image-opts", roOverRW}, nil},
		{"a.qcow2", []string{"check", "--image-opts", "driver=qcow2,file.read-only=off,file.filename=a.qcow2"}, nil},
		{"a.qcow2", []string{"map", "--image-opts", roOverRW}, nil},
		{"a.qcow2", []string{"map", "--image-opts", "driver=qcow2,read-only=off,file.filename=a.qcow2"}, nil},
		// A read-write raw image that the verb only reads: its file is
		// read. (qemu-img's reader shares writing too; ublkimg's does
		// not, so bytes 101 and 103 refuse it.)
		{"r.raw", []string{"map", "--image-opts", "driver=raw,read-only=off,file.filename=r.raw"}, []int{100, 102, 200, 201, 202, 203}},
		// info reads metadata only: no consistent-read permission.
		{"a.qcow2", []string{"info", "a.qcow2"}, nil},
		{"a.qcow2", []string{"info", "--image-opts", roOverRW}, nil},
	} {
		args, image := tc.args, tc.held
		if tc.bytes == nil {
			tc.bytes = all
		}
		for _, b := range tc.bytes {
			t.Run(fmt.Sprint(strings.Join(args, " "), " byte ", b), func(t *testing.T) {
				want := runHeld(t, copyImages(t, src), image, b, "qemu-img", args)
				got := runHeld(t, copyImages(t, src), image, b, binary, args)
				if got.code != want.code || got.stdout != want.stdout {
					t.Fatalf("ublkimg: exit %d\n%s%s\nqemu-img: exit %d\n%s%s", got.code, got.stdout, got.stderr,
						want.code, want.stdout, want.stderr)
				}
				if g, w := toolStderr(t, got, want); g != w {
					t.Errorf("stderr:\n%s\nqemu-img's, as ublkimg words it:\n%s", g, w)
				}
			})
		}
	}
}

// runHeld runs a command in dir while a lock byte of image is held by an
// open file description of its own.
func runHeld(t *testing.T, dir, image string, b int, name string, args []string) result {
	t.Helper()
	fd, err := unix.Open(filepath.Join(dir, image), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: unix.SEEK_SET, Start: int64(b), Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	return runIn(t, dir, name, args...)
}
