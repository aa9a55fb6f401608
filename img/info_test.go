package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

func TestSizeToStr(t *testing.T) {
	// Expected strings are qemu-img 7.2's "virtual size" for files of
	// these sizes; the last rows have no 512-byte multiple to check with
	// qemu-img and follow size_to_str's arithmetic.
	for _, tc := range []struct {
		n    uint64
		want string
	}{
		{0, "0 B"}, {512, "512 B"}, {1024, "1 KiB"}, {1536, "1.5 KiB"}, {4096, "4 KiB"},
		{102400, "100 KiB"}, {512000, "500 KiB"}, {999424, "976 KiB"}, {1048064, "1 MiB"},
		{1048576, "1 MiB"}, {1572864, "1.5 MiB"}, {1047527424, "999 MiB"},
		{1048576000, "0.977 GiB"}, {1073741824, "1 GiB"}, {1610612736, "1.5 GiB"},
		{10737418240, "10 GiB"}, {107374182400, "100 GiB"}, {1099511627776, "1 TiB"},
		{999, "999 B"}, {1000, "0.977 KiB"}, {1 << 60, "1 EiB"}, {1<<63 - 1, "8 EiB"},
	} {
		if got := SizeToStr(tc.n); got != tc.want {
			t.Errorf("SizeToStr(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

func TestDictKeyOrder(t *testing.T) {
	// The order qemu-img 7.2 prints these QAPI members in (qemu-img info
	// --output json of a qcow2 image with a backing file), whatever the
	// insertion order.
	want := []string{"backing-filename-format", "virtual-size", "filename", "cluster-size",
		"format", "actual-size", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"}
	d := NewDict()
	for _, k := range []string{"filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
		"backing-filename", "full-backing-filename", "backing-filename-format", "format-specific"} {
		d.Set(k, 1)
	}
	if got := d.Keys(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("Keys() = %v\nwant     %v", got, want)
	}
	data := NewDict()
	for _, k := range []string{"compat", "lazy-refcounts", "corrupt", "refcount-bits", "extended-l2", "compression-type"} {
		data.Set(k, 1)
	}
	want = []string{"compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"}
	if got := data.Keys(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("Keys() = %v\nwant     %v", got, want)
	}
}

// qcow2Specific stands for a format driver's InfoProvider data: a struct
// with QAPI member names in json tags.
type qcow2Specific struct {
	Compat          string `json:"compat"`
	DataFile        string `json:"data-file,omitempty"`
	LazyRefcounts   bool   `json:"lazy-refcounts"`
	RefcountBits    int    `json:"refcount-bits"`
	Corrupt         bool   `json:"corrupt"`
	ExtendedL2      bool   `json:"extended-l2"`
	CompressionType string `json:"compression-type"`
	Bitmaps         []struct {
		Name  string   `json:"name"`
		Flags []string `json:"flags"`
	} `json:"bitmaps,omitempty"`
}

func TestFormatSpecificOutput(t *testing.T) {
	// Human and JSON renderings of format-specific data as qemu-img 7.2
	// prints them for a fresh qcow2 image.
	info := &ImageInfo{
		Filename: "b.qcow2", Format: "qcow2", VirtualSize: 1 << 30, ActualSize: 200704,
		ClusterSize: 65536, BackingFilename: "a.raw", FullBackingFilename: "a.raw", BackingFormat: "raw",
		FormatSpecific: ToQObject(qcow2Specific{Compat: "1.1", RefcountBits: 16, CompressionType: "zlib"}),
	}
	var human, js bytes.Buffer
	if err := WriteInfoHuman(&human, []*ImageInfo{info}); err != nil {
		t.Fatal(err)
	}
	wantHuman := `image: b.qcow2
file format: qcow2
virtual size: 1 GiB (1073741824 bytes)
disk size: 196 KiB
cluster_size: 65536
backing file: a.raw
backing file format: raw
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
`
	if human.String() != wantHuman {
		t.Errorf("human output:\n%s\nwant:\n%s", human.String(), wantHuman)
	}
	if err := WriteInfoJSON(&js, []*ImageInfo{info}, false); err != nil {
		t.Fatal(err)
	}
	wantJSON := `{
    "backing-filename-format": "raw",
    "virtual-size": 1073741824,
    "filename": "b.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "a.raw",
    "backing-filename": "a.raw",
    "dirty-flag": false
}
`
	if js.String() != wantJSON {
		t.Errorf("JSON output:\n%s\nwant:\n%s", js.String(), wantJSON)
	}
}

func TestInfoMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		im   image
	}{
		{"sparse.raw", image{size: 1 << 30}},
		{"full.raw", image{size: 1 << 20, extents: [][2]int64{{0, 1 << 20}}}},
		{"holes.raw", image{size: 64 << 20, extents: [][2]int64{{0, 4096}, {1 << 20, 3 << 20}, {40 << 20, 65536}}}},
		{"odd-size.raw", image{size: 1000, extents: [][2]int64{{0, 1000}}}},
		{"empty.raw", image{size: 0}},
		{"w\u00e9\"ird\tname.raw", image{size: 1536, extents: [][2]int64{{512, 512}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, _ := tc.im.make(t, dir, tc.name)
			for _, chain := range []bool{false, true} {
				var infos []*ImageInfo
				err := runCo(t, func(co *coroutine.Co) error {
					var err error
					infos, err = Info(co, InfoOptions{Filename: path, BackingChain: chain})
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
				args := []string{"info"}
				if chain {
					args = append(args, "--backing-chain")
				}
				var human, js bytes.Buffer
				WriteInfoHuman(&human, infos)
				WriteInfoJSON(&js, infos, chain)
				want, _, _ := qemuImg(t, append(args, path)...)
				if human.String() != want {
					t.Errorf("info %v:\n%s\nqemu-img:\n%s", args, human.String(), want)
				}
				want, _, _ = qemuImg(t, append(args, "--output=json", path)...)
				if js.String() != want {
					t.Errorf("info --output=json %v:\n%s\nqemu-img:\n%s", args, js.String(), want)
				}
			}
		})
	}
}

func TestInfoErrors(t *testing.T) {
	dir := t.TempDir()
	path, _ := image{size: 4096}.make(t, dir, "a.raw")
	for _, tc := range []struct {
		opts InfoOptions
		want string
	}{
		{InfoOptions{Filename: filepath.Join(dir, "missing")}, "Could not open '" + filepath.Join(dir, "missing") + "': No such file or directory"},
		{InfoOptions{Filename: path, Format: "bogus"}, "Could not open '" + path + "': Unknown driver 'bogus'"},
	} {
		err := runCo(t, func(co *coroutine.Co) error {
			_, err := Info(co, tc.opts)
			return err
		})
		if err == nil || err.Error() != tc.want {
			t.Errorf("Info(%+v) = %v, want %q", tc.opts, err, tc.want)
		}
	}
}

func TestPathCombine(t *testing.T) {
	for _, tc := range []struct{ base, name, want string }{
		{"b.qcow2", "a.raw", "a.raw"},
		{"/tmp/q/b.qcow2", "a.raw", "/tmp/q/a.raw"},
		{"dir/b.qcow2", "../a.raw", "dir/../a.raw"},
		{"dir/b.qcow2", "/abs/a.raw", "/abs/a.raw"},
		{"dir/b.qcow2", "nbd://host/x", "nbd://host/x"},
	} {
		if got := pathCombine(tc.base, tc.name); got != tc.want {
			t.Errorf("pathCombine(%q, %q) = %q, want %q", tc.base, tc.name, got, tc.want)
		}
	}
}

func TestJSONStringEscapes(t *testing.T) {
	var b strings.Builder
	writeJSONString(&b, "a\"b\\c/\b\f\n\r\t\x01é😀\x7f")
	want := `"a\"b\\c/\b\f\n\r\t\u0001\u00E9\uD83D\uDE00\u007F"`
	if b.String() != want {
		t.Errorf("got %s, want %s", b.String(), want)
	}
}
