package vmtest

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// cpioWriter writes a "newc" (SVR4, no CRC) cpio archive, the format the
// kernel unpacks into the initial rootfs (Documentation/driver-api/
// early-userspace/buffer-format.rst). Every header and every name or data
// field is padded to a multiple of 4 bytes.
type cpioWriter struct {
	w     io.Writer
	n     int64 // bytes written so far, for padding
	ino   uint32
	err   error
	dirty map[string]bool // directories already written
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1, dirty: map[string]bool{"": true, ".": true, "/": true}}
}

func (c *cpioWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// header writes one entry header and its name. Names are stored without a
// leading slash, as the kernel's own gen_init_cpio does.
func (c *cpioWriter) header(name string, mode uint32, size int64) {
	name = strings.TrimPrefix(name, "/")
	c.ino++
	nlink := 1
	if mode&cpioModeType == cpioModeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad()
}

// File type bits as stored in c_mode (they match the kernel's S_IF*).
const (
	cpioModeType    = 0o170000
	cpioModeDir     = 0o040000
	cpioModeFile    = 0o100000
	cpioModeSymlink = 0o120000
)

// mkdirAll writes directory entries for every missing parent of name.
func (c *cpioWriter) mkdirAll(name string) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if c.dirty[name] {
		return
	}
	c.mkdirAll(path.Dir(name))
	c.header(name, cpioModeDir|0o755, 0)
	c.dirty[name] = true
}

// File adds a regular file with the given permission bits.
func (c *cpioWriter) File(name string, perm fs.FileMode, data []byte) {
	c.mkdirAll(path.Dir(name))
	c.header(name, cpioModeFile|uint32(perm.Perm()), int64(len(data)))
	c.write(data)
	c.pad()
}

// Symlink adds a symbolic link name pointing at target.
func (c *cpioWriter) Symlink(name, target string) {
	c.mkdirAll(path.Dir(name))
	c.header(name, cpioModeSymlink|0o777, int64(len(target)))
	c.write([]byte(target))
	c.pad()
}

// Dir adds an empty directory (and its parents).
func (c *cpioWriter) Dir(name string) { c.mkdirAll(name) }

// Close writes the trailer and pads the archive to 512 bytes so that another
// archive may be appended to it: the kernel accepts concatenated archives and
// skips the zero padding between them.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0)
	if r := c.n % 512; r != 0 {
		c.write(make([]byte, 512-r))
	}
	return c.err
}
