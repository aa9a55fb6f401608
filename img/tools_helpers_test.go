package img

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Helpers of the tests of check, map, resize, commit, rebase, measure and
// dd: images are made by qemu-img and qemu-io in a directory, each tool
// runs there with relative names (as a user would type them), and results
// are compared with qemu-img 7.2's.

// shell runs a bash script in dir (qemu-img create, qemu-io, cp, ...),
// failing the test if it fails.
func shell(t *testing.T, dir, script string) {
	t.Helper()
	cmd := exec.Command("bash", "-e", "-c", script)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}
}

// qemuIn runs qemu-img in dir: stdout, stderr without the "qemu-img: "
// prefixes and the probing warning, and the exit status.
func qemuIn(t *testing.T, dir string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("qemu-img", args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img %v: %v", args, err)
	}
	return out.String(), qemuStderr(errb.String()), code
}

// qemuStderr keeps the lines of qemu-img's stderr that ublkimg reproduces:
// without "qemu-img: " prefixes, the raw probing warning, the "Try
// 'qemu-img --help'" hint and "warning:" lines.
func qemuStderr(s string) string {
	var b strings.Builder
	for _, l := range lines(s) {
		switch {
		case l == "", strings.HasPrefix(l, "WARNING: "), strings.HasPrefix(l, "         "),
			strings.HasPrefix(l, "Try 'qemu-img --help'"), strings.HasPrefix(l, "qemu-img: warning: "):
			continue
		}
		b.WriteString(strings.TrimPrefix(l, "qemu-img: ") + "\n")
	}
	return b.String()
}

// twin copies every file of src into two new directories, one for
// ublkimg and one for qemu-img, so that both tools change equal images.
func twin(t *testing.T, src string) (ours, theirs string) {
	t.Helper()
	ours, theirs = t.TempDir(), t.TempDir()
	shell(t, src, "cp -a --sparse=always . "+ours+" && cp -a --sparse=always . "+theirs)
	return ours, theirs
}

// qemuMap is qemu-img map --output=json of an image, without host
// offsets (which depend on allocation order, not on what is mapped), with
// the extents that then look alike merged.
func qemuMap(t *testing.T, dir, name string) string {
	t.Helper()
	out, errs, code := qemuIn(t, dir, "map", "--output=json", "-U", name)
	if code != 0 {
		t.Fatalf("qemu-img map %s: %s", name, errs)
	}
	type extent struct {
		start, length int64
		rest          string
	}
	var exts []extent
	for _, l := range lines(strings.Trim(out, "[]\n")) {
		l = strings.Trim(l, "[],")
		var e extent
		if _, err := fmt.Sscanf(l, `{ "start": %d, "length": %d,`, &e.start, &e.length); err != nil {
			t.Fatalf("qemu-img map line %q: %v", l, err)
		}
		e.rest = l[strings.Index(l, `"depth"`):]
		if i := strings.Index(e.rest, `, "offset": `); i >= 0 {
			e.rest = e.rest[:i]
		}
		e.rest = strings.TrimSuffix(e.rest, "}")
		if k := len(exts) - 1; k >= 0 && exts[k].rest == e.rest && exts[k].start+exts[k].length == e.start {
			exts[k].length += e.length
			continue
		}
		exts = append(exts, e)
	}
	var b strings.Builder
	for _, e := range exts {
		fmt.Fprintf(&b, "%d+%d %s\n", e.start, e.length, e.rest)
	}
	return b.String()
}

// sameContent checks with qemu-img compare that two images read alike.
func sameContent(t *testing.T, a, b string) {
	t.Helper()
	out, errs, code := qemuIn(t, "/", "compare", "-U", a, b)
	if code != 0 {
		t.Errorf("qemu-img compare %s %s: %s%s", a, b, out, errs)
	}
}

// checkClean checks with qemu-img check that a qcow2 image is consistent.
func checkClean(t *testing.T, path string) {
	t.Helper()
	out, errs, code := qemuIn(t, "/", "check", "-U", path)
	if code != 0 {
		t.Errorf("qemu-img check %s: exit %d\n%s%s", path, code, out, errs)
	}
}

// pokeRefcount sets the 16-bit refcount of a cluster in the first
// refcount block of a qcow2 image with default geometry (64 KiB clusters,
// refcount block at 0x20000, as qemu-img create lays it out).
func pokeRefcount(t *testing.T, path string, cluster int, v uint16) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	if _, err := f.WriteAt(b[:], 0x20000+int64(cluster)*2); err != nil {
		t.Fatal(err)
	}
}

// readHeader returns the first n bytes of a file.
func readHeader(t *testing.T, path string, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// addUnknownExtension inserts a header extension qcow2 does not define
// before the end marker of a qcow2 image without backing file, as
// iotest 031 does with its qcow2 script (add-header-ext).
func addUnknownExtension(t *testing.T, path string, typ uint32, data []byte) {
	t.Helper()
	h := readHeader(t, path, 65536)
	off := 72 // version 2
	if binary.BigEndian.Uint32(h[4:]) >= 3 {
		off = int(binary.BigEndian.Uint32(h[100:])) // header_length
	}
	for binary.BigEndian.Uint32(h[off:]) != 0 {
		off += 8 + (int(binary.BigEndian.Uint32(h[off+4:]))+7)&^7
	}
	ext := make([]byte, 8+(len(data)+7)&^7+8)
	binary.BigEndian.PutUint32(ext, typ)
	binary.BigEndian.PutUint32(ext[4:], uint32(len(data)))
	copy(ext[8:], data)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(ext, int64(off)); err != nil {
		t.Fatal(err)
	}
}
