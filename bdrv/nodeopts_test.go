package bdrv_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
)

// TestNodeOptions: the common options apply per node as in QEMU: those at
// the top to the format node, "file." ones to its file, which inherits the
// top's read-only and cache properties (but not write-through, which is
// the top's) unless it has its own; discard defaults to unmap below the
// top; values are checked in QEMU's words.
func TestNodeOptions(t *testing.T) {
	path, _ := makeFile(t, 64<<10)
	type node struct {
		readOnly bool
		cache    bdrv.CacheMode
		unmap    bool
		zeroes   bdrv.DetectZeroes
	}
	for _, tc := range []struct {
		spec      bdrv.Spec
		opts      string
		top, file node
		err       string
	}{
		{spec: bdrv.Spec{}, top: node{unmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{NoUnmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{NoUnmap: true}, opts: "discard=unmap", top: node{unmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{}, opts: "discard=ignore", file: node{unmap: true}},
		{spec: bdrv.Spec{}, opts: "file.discard=off", top: node{unmap: true}},
		{spec: bdrv.Spec{ReadOnly: true}, opts: "read-only=off", top: node{unmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{}, opts: "read-only=on", top: node{readOnly: true, unmap: true}, file: node{readOnly: true, unmap: true}},
		{spec: bdrv.Spec{}, opts: "read-only=on,file.read-only=off", top: node{readOnly: true, unmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{}, opts: "file.read-only=on", err: "Block node is read-only"},
		// raw writes its file only for its user, who only reads here.
		{spec: bdrv.Spec{ReadOnly: true}, opts: "read-only=off,file.read-only=on", top: node{unmap: true}, file: node{readOnly: true, unmap: true}},
		{spec: bdrv.Spec{Cache: bdrv.CacheNone}, opts: "cache.direct=off", top: node{unmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{Cache: bdrv.CacheNone}, opts: "file.cache.direct=off",
			top: node{cache: bdrv.CacheNone, unmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{Cache: bdrv.CacheWritethrough}, opts: "cache.direct=on",
			top: node{cache: bdrv.CacheDirectsync, unmap: true}, file: node{cache: bdrv.CacheNone, unmap: true}},
		{spec: bdrv.Spec{Cache: bdrv.CacheWriteback}, opts: "cache.no-flush=on",
			top: node{cache: bdrv.CacheUnsafe, unmap: true}, file: node{cache: bdrv.CacheUnsafe, unmap: true}},
		{spec: bdrv.Spec{Cache: bdrv.CacheUnsafe}, opts: "file.cache.no-flush=off", top: node{cache: bdrv.CacheUnsafe, unmap: true}, file: node{unmap: true}},
		{spec: bdrv.Spec{}, opts: "detect-zeroes=on", top: node{unmap: true, zeroes: bdrv.DetectZeroesOn}, file: node{unmap: true}},
		{spec: bdrv.Spec{}, opts: "file.detect-zeroes=unmap", top: node{unmap: true}, file: node{unmap: true, zeroes: bdrv.DetectZeroesUnmap}},
		{spec: bdrv.Spec{NoUnmap: true}, opts: "detect-zeroes=unmap",
			err: "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"},
		{spec: bdrv.Spec{}, opts: "discard=maybe", err: "Invalid discard option"},
		{spec: bdrv.Spec{}, opts: "detect-zeroes=yes", err: "invalid parameter value: yes"},
		{spec: bdrv.Spec{}, opts: "cache.direct=2", err: "Parameter 'cache.direct' expects 'on' or 'off'"},
		{spec: bdrv.Spec{}, opts: "force-share=on", err: "force-share=on can only be used with read-only images"},
		{spec: bdrv.Spec{}, opts: "node-name=9", err: "Invalid node-name: '9'"},
		{spec: bdrv.Spec{}, opts: "node-name=x,file.node-name=x", err: "Duplicate nodes with node-name='x'"},
		{spec: bdrv.Spec{}, opts: "file.locking=maybe", err: "invalid parameter value: maybe"},
	} {
		t.Run(fmt.Sprintf("%+v %s", tc.spec, tc.opts), func(t *testing.T) {
			opts, err := bdrv.ParseOptionString(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			spec := tc.spec
			spec.Filename, spec.Format, spec.Options, spec.CheckOptions = path, "raw", opts, true
			err = coroutine.Run(func(co *coroutine.Co) error {
				n, err := bdrv.Open(co, spec)
				if err != nil {
					return err
				}
				defer n.Close(co)
				got := func(n *bdrv.Node) node { return node{n.ReadOnly, n.Cache, n.Unmap, n.DetectZeroes} }
				if top, file := got(n), got(n.File); top != tc.top || file != tc.file {
					return fmt.Errorf("format node %+v, file %+v\nwant %+v, %+v", top, file, tc.top, tc.file)
				}
				// O_DIRECT: the file's requests are aligned to
				// the device's blocks.
				if al := n.File.Limits().RequestAlignment; (al > 1) != tc.file.cache.Direct() {
					return fmt.Errorf("file request alignment %d, cache %v", al, n.File.Cache)
				}
				return nil
			})
			switch {
			case tc.err == "" && err != nil:
				t.Fatal(err)
			case tc.err != "" && (err == nil || !strings.HasSuffix(err.Error(), tc.err)):
				t.Fatalf("error %v, want %q", err, tc.err)
			}
			if tc.err == "Block node is read-only" && !errors.Is(err, bdrv.ErrReadOnlyNode) {
				t.Errorf("%v does not match ErrReadOnlyNode", err)
			}
		})
	}
}

// TestDiscardAndDetectZeroes: discard=ignore makes discards no-ops on its
// node (the file's discard=ignore also keeps the write-zeroes of the
// format above from deallocating, as QEMU's bdrv_co_pwrite_zeroes does
// for a child); detect-zeroes turns writes of zeros into write-zeroes,
// which deallocate with detect-zeroes=unmap.
func TestDiscardAndDetectZeroes(t *testing.T) {
	const size, off, n = 1 << 20, 256 << 10, 256 << 10
	for _, tc := range []struct {
		opts  string
		op    string // discard, zeroes (write-zeroes that may unmap), write (of zeros)
		freed bool
	}{
		{"", "discard", true},
		{"discard=ignore", "discard", false},
		{"file.discard=ignore", "discard", false},
		{"", "zeroes", true},
		{"discard=ignore", "zeroes", true}, // the top's caller decides
		{"file.discard=ignore", "zeroes", false},
		{"", "write", false},
		{"detect-zeroes=on", "write", false},
		{"detect-zeroes=unmap", "write", true},
		{"file.detect-zeroes=unmap", "write", true},
		{"detect-zeroes=unmap,file.discard=ignore", "write", false},
	} {
		t.Run(tc.opts+" "+tc.op, func(t *testing.T) {
			path, data := makeFile(t, size)
			opts, err := bdrv.ParseOptionString(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			before := allocated(t, path)
			bdrvtest.WithNode(t, bdrv.Spec{Filename: path, Format: "raw", Options: opts}, func(co *coroutine.Co, nd *bdrv.Node) error {
				switch tc.op {
				case "discard":
					return nd.Pdiscard(co, off, n)
				case "zeroes":
					return nd.PwriteZeroes(co, off, n, bdrv.ReqMayUnmap)
				}
				return nd.Pwritev(co, off, bdrv.IOVec{make([]byte, n)}, 0)
			})
			freed := allocated(t, path) <= before-n
			if freed != tc.freed {
				t.Errorf("allocated %d -> %d bytes: freed %v, want %v", before, allocated(t, path), freed, tc.freed)
			}
			got, _ := os.ReadFile(path)
			want := bytes.Clone(data)
			if tc.op != "discard" || freed {
				clear(want[off : off+n])
			}
			if !bytes.Equal(got, want) {
				t.Error("file content differs from what was written")
			}
		})
	}
}

// allocated is the host space path uses.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}
