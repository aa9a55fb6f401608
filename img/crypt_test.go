package img

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestEncryptedConvertInfoCompare converts a raw image into a new LUKS
// qcow2 image (convert -o encrypt.*: the target opens with the key it was
// created with), then checks it with qemu-img: info (human and JSON, no
// key needed) prints what ours prints, check is clean, qemu-img compare
// given the secret finds the source; our compare and convert read it back
// through an --image-opts name.
func TestEncryptedConvertInfoCompare(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	const pass = "pass phrase"
	id, err := bdrv.AddSecretObject("secret,id=imgtest,data=" + pass)
	if err != nil {
		t.Fatal(err)
	}
	defer bdrv.RemoveSecret(id)
	src, dst, back := filepath.Join(dir, "src.raw"), filepath.Join(dir, "enc.qcow2"), filepath.Join(dir, "back.raw")
	data := make([]byte, 3<<20)
	rand.Read(data[:1<<20])
	rand.Read(data[2<<20 : 2<<20+12345])
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	opts := "driver=qcow2,file.filename=" + dst + ",encrypt.key-secret=" + id
	var infos []*ImageInfo
	var code int
	err = runCo(t, func(co *coroutine.Co) error {
		err := Convert(co, ConvertOptions{Sources: []string{src}, Target: dst, TargetFormat: "qcow2",
			Options:    bdrv.Options{"encrypt.format": "luks", "encrypt.key-secret": id, "encrypt.iter-time": "10"},
			SparseSize: DefaultSparseSize, Coroutines: DefaultCoroutines,
			SourceCache: bdrv.CacheWriteback, TargetCache: bdrv.CacheUnsafe})
		if err != nil {
			return err
		}
		if infos, err = Info(co, InfoOptions{Filename: dst}); err != nil {
			return err
		}
		if code, err = Compare(co, CompareOptions{Filename1: ImageOptsName(opts), Filename2: src}, nil); err != nil {
			return err
		}
		return Convert(co, ConvertOptions{Sources: []string{ImageOptsName(opts)}, Target: back, TargetFormat: "raw",
			SparseSize: DefaultSparseSize, Coroutines: DefaultCoroutines,
			SourceCache: bdrv.CacheWriteback, TargetCache: bdrv.CacheUnsafe})
	})
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 {
		t.Errorf("compare: exit %d, want 0", code)
	}
	if got, err := os.ReadFile(back); err != nil || !bytes.Equal(got, data) {
		t.Errorf("converting back: %v, or the content differs", err)
	}
	var human, js bytes.Buffer
	WriteInfoHuman(&human, infos)
	WriteInfoJSON(&js, infos, false)
	if want, _, _ := qemuImg(t, "info", dst); human.String() != want {
		t.Errorf("info:\n%s\nqemu-img:\n%s", human.String(), want)
	}
	if want, _, _ := qemuImg(t, "info", "--output=json", dst); js.String() != want {
		t.Errorf("info --output=json:\n%s\nqemu-img:\n%s", js.String(), want)
	}
	obj := "secret,id=k,data=" + pass
	qopts := "driver=qcow2,file.filename=" + dst + ",encrypt.key-secret=k"
	if out, errs, c := qemuImg(t, "check", "--object", obj, "--image-opts", qopts); c != 0 {
		t.Errorf("qemu-img check: exit %d\n%s%s", c, out, errs)
	}
	if out, errs, c := qemuImg(t, "compare", "--object", obj, "--image-opts", qopts, "driver=raw,file.filename="+src); c != 0 {
		t.Errorf("qemu-img compare: exit %d\n%s%s", c, out, errs)
	}
}

func TestParseImageOpts(t *testing.T) {
	for _, tc := range []struct {
		in, file, format, opts, err string
	}{
		{"driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=s0", "a.qcow2", "qcow2", "encrypt.key-secret=s0", ""},
		{"file.filename=a.img", "a.img", "", "", ""},
		{"driver=file,filename=a.img", "a.img", "file", "", ""},
		{"driver=raw,file.filename=a.img,offset=512", "a.img", "raw", "offset=512", ""},
		// "file" names a node, as the implied first item does.
		{"driver=raw,file=a.img,offset=512", "", "", "", "Cannot find device='a.img' nor node-name='a.img'"},
		{"a.img,driver=raw", "", "", "", "Cannot find device='a.img' nor node-name='a.img'"},
		{"driver=file", "", "", "", "The 'file' block driver requires a file name"},
		{"file.locking=off", "", "", "", "Must specify either driver or file"},
		{"driver=qcow2", "", "", "", `A block device must be specified for "file"`},
		{"driver=qcow2,file.driver=nbd,file.filename=x", "", "", "", "Unknown protocol driver 'nbd'"},
	} {
		file, format, opts, err := ParseImageOpts(tc.in)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%s: error %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		want, _ := bdrv.ParseOptionString(tc.opts)
		if err != nil || file != tc.file || format != tc.format || len(opts) != len(want) || opts.String("encrypt.key-secret", "") != want.String("encrypt.key-secret", "") || opts.String("offset", "") != want.String("offset", "") {
			t.Errorf("%s: %q %q %v %v, want %q %q %v", tc.in, file, format, opts, err, tc.file, tc.format, want)
		}
	}
}
