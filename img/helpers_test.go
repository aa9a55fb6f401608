package img

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/coroutine"

	// The formats the tests use.
	_ "ublkimg/drivers/file"
	_ "ublkimg/drivers/luks"
	_ "ublkimg/drivers/qcow2"
	_ "ublkimg/drivers/raw"
)

// qemuImg runs qemu-img and returns stdout, stderr and the exit status.
func qemuImg(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("qemu-img", args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// runCo runs fn as a coroutine, failing the test on a loop error.
func runCo(t *testing.T, fn func(co *coroutine.Co) error) error {
	t.Helper()
	return coroutine.Run(fn)
}

// image describes a test image: a size, and extents of random data at
// given offsets; the rest is a hole.
type image struct {
	size    int64
	extents [][2]int64 // offset, length
}

// make writes img into dir/name and returns the path and the content.
func (im image) make(t *testing.T, dir, name string) (string, []byte) {
	t.Helper()
	path := filepath.Join(dir, name)
	content := make([]byte, im.size)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(im.size); err != nil {
		t.Fatal(err)
	}
	for _, e := range im.extents {
		b := content[e[0] : e[0]+e[1]]
		rand.Read(b)
		if _, err := f.WriteAt(b, e[0]); err != nil {
			t.Fatal(err)
		}
	}
	return path, content
}

// allocatedBytes is the file's disk usage (st_blocks), what "disk size"
// and sparse checks look at.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// lines splits output into lines without the trailing empty one.
func lines(s string) []string {
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

// testingAllocs is the number of heap allocations fn makes.
func testingAllocs(fn func()) float64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return float64(after.Mallocs - before.Mallocs)
}
