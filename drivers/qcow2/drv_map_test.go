package qcow2_test

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// mapEntry is one extent of qemu-img map --output=json.
type mapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
	file    *bdrv.Node
}

// ourMap builds the extent list the way qemu-img map does (img_map,
// get_block_status, entry_mergeable) from each layer's block status: the
// first layer in the chain that reports data or zeros answers.
func ourMap(co *coroutine.Co, n *bdrv.Node) ([]mapEntry, error) {
	var out []mapEntry
	size := n.Length()
	for off := int64(0); off < size; {
		var st bdrv.Status
		depth := 0
		bytes := size - off
		for l := n; ; depth++ {
			var err error
			if st, err = l.BlockStatus(co, true, off, bytes); err != nil {
				return nil, err
			}
			if st.Pnum <= 0 {
				return nil, fmt.Errorf("no progress at %#x", off)
			}
			bytes = st.Pnum
			if st.Flags&(bdrv.StatusData|bdrv.StatusZero) != 0 || l.Backing == nil {
				break
			}
			l = l.Backing
		}
		st.Depth = depth
		e := mapEntry{Start: off, Length: st.Pnum, Depth: st.Depth,
			Present: st.Flags&bdrv.StatusAllocated != 0, Zero: st.Flags&bdrv.StatusZero != 0,
			Data: st.Flags&bdrv.StatusData != 0}
		if st.Flags&bdrv.StatusOffsetValid != 0 {
			m := st.Map
			e.Offset, e.file = &m, st.File
		}
		if k := len(out); k > 0 {
			p := &out[k-1]
			if p.Depth == e.Depth && p.Present == e.Present && p.Zero == e.Zero && p.Data == e.Data &&
				(p.Offset == nil) == (e.Offset == nil) && p.file == e.file &&
				(p.Offset == nil || *p.Offset+p.Length == *e.Offset) {
				p.Length += e.Length
				off += st.Pnum
				continue
			}
		}
		out = append(out, e)
		off += st.Pnum
	}
	return out, nil
}

// TestBlockStatusMatchesQemuMap compares the extents block status reports
// with qemu-img map's for images with every kind of cluster.
func TestBlockStatusMatchesQemuMap(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	writeRaw(t, filepath.Join(dir, "base.raw"), pattern(9, 4<<20))
	mixed := append([]string{"write -c -P 0x88 2m 128k"}, mixedWrites...)
	cases := []struct {
		name string
		args []string
		cmds []string
	}{
		{"plain", nil, mixed},
		{"v2", []string{"-o", "compat=0.10"}, mixedWrites},
		{"extl2", []string{"-o", "extended_l2=on"}, append(mixed, "write -P 3 3m 3k", "write -z 3100k 2k")},
		{"backed", []string{"-b", "base.raw", "-F", "raw"}, mixedWrites},
		{"backed_extl2", []string{"-b", "base.raw", "-F", "raw", "-o", "extended_l2=on"}, append(mixedWrites, "write -P 3 3m 3k")},
		{"prealloc", []string{"-o", "preallocation=metadata"}, mixedWrites},
		{"data_file", []string{"-o", "data_file=" + filepath.Join(dir, "df.raw")}, mixedWrites},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := qimg(t, filepath.Join(dir, c.name+".qcow2"), "4M", c.args...)
			qio(t, p, c.cmds...)
			// Settle the file's extents first: ext4 may turn the zeroed
			// (unwritten) parts of clusters into written extents at
			// writeback, which changes what SEEK_HOLE reports.
			sh(t, "sync", p)
			var want []mapEntry
			if err := json.Unmarshal([]byte(sh(t, "qemu-img", "map", "--output=json", p)), &want); err != nil {
				t.Fatal(err)
			}
			bdrvtest.WithNode(t, bdrv.Spec{Filename: p, ReadOnly: true}, func(co *coroutine.Co, n *bdrv.Node) error {
				got, err := ourMap(co, n)
				if err != nil {
					return err
				}
				for i := range got {
					got[i].file = nil
				}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("map differs\n got %s\nwant %s", dump(got), dump(want))
				}
				return nil
			})
		})
	}
}

func dump(m []mapEntry) string {
	s := ""
	for _, e := range m {
		off := "-"
		if e.Offset != nil {
			off = fmt.Sprintf("%#x", *e.Offset)
		}
		s += fmt.Sprintf("\n  [%#x+%#x d%d p%v z%v D%v %s]", e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data, off)
	}
	return s
}
