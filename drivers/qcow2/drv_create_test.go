package qcow2_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
	"ublkimg/internal/qemutest"
)

// createOurs creates an image with bdrv.Create from a qemu-img style option
// string.
func createOurs(t testing.TB, path string, size int64, opts string) error {
	t.Helper()
	o, err := bdrv.ParseOptionString(opts)
	if err != nil {
		t.Fatal(err)
	}
	return coroutine.Run(func(co *coroutine.Co) error {
		return bdrv.Create(co, "qcow2", &bdrv.CreateRequest{Filename: path, Size: size, Options: o})
	})
}

// TestCreateMatchesQemu creates images with every create option set and
// compares them byte for byte with qemu-img create's.
func TestCreateMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	qimg(t, filepath.Join(dir, "base.qcow2"), "64M")
	type tc struct {
		opts string
		size string
		n    int64
	}
	cases := []tc{
		{"", "1G", 1 << 30},
		{"", "0", 0},
		{"", "1000", 1000},
		{"compat=0.10", "1G", 1 << 30},
		{"compat=v2", "100M", 100 << 20},
		{"compat=1.1", "100M", 100 << 20},
		{"cluster_size=512", "64M", 64 << 20},
		{"cluster_size=4k", "1G", 1 << 30},
		{"cluster_size=2M", "10G", 10 << 30},
		{"cluster_size=512,refcount_bits=64", "64M", 64 << 20},
		{"refcount_bits=1", "1G", 1 << 30},
		{"refcount_bits=8", "1G", 1 << 30},
		{"refcount_bits=32", "1G", 1 << 30},
		{"refcount_bits=64", "1G", 1 << 30},
		{"extended_l2=on", "1G", 1 << 30},
		{"extended_l2=on,cluster_size=16k", "1G", 1 << 30},
		{"lazy_refcounts=on", "1G", 1 << 30},
		{"compression_type=zstd", "1G", 1 << 30},
		{"compression_type=zlib", "1G", 1 << 30},
		{"backing_file=base.qcow2,backing_fmt=qcow2", "64M", 64 << 20},
		{"backing_file=base.qcow2,backing_fmt=qcow2,compat=0.10", "64M", 64 << 20},
		{"backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on,preallocation=metadata", "64M", 64 << 20},
		{"preallocation=metadata", "64M", 64 << 20},
		{"preallocation=metadata,cluster_size=4k", "16M", 16 << 20},
		{"preallocation=metadata,cluster_size=512", "3M", 3 << 20},
		{"preallocation=metadata,extended_l2=on", "64M", 64 << 20},
		{"preallocation=metadata,compat=0.10", "100M", 100 << 20},
		{"preallocation=metadata", "1000000", 1000000},
		{"preallocation=off", "1G", 1 << 30},
		{"data_file=DATA", "64M", 64 << 20},
		{"data_file=DATA,data_file_raw=on", "64M", 64 << 20},
		{"data_file=DATA,preallocation=metadata", "64M", 64 << 20},
		{"lazy_refcounts=on,refcount_bits=4,cluster_size=16k,compression_type=zstd,extended_l2=on", "3G", 3 << 30},
		{"preallocation=falloc", "64M", 64 << 20},
		{"preallocation=full", "8M", 8 << 20},
		{"preallocation=falloc,cluster_size=4k", "20M", 20 << 20},
		{"preallocation=falloc,extended_l2=on", "64M", 64 << 20},
		{"preallocation=metadata,cluster_size=512,refcount_bits=64", "3M", 3 << 20},
		{"preallocation=falloc,cluster_size=512,refcount_bits=64", "3M", 3 << 20},
		{"nocow=off", "1G", 1 << 30},
	}
	for _, c := range cases {
		name := strings.NewReplacer("/", "_", ",", "+", "=", "-").Replace(c.opts + "_" + c.size)
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			data := filepath.Join(t.TempDir(), "data.raw")
			opts := strings.ReplaceAll(c.opts, "DATA", data)
			// Both in dir, next to base.qcow2, under names of their own.
			q := filepath.Join(dir, name+".q.qcow2")
			o := filepath.Join(dir, name+".o.qcow2")
			args := []string{}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			qimg(t, q, c.size, args...)
			if err := createOurs(t, o, c.n, opts); err != nil {
				t.Fatal(err)
			}
			qb, _ := os.ReadFile(q)
			ob, _ := os.ReadFile(o)
			if len(qb) != len(ob) {
				t.Errorf("file size %d, qemu-img makes %d", len(ob), len(qb))
			}
			if i := firstDiff(ob, qb); i >= 0 {
				t.Errorf("bytes differ from qemu-img's from %#x (first 16: ours % x, qemu % x)", i,
					ob[i:min(i+16, len(ob))], qb[i:min(i+16, len(qb))])
			}
			qcheck(t, o, false)
		})
	}
}

