package qcow2

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"ublkimg/internal/qemutest"
)

// run runs a command and fails the test with its output on error.
func mustRun(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// tryRun runs a command expected to fail and returns its combined output.
func tryRun(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// qemuImgInfoJSON is the subset of `qemu-img info --output=json` the tests check.
type qemuImgInfoJSON struct {
	VirtualSize           uint64 `json:"virtual-size"`
	ClusterSize           uint64 `json:"cluster-size"`
	Format                string `json:"format"`
	BackingFilename       string `json:"backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
	DirtyFlag             bool   `json:"dirty-flag"`
	Snapshots             []struct {
		ID          string `json:"id"`
		Name        string `json:"name"`
		VMStateSize uint64 `json:"vm-state-size"`
		DateSec     uint32 `json:"date-sec"`
		DateNsec    uint32 `json:"date-nsec"`
		VMClockSec  uint64 `json:"vm-clock-sec"`
		VMClockNsec uint64 `json:"vm-clock-nsec"`
		Icount      *int64 `json:"icount"`
	} `json:"snapshots"`
	FormatSpecific struct {
		Type string `json:"type"`
		Data struct {
			Compat          string `json:"compat"`
			CompressionType string `json:"compression-type"`
			LazyRefcounts   bool   `json:"lazy-refcounts"`
			RefcountBits    uint32 `json:"refcount-bits"`
			Corrupt         bool   `json:"corrupt"`
			ExtendedL2      bool   `json:"extended-l2"`
			DataFile        string `json:"data-file"`
			DataFileRaw     bool   `json:"data-file-raw"`
			Encrypt         *struct {
				Format string `json:"format"`
			} `json:"encrypt"`
			Bitmaps []struct {
				Name        string   `json:"name"`
				Granularity uint64   `json:"granularity"`
				Flags       []string `json:"flags"`
			} `json:"bitmaps"`
		} `json:"data"`
	} `json:"format-specific"`
}

func qemuImgInfo(t testing.TB, path string, extra ...string) qemuImgInfoJSON {
	t.Helper()
	args := append([]string{"info", "--output=json", "-U"}, extra...)
	out := mustRun(t, "qemu-img", append(args, path)...)
	var qi qemuImgInfoJSON
	if err := json.Unmarshal(out, &qi); err != nil {
		t.Fatalf("parsing qemu-img info output: %v\n%s", err, out)
	}
	return qi
}

// testImage is a qcow2 file read into memory with its parsed header.
type testImage struct {
	path string
	data []byte
	h    *Header
}

// readTestImage reads a whole image (test images are small) and parses its
// header the way a driver would: from the first cluster(s) and the size.
func readTestImage(t testing.TB, path string) testImage {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader(data[:min(len(data), 2<<20)], int64(len(data)))
	if err != nil {
		t.Fatalf("ParseHeader(%s): %v", filepath.Base(path), err)
	}
	return testImage{path: path, data: data, h: h}
}

// qemuCreate runs qemu-img create -f qcow2 with opts in dir.
func qemuCreate(t testing.TB, dir, name, size string, args ...string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	a := append([]string{"create", "-q", "-f", "qcow2"}, args...)
	a = append(a, p)
	if size != "" {
		a = append(a, size)
	}
	var err error
	out := qemutest.RetryPBKDF2Timing(func() string {
		var out string
		out, err = tryRun("qemu-img", a...)
		return out
	})
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(a, " "), err, out)
	}
	return p
}

// trimZeros drops trailing zero bytes; fuzz targets pad them back, so seeds
// stay small while the fuzzer still sees real headers.
func trimZeros(b []byte) []byte {
	return bytes.TrimRight(b, "\x00")
}

var zstdProbe = sync.OnceValue(func() string {
	dir, err := os.MkdirTemp("", "qcow2-zstd")
	if err != nil {
		return err.Error()
	}
	defer os.RemoveAll(dir)
	out, err := tryRun("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd",
		filepath.Join(dir, "z.qcow2"), "1M")
	if err != nil {
		return strings.TrimSpace(out)
	}
	return ""
})

// requireZstd ends a test (qemutest.Unavailable) when qemu-img was built
// without zstd (the compression_type=zstd option is then refused), giving
// qemu-img's reason.
func requireZstd(t testing.TB) {
	t.Helper()
	if why := zstdProbe(); why != "" {
		qemutest.Unavailable(t, "qemu-img cannot create zstd images: "+why)
	}
}
