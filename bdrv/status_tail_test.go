package bdrv_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/raw"
)

// TestBlockStatusLastSector asks a raw node whose length is not a whole
// number of sectors for the status past its exact end. As in QEMU (whose
// lengths are whole sectors; qemu-img map of a 1000-byte raw file shows
// data up to 1000 and a zero extent at offset 1000 up to 1024), the node
// answers zeros at the file's offset up to the end of its last sector, and
// nothing after; a window of a longer file reads zeros there too.
func TestBlockStatusLastSector(t *testing.T) {
	const want = bdrv.StatusZero | bdrv.StatusAllocated | bdrv.StatusOffsetValid | bdrv.StatusEOF
	for _, tc := range []struct {
		name     string
		fileSize int
		opts     bdrv.Options
	}{
		{"file of 1000 bytes", 1000, nil},
		{"window of 1000 bytes", 4096, bdrv.Options{"size": "1000"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "a.raw")
			if err := os.WriteFile(path, bytes.Repeat([]byte{'A'}, tc.fileSize), 0o644); err != nil {
				t.Fatal(err)
			}
			err := coroutine.Run(func(co *coroutine.Co) error {
				n, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "raw", Options: tc.opts})
				if err != nil {
					return err
				}
				defer n.Close(co)
				st, err := n.BlockStatus(co, true, 0, 1024)
				if err != nil {
					return err
				}
				if st.Flags&bdrv.StatusData == 0 || st.Pnum != 1000 {
					t.Errorf("[0, 1024): flags %#x, pnum %d; want data for 1000 bytes", st.Flags, st.Pnum)
				}
				st, err = n.BlockStatus(co, true, 1000, 100)
				if err != nil {
					return err
				}
				if st.Flags != want || st.Pnum != 24 || st.Map != 1000 || st.File == nil {
					t.Errorf("[1000, 1100): flags %#x, pnum %d, map %d, file %v; want flags %#x, pnum 24, map 1000 in the file",
						st.Flags, st.Pnum, st.Map, st.File, want)
				}
				st, err = n.BlockStatus(co, true, 1024, 1)
				if err != nil {
					return err
				}
				if st.Pnum != 0 || st.Flags != bdrv.StatusEOF {
					t.Errorf("[1024, 1025): flags %#x, pnum %d; want EOF", st.Flags, st.Pnum)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}