// TestCreatePreallocData checks the falloc and full modes: the image checks
// clean, reads as zeros, and the data clusters are allocated in the file.
func TestCreatePreallocData(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, mode := range []string{"falloc", "full"} {
		t.Run(mode, func(t *testing.T) {
			o := filepath.Join(t.TempDir(), "o.qcow2")
			if err := createOurs(t, o, 8<<20, "preallocation="+mode); err != nil {
				t.Fatal(err)
			}
			qcheck(t, o, false)
			if b := rawOf(t, o); !bytes.Equal(b, make([]byte, 8<<20)) {
				t.Error("preallocated image does not read as zeros")
			}
			var st os.FileInfo
			st, _ = os.Stat(o)
			if st.Size() < 8<<20 {
				t.Errorf("file size %d too small for the data", st.Size())
			}
		})
	}
}

// TestCreateErrors checks option validation against qemu-img's messages.
func TestCreateErrors(t *testing.T) {
	cases := []struct{ opts, want string }{
		{"cluster_size=3000", "Cluster size must be a power of two between 512 and 2048k"},
		{"cluster_size=4M", "Cluster size must be a power of two between 512 and 2048k"},
		{"cluster_size=4k,extended_l2=on", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"},
		{"compat=0.10,lazy_refcounts=on", "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"compat=0.10,refcount_bits=8", "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"},
		{"refcount_bits=3", "Refcount width must be a power of two and may not exceed 64 bits"},
		{"refcount_bits=128", "Refcount width must be a power of two and may not exceed 64 bits"},
		{"compat=0.10,extended_l2=on", "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"compat=1.0", "Parameter 'version' does not accept value '1.0'"},
		{"compression_type=lz4", "Parameter 'compression-type' does not accept value 'lz4'"},
		{"compat=0.10,compression_type=zstd", "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"preallocation=metadata,backing_file=a,backing_fmt=qcow2", "Backing file and preallocation can only be used at the same time if extended_l2 is on"},
		{"data_file_raw=on", "data-file-raw requires data-file"},
		{"compat=0.10,data_file=x", "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"preallocation=foo", "Parameter 'preallocation' does not accept value 'foo'"},
		{"backing_fmt=raw", "Backing format cannot be used without backing file"},
		{"data_file=x,data_file_raw=on,backing_file=a,backing_fmt=raw", "Backing file and data-file-raw cannot be used at the same time"},
		{"bogus=1", "Invalid parameter 'bogus'"},
	}
	for _, c := range cases {
		err := createOurs(t, filepath.Join(t.TempDir(), "x.qcow2"), 1<<20, c.opts)
		if err == nil || err.Error() != c.want {
			t.Errorf("-o %s: error %v, want %q", c.opts, err, c.want)
		}
	}
}

// TestFormattingOptions checks the option list qemu-img prints.
func TestFormattingOptions(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, c := range []struct{ opts, size string }{
		{"", "1073741824"},
		{"cluster_size=4k,lazy_refcounts,compat=v3,extended_l2=yes", "1048576"},
		{"encryption=off,nocow=off", "1024"},
		{"compat=0.10,refcount_bits=016,preallocation=metadata", "1048576"},
		{"backing_file=a.qcow2,backing_fmt=qcow2,data_file=DATA,extended_l2=on,preallocation=falloc,compression_type=zstd", "1048576"},
	} {
		c.opts = strings.ReplaceAll(c.opts, "DATA", filepath.Join(t.TempDir(), "d.raw"))
		args := []string{"create", "-f", "qcow2", "-u"}
		if c.opts != "" {
			args = append(args, "-o", c.opts)
		}
		p := filepath.Join(t.TempDir(), "f.qcow2")
		out, _ := exec_(append(args, p, c.size)...)
		want := strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
		o, _ := bdrv.ParseOptionString(c.opts)
		size, _ := bdrv.ParseSize(c.size)
		got := "Formatting '" + p + "', fmt=qcow2 " + strings.Join(qcow2.FormattingOptions(size, o), " ")
		if got != want {
			t.Errorf("-o %s:\n got %s\nwant %s", c.opts, got, want)
		}
	}
}
