package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/img"
	"ublkimg/internal/qemutest"
	"ublkimg/ublk"
)

const recoverImages = `
printf 'correct horse' > pw
pbkdf2_retry qemu-img create -q -f qcow2 --object secret,id=rs0,file=pw -o encrypt.format=luks,encrypt.key-secret=rs0,encrypt.iter-time=10,cluster_size=4k enc.qcow2 1M
qemu-io --object secret,id=rs0,file=pw --image-opts driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=rs0 -c "write -P 0x5a 64k 100k" >/dev/null
qemu-img convert --object secret,id=rs0,file=pw --image-opts driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=rs0 -O raw enc.raw
qemu-img create -q -f qcow2 pl.qcow2 1M
qemu-io -c "write -P 7 0 64k" pl.qcow2 >/dev/null
qemu-img convert -O raw pl.qcow2 pl.raw
`

// TestRecoverImageOpts: the --image-opts string of a device's record
// (attached encrypted) is what recover reopens the image with, given the
// secrets again; an option string operand must name the recorded file and
// format; a missing secret is QEMU's one line. Each recovered image is read
// whole and compared with qemu-img convert -O raw of it.
func TestRecoverImageOpts(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, recoverImages)
	tempRecordDir(t)
	enc, pl := filepath.Join(src, "enc.qcow2"), filepath.Join(src, "pl.qcow2")
	encOpts := "driver=qcow2,file.filename=" + enc + ",encrypt.key-secret=rs0"
	for _, r := range []ublk.Record{
		{ID: 1, Device: "/dev/ublkb1", Image: enc, Format: "qcow2", ImageOpts: encOpts, Cache: "writeback", Discard: "unmap", Recovery: true, PID: 1, PIDStart: 1},
		{ID: 2, Device: "/dev/ublkb2", Image: pl, Format: "qcow2", Cache: "writeback", Discard: "unmap", Recovery: true, PID: 1, PIDStart: 1},
	} {
		if err := ublk.WriteRecord(r); err != nil {
			t.Fatal(err)
		}
		if got, err := ublk.ReadRecord(r.ID); err != nil || got.ImageOpts != r.ImageOpts {
			t.Fatalf("record %d: image-opts %q (%v), want %q", r.ID, got.ImageOpts, err, r.ImageOpts)
		}
	}
	t.Chdir(src)
	for _, tc := range []struct {
		name    string
		id      int
		image   string // a file name, or an option string after "opts:"
		secrets map[string]string
		want    string // error substring, or "" to compare the data
		raw     string // qemu-img's raw conversion of the image
	}{
		{"recorded options", 1, "", map[string]string{"rs0": "correct horse"}, "", "enc.raw"},
		{"file name, recorded options", 1, "enc.qcow2", map[string]string{"rs0": "correct horse"}, "", "enc.raw"},
		{"option string", 1, "opts:driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=rs1", map[string]string{"rs1": "correct horse"}, "", "enc.raw"},
		{"option string probing", 1, "opts:file.filename=" + enc + ",encrypt.key-secret=rs0", map[string]string{"rs0": "correct horse"}, "", "enc.raw"},
		{"plain", 2, "", nil, "", "pl.raw"},
		{"no secret", 1, "", nil, "No secret with id 'rs0'", ""},
		{"other secret", 1, "", map[string]string{"rs1": "correct horse"}, "No secret with id 'rs0'", ""},
		{"operand secret missing", 1, "opts:driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=rs1", map[string]string{"rs0": "correct horse"}, "No secret with id 'rs1'", ""},
		{"other file", 1, "opts:driver=qcow2,file.filename=pl.qcow2", nil, "cannot recover /dev/ublkb1: it served " + enc + ", not " + pl, ""},
		{"other format", 1, "opts:driver=raw,file.filename=enc.qcow2", nil, "cannot recover /dev/ublkb1: it served " + enc + " as qcow2, not raw", ""},
		{"bad option string", 1, "opts:driver=qcow2", nil, `A block device must be specified for "file"`, ""},
		{"wrong key", 1, "", map[string]string{"rs0": "wrong horse"}, "Invalid password", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for id, pw := range tc.secrets {
				if err := bdrv.AddSecret(id, []byte(pw)); err != nil {
					t.Fatal(err)
				}
				defer bdrv.RemoveSecret(id)
			}
			image := tc.image
			if s, ok := strings.CutPrefix(image, "opts:"); ok {
				image = img.ImageOptsName(s)
			}
			got, err := recoverRead(tc.id, image)
			switch {
			case tc.want != "":
				if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
					t.Errorf("error %v, want one line with %q", err, tc.want)
				}
			case err != nil:
				t.Error(err)
			default:
				want, err := os.ReadFile(tc.raw)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Error("the recovered image reads other data than qemu-img's conversion")
				}
			}
		})
	}
}

