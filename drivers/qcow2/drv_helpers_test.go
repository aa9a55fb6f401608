package qcow2_test

// Helpers for the driver tests (package qcow2_test, so they cannot clash
// with the on-disk layer's internal test helpers). qemu-img and qemu-io
// (Debian package qemu-utils) are the oracle.

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/file"
	"ublkimg/drivers/qcow2"
	_ "ublkimg/drivers/raw"
)

// sh runs a command and returns its combined output, failing the test on
// error.
func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qimg runs qemu-img create -f qcow2 with extra arguments.
func qimg(t testing.TB, path, size string, args ...string) string {
	t.Helper()
	a := append([]string{"create", "-q", "-f", "qcow2"}, args...)
	a = append(a, path)
	if size != "" {
		a = append(a, size)
	}
	sh(t, "qemu-img", a...)
	return path
}

// qio runs qemu-io commands on an image (format probed unless fmt given).
func qio(t testing.TB, path string, cmds ...string) {
	t.Helper()
	a := []string{}
	for _, c := range cmds {
		a = append(a, "-c", c)
	}
	a = append(a, path)
	out := sh(t, "qemu-io", a...)
	if strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
}

// rawOf converts an image (with its backing chain) to raw with qemu-img and
// returns the bytes.
func rawOf(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "oracle.raw")
	sh(t, "qemu-img", "convert", "-U", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// qcheck runs qemu-img check and fails on corruption (leaks are allowed
// only if allowLeaks).
func qcheck(t testing.TB, path string, allowLeaks bool) {
	t.Helper()
	code, out := checkCode(t, path)
	if code == 0 || (code == 3 && allowLeaks) {
		return
	}
	t.Fatalf("qemu-img check %s: exit %d\n%s", filepath.Base(path), code, out)
}

// checkCode runs qemu-img check and returns its exit code and output.
func checkCode(t testing.TB, path string) (int, string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-U", path).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, string(out)
}

// openErr tries to open spec and returns the error.
func openErr(spec bdrv.Spec) error {
	return coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, spec)
		if err != nil {
			return err
		}
		return n.Close(co)
	})
}

// readChunked reads the whole node in chunks of the given sizes (cycled).
func readChunked(co *coroutine.Co, n *bdrv.Node, chunks []int) ([]byte, error) {
	size := n.Length()
	out := make([]byte, size)
	for off, i := int64(0), 0; off < size; i++ {
		c := min(int64(chunks[i%len(chunks)]), size-off)
		if err := n.Preadv(co, off, bdrv.IOVec{out[off : off+c]}, 0); err != nil {
			return nil, fmt.Errorf("read %#x+%#x: %w", off, c, err)
		}
		off += c
	}
	return out, nil
}

// checkReads opens path read-only and compares what it reads, with several
// request sizes, against qemu-img convert's raw output.
func checkReads(t *testing.T, path string, opts bdrv.Options) {
	t.Helper()
	want := rawOf(t, path)
	bdrvtest.WithNode(t, bdrv.Spec{Filename: path, ReadOnly: true, Options: opts}, func(co *coroutine.Co, n *bdrv.Node) error {
		if n.Length() != int64(len(want)) {
			return fmt.Errorf("length %d, qemu-img says %d", n.Length(), len(want))
		}
		for _, chunks := range [][]int{{1 << 20}, {4096}, {7777, 513, 65536 + 3}} {
			got, err := readChunked(co, n, chunks)
			if err != nil {
				return err
			}
			if i := firstDiff(got, want); i >= 0 {
				return fmt.Errorf("chunks %v: content differs from qemu-img at %#x: got %#x want %#x", chunks, i, got[i], want[i])
			}
		}
		return nil
	})
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// pattern returns n pseudo-random but compressible bytes.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := 0; i < n; {
		run := 1 + r.IntN(64)
		v := byte(r.Uint32())
		for j := 0; j < run && i < n; j++ {
			b[i] = v
			i++
		}
	}
	return b
}

// imageOf returns the qcow2 driver of a node.
func imageOf(t testing.TB, n *bdrv.Node) *qcow2.Image {
	img, ok := n.Driver().(*qcow2.Image)
	if !ok {
		t.Fatalf("node driver is %T, not *qcow2.Image", n.Driver())
	}
	return img
}

// exec_ runs qemu-img with args and returns its combined output.
func exec_(args ...string) (string, error) {
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	return string(out), err
}
