package file

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/raw"
)

// TestMappedRange: on tmpfs the driver hands out the file's data as
// mapped memory, the bytes the file holds (also after writes through the
// node and by another descriptor), never a hole (which the mapping would
// fill with memory: the file's allocated blocks do not grow), nothing past
// the end after a shrink nor where a discard punched a hole; raw passes it
// through at its offset. On the disk's file system there is none.
func TestMappedRange(t *testing.T) {
	dirs := storageDirs(t)
	l := startLoops(t, 1)[0]
	const size = 1 << 20
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i*13 + i>>12)
	}
	// Data in [0, 256K) and [512K, 768K); holes elsewhere.
	mkImage := func(t *testing.T, dir string) string {
		path := filepath.Join(dir, "img")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		for _, r := range [][2]int{{0, 256 << 10}, {512 << 10, 768 << 10}} {
			if _, err := f.WriteAt(data[r[0]:r[1]], int64(r[0])); err != nil {
				t.Fatal(err)
			}
		}
		return path
	}
	blocks := func(t *testing.T, path string) int64 {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks
	}

	t.Run("disk", func(t *testing.T) {
		node := openFile(t, l, mkImage(t, dirs["ring"]))
		if node.Mappable() || node.MappedRange(0, 4096) != nil {
			t.Errorf("a file on the disk's file system is mapped")
		}
	})

	t.Run("tmpfs", func(t *testing.T) {
		path := mkImage(t, dirs["inline"])
		node := openFile(t, l, path)
		if !node.Mappable() {
			t.Error("a file in tmpfs is not mappable")
		}
		before := blocks(t, path)
		for _, c := range []struct {
			off, n int64
			mapped bool
		}{
			{0, 4096, true},
			{4096, 128 << 10, true},
			{512<<10 + 512, 1024, true},
			{256 << 10, 4096, false},           // a hole
			{252 << 10, 8192, false},           // data, then a hole
			{768<<10 - 4096, 4096, true},       // the extent's last page
			{size - 4096, 8192, false},         // past the end
			{-4096, 4096, false},               // before the start
			{768 << 10, size - 768<<10, false}, // the last hole, to the end
		} {
			b := node.MappedRange(c.off, c.n)
			if (b != nil) != c.mapped {
				t.Errorf("MappedRange(%d, %d): mapped %v, want %v", c.off, c.n, b != nil, c.mapped)
				continue
			}
			if b != nil && !bytes.Equal(b, data[c.off:c.off+c.n]) {
				t.Errorf("MappedRange(%d, %d) differs from the file", c.off, c.n)
			}
		}
		if after := blocks(t, path); after != before {
			t.Errorf("allocated blocks went from %d to %d", before, after)
		}

		// Another writer's bytes show at once: the mapping is the page
		// cache.
		other := bytes.Repeat([]byte{0xa5}, 4096)
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.WriteAt(other, 8192)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if b := node.MappedRange(8192, 4096); !bytes.Equal(b, other) {
			t.Error("a write by another descriptor does not show in the mapping")
		}

		err = l.Call(func(co *coroutine.Co) error {
			// A write through the node fills a hole, which then maps.
			w := bytes.Repeat([]byte{0x5a}, 8192)
			if err := node.Pwritev(co, 300<<10, bdrv.IOVec{w}, 0); err != nil {
				return err
			}
			if b := node.MappedRange(300<<10, 8192); !bytes.Equal(b, w) {
				t.Error("written hole: not mapped, or other bytes")
			}
			// A discard punches a hole: no longer handed out.
			if err := node.Pdiscard(co, 0, 64<<10); err != nil {
				return err
			}
			if b := node.MappedRange(0, 4096); b != nil {
				t.Error("discarded range still mapped")
			}
			if b := node.MappedRange(64<<10, 4096); !bytes.Equal(b, data[64<<10:68<<10]) {
				t.Error("data after the discarded range: not mapped, or other bytes")
			}
			// A shrink: nothing past the new end, the rest as before.
			if err := node.Truncate(co, 600<<10, true, bdrv.PreallocOff); err != nil {
				return err
			}
			if b := node.MappedRange(600<<10, 4096); b != nil {
				t.Error("range past the new end mapped")
			}
			if b := node.MappedRange(596<<10, 4096); !bytes.Equal(b, data[596<<10:600<<10]) {
				t.Error("last page before the new end: not mapped, or other bytes")
			}
			// Growing again leaves a hole where the data was.
			if err := node.Truncate(co, size, true, bdrv.PreallocOff); err != nil {
				return err
			}
			if b := node.MappedRange(700<<10, 4096); b != nil {
				t.Error("the hole left by shrinking and growing is mapped")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("raw", func(t *testing.T) {
		path := mkImage(t, dirs["inline"])
		var node *bdrv.Node
		err := l.Call(func(co *coroutine.Co) error {
			var err error
			node, err = bdrv.Open(co, bdrv.Spec{Filename: path, Format: "raw",
				Options: bdrv.Options{"offset": "524288", "size": "131072"}})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Call(func(co *coroutine.Co) error { return node.Close(co) })
		if !node.Mappable() {
			t.Error("raw over a file in tmpfs is not mappable")
		}
		if b := node.MappedRange(4096, 4096); !bytes.Equal(b, data[516<<10:520<<10]) {
			t.Error("raw with an offset: not mapped, or other bytes")
		}
		if b := node.MappedRange(124<<10, 8192); b != nil {
			t.Error("raw: a range past the window's end is mapped")
		}
	})
}