// TestRecoverCommandLine: recover's --image-opts applies to the image
// operand only, and --object is taken, through the whole command line
// (refusals that come before any server starts).
func TestRecoverCommandLine(t *testing.T) {
	dir := tempRecordDir(t)
	enc, pl := filepath.Join(dir, "enc.qcow2"), filepath.Join(dir, "pl.qcow2")
	rec := ublk.Record{ID: 1, Device: "/dev/ublkb1", Image: enc, Format: "qcow2", Cache: "writeback", Discard: "unmap",
		ImageOpts: "driver=qcow2,file.filename=" + enc + ",encrypt.key-secret=sec0", Recovery: true, PID: 1, PIDStart: 1}
	if err := ublk.WriteRecord(rec); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ublkimg", "recover", "1"}, "ublkimg: No secret with id 'sec0'\n"},
		{[]string{"ublkimg", "recover", "--object", "secret,id=sec1,data=x", "/dev/ublkb1"}, "ublkimg: No secret with id 'sec0'\n"},
		{[]string{"ublkimg", "recover", "--image-opts", "1", "driver=qcow2,file.filename=" + pl},
			"ublkimg: cannot recover /dev/ublkb1: it served " + enc + ", not " + pl + "\n"},
		{[]string{"ublkimg", "recover", "--image-opts", "ublkb1", "driver=qcow2,file.filename=" + enc + ",encrypt.key-secret=sec1"},
			"ublkimg: No secret with id 'sec1'\n"},
	} {
		var out, errOut strings.Builder
		if code := run(tc.args, &out, &errOut); code != 1 || errOut.String() != tc.want {
			t.Errorf("%q: exit %d, stderr %q, want %q", tc.args, code, errOut.String(), tc.want)
		}
	}
}

// recoverRead opens the image as recover's server would and reads it whole.
func recoverRead(id int, image string) ([]byte, error) {
	o, err := recoverOptions(id, image, false)
	if err != nil {
		return nil, err
	}
	o.cfg.ReadOnly = true
	node, _, err := openImage(o)
	if err != nil {
		return nil, err
	}
	var b []byte
	err = coroutine.Run(func(co *coroutine.Co) error {
		b = make([]byte, node.Length())
		return errors.Join(node.Preadv(co, 0, bdrv.IOVec{b}, 0), node.Close(co))
	})
	return b, err
}

// TestAttachImageOptsChecked: attach refuses an --image-opts option that no
// driver takes (a passphrase written into the string would otherwise reach
// the device's record), in qemu-img's words and without the value.
func TestAttachImageOptsChecked(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, "qemu-img create -q -f qcow2 pl.qcow2 1M")
	p := filepath.Join(src, "pl.qcow2")
	for _, tc := range []struct {
		opts, want string
	}{
		{"driver=qcow2,file.filename=" + p + ",lazy-refcounts=on", ""},
		{"driver=qcow2,file.filename=" + p + ",password=hunter2", "Block format 'qcow2' does not support the option 'password'"},
		{"driver=qcow2,file.filename=" + p + ",file.passphrase=hunter2", "Block protocol 'file' doesn't support the option 'passphrase'"},
	} {
		name, format, opts, err := img.ResolveImageName(img.ImageOptsName(tc.opts))
		if err != nil {
			t.Fatal(err)
		}
		// As attach --recovery: the recovery option added is not the user's.
		o := &attachOptions{image: name, format: format, options: opts, imageOpts: tc.opts,
			cache: bdrv.CacheWriteback, cacheSet: true, cfg: ublk.Config{Recovery: true}}
		node, _, err := openImage(o)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.opts, err)
		case tc.want == "":
			coroutine.Run(func(co *coroutine.Co) error { return node.Close(co) })
		case err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "hunter2"):
			t.Errorf("%s: %v, want %q without the value", tc.opts, err, tc.want)
		}
	}
}

// TestAbsImageArg: the background server, which runs from /, gets the image
// by its absolute name, in an --image-opts string too (its other options
// kept, commas in the name escaped).
func TestAbsImageArg(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	opts := "driver=qcow2,file.filename=a,,b.qcow2,encrypt.key-secret=s0"
	for _, tc := range []struct {
		image, want string
	}{
		{"a.img", filepath.Join(dir, "a.img")},
		{"/x/a.img", "/x/a.img"},
		{"null-co://", "null-co://"},
		{img.ImageOptsName(opts), "driver=qcow2,encrypt.key-secret=s0,file.filename=" + dir + "/a,,b.qcow2"},
		{img.ImageOptsName("driver=file,filename=r.raw"), "driver=file,filename=" + dir + "/r.raw"},
		{img.ImageOptsName("driver=raw,file.filename=/r.raw"), "driver=raw,file.filename=/r.raw"},
	} {
		arg := strings.TrimPrefix(tc.image, img.ImageOptsName(""))
		got := absImageArg([]string{"attach", "--foreground", "-f", "qcow2", arg}, tc.image)
		if got[len(got)-1] != tc.want || got[3] != "qcow2" {
			t.Errorf("%q: %q, want %q last", arg, got, tc.want)
		}
	}
	name, format, o, err := img.ResolveImageName(img.ImageOptsName(absImageOpts(opts)))
	if err != nil || name != filepath.Join(dir, "a,b.qcow2") || format != "qcow2" || len(o) != 1 || o["encrypt.key-secret"] != "s0" {
		t.Errorf("rewritten string opens %q %q %v (%v)", name, format, o, err)
	}
}
