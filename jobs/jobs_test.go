package jobs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/file"
	_ "ublkimg/drivers/luks"
	_ "ublkimg/drivers/qcow2"
	_ "ublkimg/drivers/raw"
	"ublkimg/internal/qemutest"
)

// guestDevice stands for the block device in these tests: a node that
// "guest" goroutines write to while a job runs, through Node() as the
// queues do, and a pause that waits for their writes in flight. model is
// what the guest wrote, so at any pause it is exactly what the image
// reads; pauses records a copy of it at every pause.
type guestDevice struct {
	gate sync.RWMutex // a guest write holds it shared, a pause exclusive
	node *bdrv.Node

	mu     sync.Mutex
	model  []byte
	pauses [][]byte
	runs   uint64 // calls of guests, which seed them differently
}

func (d *guestDevice) Pause(ctx context.Context) error {
	d.gate.Lock()
	d.mu.Lock()
	d.pauses = append(d.pauses, bytes.Clone(d.model))
	d.mu.Unlock()
	return nil
}

func (d *guestDevice) Resume()                 { d.gate.Unlock() }
func (d *guestDevice) Node() *bdrv.Node        { return d.node }
func (d *guestDevice) SetNode(node *bdrv.Node) { d.node = node }

// write writes data at off through the device, on loop, and records it.
func (d *guestDevice) write(loop *coroutine.Loop, off int64, data []byte) error {
	d.gate.RLock()
	defer d.gate.RUnlock()
	node := d.node
	err := loop.Call(func(co *coroutine.Co) error { return node.Pwritev(co, off, bdrv.IOVec{data}, 0) })
	if err == nil {
		d.mu.Lock()
		copy(d.model[off:], data)
		d.mu.Unlock()
	}
	return err
}

// guests runs n goroutines writing random 4 KiB blocks (and the odd
// 64 KiB one) all over the device until stop is closed; wait returns
// their first error.
func (d *guestDevice) guests(t *testing.T, n int, stop <-chan struct{}) (wait func() error) {
	d.runs++
	seed := d.runs
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for g := range n {
		loop, err := coroutine.Start(coroutine.Config{})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer loop.Close()
			r := rand.New(rand.NewPCG(uint64(g), seed))
			buf := bdrv.AlignedBuffer(64<<10, 4096)
			for {
				select {
				case <-stop:
					return
				default:
				}
				size := int64(4096)
				if r.IntN(8) == 0 {
					size = 64 << 10
				}
				// Each guest writes its own 64 KiB chunks (chunk % n
				// == g): concurrent writes to one block would leave
				// the image and the model in different orders.
				chunk := r.Int64N(int64(len(d.model))>>16/int64(n))*int64(n) + int64(g)
				off := chunk<<16 + r.Int64N(65536/size)*size
				fill(r, buf[:size])
				if err := d.write(loop, off, buf[:size]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	return func() error {
		wg.Wait()
		close(errs)
		return <-errs
	}
}

func fill(r *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		v := r.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
}

// newGuestDevice creates a qcow2 image of size bytes whose first half is
// random data (and the rest zeros), opens it read-write as a device would and returns it.
func newGuestDevice(t *testing.T, dir string, size int64) *guestDevice {
	t.Helper()
	return newGuestDeviceOpts(t, dir, size, "qcow2", nil, nil)
}

// newGuestDeviceOpts is newGuestDevice with an image of format (disk.FMT),
// its creation options, and options to open it with.
func newGuestDeviceOpts(t *testing.T, dir string, size int64, format string, create, opts bdrv.Options) *guestDevice {
	t.Helper()
	path := filepath.Join(dir, "disk."+format)
	d := &guestDevice{model: make([]byte, size)}
	fill(rand.New(rand.NewPCG(1, 2)), d.model[:size/2])
	// Created and opened at once by this process: the file driver's
	// Close releases the image locks before the io_uring requests let go
	// of the file (drivers/file TestCloseReleasesLocksAfterPuntedIO).
	err := coroutine.Run(func(co *coroutine.Co) error {
		if err := bdrv.Create(co, format, &bdrv.CreateRequest{Filename: path, Size: size, Options: create}); err != nil {
			return err
		}
		n, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: format, Cache: bdrv.CacheWriteback, Options: opts})
		if err != nil {
			return err
		}
		d.node = n
		// A luks image reads what its zeroed file decrypts to until
		// written: its second half gets the model's zeros too.
		written := size / 2
		if format == "luks" {
			written = size
		}
		data := bdrv.AlignedBuffer(int(written), 4096)
		copy(data, d.model)
		return n.Pwritev(co, 0, bdrv.IOVec{data}, 0)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.close(t) })
	return d
}

func (d *guestDevice) close(t *testing.T) {
	if d.node == nil {
		return
	}
	if err := coroutine.Run(func(co *coroutine.Co) error { return d.node.Close(co) }); err != nil {
		t.Error(err)
	}
	d.node = nil
}

// readImage reads an image file (with its backing chain) whole.
func readImage(t *testing.T, path string) []byte {
	t.Helper()
	return readImageOpts(t, path, nil)
}

// readImageOpts reads an image file opened with opts whole.
func readImageOpts(t *testing.T, path string, opts bdrv.Options) []byte {
	t.Helper()
	var data []byte
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, bdrv.Spec{Filename: path, ReadOnly: true, Options: opts})
		if err != nil {
			return err
		}
		defer n.Close(co)
		data = bdrv.AlignedBuffer(int(n.Length()), 4096)
		return n.Preadv(co, 0, bdrv.IOVec{data}, 0)
	})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// qemuImg runs qemu-img and fails t unless it exits 0.
func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// sameData fails t where got differs from want, naming the first
// differing 4 KiB block.
func sameData(t *testing.T, what string, got, want []byte) {
	t.Helper()

	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for off := 0; off < len(want); off += 4096 {
		if !bytes.Equal(got[off:off+4096], want[off:off+4096]) {
			t.Fatalf("%s differs at %d", what, off)
		}
	}
}

// TestBackupUnderWrites: full backups to qcow2 and raw, then an
// incremental one from a bitmap, each taken while four guests write all
// over the image, equal the image as it was at their pause, and pass
// qemu-img check; the incremental one holds only what changed. Plaintext
// (given for the raw one) changes nothing on an image in clear.
func TestBackupUnderWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	const size = 32 << 20
	d := newGuestDevice(t, dir, size)
	ctx := t.Context()
	addBitmap(t, d.node, "b0", 0)
	backup := func(o BackupOptions) []byte {
		t.Helper()
		stop := make(chan struct{})
		wait := d.guests(t, 4, stop)
		first := len(d.pauses)
		var last int64
		res, err := Backup(ctx, d, o, func(done, total int64) { last = done })
		close(stop)
		if gerr := wait(); gerr != nil {
			t.Fatalf("guest write: %v", gerr)
		}
		if err != nil {
			t.Fatal(err)
		}
		// The image is in clear: no secret, and Plaintext (asked for
		// the raw one) changed nothing.
		if res.Secret != "" || res.Plaintext || res.Options != nil {
			t.Fatalf("%s: %+v for a device in clear", filepath.Base(o.Target), res)
		}
		t.Logf("%s: copied %d bytes", filepath.Base(o.Target), last)
		if d.node.Format.Name != "qcow2" || bdrv.Unfiltered(d.node) != d.node {
			t.Fatalf("the device serves %s after the backup", d.node.Format.Name)
		}
		return d.pauses[first]
	}

	full := filepath.Join(dir, "full.qcow2")
	want := backup(BackupOptions{Target: full, Bitmap: "b0"})
	qemuImg(t, "check", full)
	sameData(t, "full backup", readImage(t, full), want)

	raw := filepath.Join(dir, "full.raw")
	wantRaw := backup(BackupOptions{Target: raw, Format: "raw", Plaintext: true})
	sameData(t, "raw backup", readImage(t, raw), wantRaw)

	inc := filepath.Join(dir, "inc.qcow2")
	wantInc := backup(BackupOptions{Target: inc, Bitmap: "b0", Incremental: full})
	qemuImg(t, "check", inc)
	sameData(t, "incremental backup", readImage(t, inc), wantInc)
	if !strings.Contains(qemuImg(t, "info", inc), "backing file: "+full) {
		t.Errorf("the incremental backup is not backed by %s", full)
	}
	// Only what the guests wrote between the two backups' points in time
	// is in it: every granule it holds itself changed.
	var own int64
	for _, e := range imageMap(t, inc) {
		if e.Depth != 0 {
			continue
		}
		for off := e.Start; off < e.Start+e.Length; off += backupGranularity {
			if bytes.Equal(want[off:off+backupGranularity], wantInc[off:off+backupGranularity]) {
				t.Fatalf("the incremental backup holds granule %d, which did not change", off/backupGranularity)
			}
			own += backupGranularity
		}
	}
	if own == 0 {
		t.Error("the incremental backup holds nothing")
	}
}

// mapEntry is one extent of qemu-img map --output=json.
type mapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Depth  int   `json:"depth"`
	Data   bool  `json:"data"`
}

func imageMap(t *testing.T, path string) []mapEntry {
	t.Helper()
	var m []mapEntry
	if err := json.Unmarshal([]byte(qemuImg(t, "map", "--output=json", path)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestSnapshotCommitUnderWrites: a live snapshot then a live commit, each
// while guests write: the device ends up serving the base again, which
// reads as everything the guests wrote; the overlay, the base and what
// pivot was told are right; qemu-img check passes on both images.
func TestSnapshotCommitUnderWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	const size = 32 << 20
	d := newGuestDevice(t, dir, size)
	base := d.node.Filename
	ctx := t.Context()
	var pivots []string
	pivot := func(image, format string, _ bdrv.Options) error {
		pivots = append(pivots, filepath.Base(image)+":"+format)
		return nil
	}
	overlay := filepath.Join(dir, "top.qcow2")

	stop := make(chan struct{})
	wait := d.guests(t, 4, stop)
	err := Snapshot(ctx, d, overlay, OpenOptions{Cache: bdrv.CacheWriteback}, pivot)
	if err == nil {
		// The base is read-only now, and consistent: qemu-img reads it
		// while the overlay is written.
		if out, cerr := exec.Command("qemu-img", "check", "-U", base).CombinedOutput(); cerr != nil {
			err = fmt.Errorf("qemu-img check of the base during the snapshot: %v\n%s", cerr, out)
		}
	}
	var progressed bool
	if err == nil {
		err = Commit(ctx, d, OpenOptions{Cache: bdrv.CacheWriteback}, pivot, func(done, total int64) { progressed = true })
	}
	close(stop)
	if gerr := wait(); gerr != nil {
		t.Fatalf("guest write: %v", gerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(pivots, " ") != "top.qcow2:qcow2 disk.qcow2:qcow2" || d.node.Filename != base || d.node.ReadOnly {
		t.Fatalf("pivots %v; the device serves %s (read-only %v)", pivots, d.node.Filename, d.node.ReadOnly)
	}
	if !progressed {
		t.Error("the commit reported no progress")
	}
	want := bytes.Clone(d.model)
	d.close(t)
	qemuImg(t, "check", base)
	qemuImg(t, "check", overlay)
	sameData(t, "base after the commit", readImage(t, base), want)
}

// encryptedImage is an encrypted image format of the tests: its creation
// options under a secret, and the option that opens it with one.
type encryptedImage struct{ format, create, secretKey string }

// withSecret registers secret id for the test, and returns its --object
// definition and the encrypted formats created under it. The images, and
// those the jobs encrypt meanwhile, take 10 ms of key derivation, not 2 s.
func withSecret(t *testing.T, id string) (obj string, images []encryptedImage) {
	t.Helper()
	overlayIterTime, backupIterTime = "10", "10"
	t.Cleanup(func() { overlayIterTime, backupIterTime = "", "" })
	const pass = "correct horse"
	if err := bdrv.AddSecret(id, []byte(pass)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdrv.RemoveSecret(id) })
	return "secret,id=" + id + ",data=" + pass, []encryptedImage{
		{"qcow2", "encrypt.format=luks,encrypt.key-secret=" + id + ",encrypt.iter-time=10", "encrypt.key-secret"},
		{"luks", "key-secret=" + id + ",iter-time=10", "key-secret"},
	}
}

// TestSnapshotCommitEncrypted: a live snapshot and a live commit of an
// encrypted image opened with its secret (attach --image-opts
// driver=qcow2,file.filename=X,encrypt.key-secret=ID, or driver=luks and
// key-secret=ID), under guest writes: the overlay is encrypted with the
// same secret and opened with it and with the image's options as
// "backing." ones, which pivot is told; the commit reopens the base with
// those and tells pivot the image's own options again. Nothing the guests
// wrote is in clear in either file; qemu-img check reads them with the
// secret (but a luks base, which it cannot check).
func TestSnapshotCommitEncrypted(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	const id = "jobs-enc-sec"
	obj, images := withSecret(t, id)
	for _, tc := range images {
		t.Run(tc.format, func(t *testing.T) {
			dir := t.TempDir()
			const size = 8 << 20
			opts := bdrv.Options{tc.secretKey: id, "cache.no-flush": "off", "file.locking": "on"}
			create, err := bdrv.ParseOptionString(tc.create)
			if err != nil {
				t.Fatal(err)
			}
			d := newGuestDeviceOpts(t, dir, size, tc.format, create, opts)
			base := d.node.Filename
			overlay := filepath.Join(dir, "top.qcow2")
			var pivots []string
			var last bdrv.Options
			pivot := func(image, format string, o bdrv.Options) error {
				pivots = append(pivots, filepath.Base(image)+":"+format)
				last = o
				return nil
			}
			stop := make(chan struct{})
			wait := d.guests(t, 2, stop)
			err = Snapshot(t.Context(), d, overlay, OpenOptions{Cache: bdrv.CacheWriteback, Image: opts}, pivot)
			topOpts := last
			if err == nil {
				want := bdrv.Options{"encrypt.key-secret": id, "cache.no-flush": "off", "file.locking": "on",
					"backing." + tc.secretKey: id, "backing.cache.no-flush": "off", "backing.file.locking": "on"}
				if fmt.Sprint(topOpts) != fmt.Sprint(want) {
					err = fmt.Errorf("the overlay's options %v, want %v", topOpts, want)
				}
			}
			if err == nil {
				err = Commit(t.Context(), d, OpenOptions{Cache: bdrv.CacheWriteback, Image: topOpts}, pivot, nil)
			}
			close(stop)
			if gerr := wait(); gerr != nil {
				t.Fatalf("guest write: %v", gerr)
			}
			if err != nil {
				t.Fatal(err)
			}
			if want := "top.qcow2:qcow2 disk." + tc.format + ":" + tc.format; strings.Join(pivots, " ") != want || d.node.Filename != base {
				t.Fatalf("pivots %v; the device serves %s", pivots, d.node.Filename)
			}
			if want := opts.Merge(nil); fmt.Sprint(last) != fmt.Sprint(want) {
				t.Errorf("the base's options after the commit %v, want %v", last, want)
			}
			want := bytes.Clone(d.model)
			d.close(t)
			topString := "driver=qcow2,file.filename=" + overlay + ",encrypt.key-secret=" + id
			// qemu-img info opens no backing file, and takes no option for one.
			if out := qemuImg(t, "info", "--object", obj, "--image-opts", topString); !strings.Contains(out, "encrypted: yes") {
				t.Errorf("the overlay is not encrypted:\n%s", out)
			}
			if tc.format == "qcow2" { // qemu-img checks no luks image
				qemuImg(t, "check", "--object", obj, "--image-opts", "driver=qcow2,file.filename="+base+",encrypt.key-secret="+id)
			}
			qemuImg(t, "check", "--object", obj, "--image-opts", topString+",backing."+tc.secretKey+"="+id)
			sameData(t, "base after the commit", readImageOpts(t, base, bdrv.Options{tc.secretKey: id}), want)
			for _, f := range []string{base, overlay} {
				raw, err := os.ReadFile(f)
				if err != nil {
					t.Fatal(err)
				}
				if bytes.Contains(raw, want[size/2-4096:size/2]) || bytes.Contains(raw, want[:4096]) {
					t.Errorf("%s holds guest data in clear", f)
				}
			}
		})
	}
}

// TestBackupEncrypted: backups of an encrypted image (qcow2 with
// encrypt.key-secret, luks with key-secret) under guest writes. A raw
// target is refused in one line, before anything is done; the default
// qcow2 target is encrypted with LUKS under the image's secret, and so
// are the incremental ones over it (qcow2 only: luks holds no bitmaps),
// whose backing chain the result's options open (backing.encrypt.key-secret,
// backing.backing....). qemu-img check and compare, given the secret and
// those options, find each backup equal to the device at its point in
// time; a marker the guest wrote is in none of them in clear, but in the
// raw backup written in clear when asked (Plaintext), which shows the
// search finds it where it is.
func TestBackupEncrypted(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	const id = "jobs-bk-sec"
	obj, images := withSecret(t, id)
	marker := []byte("MARKER-of-the-guest-in-clear-0123456789")
	for _, tc := range images {
		t.Run(tc.format, func(t *testing.T) {
			dir := t.TempDir()
			const size = 8 << 20
			opts := bdrv.Options{tc.secretKey: id}
			create, err := bdrv.ParseOptionString(tc.create)
			if err != nil {
				t.Fatal(err)
			}
			d := newGuestDeviceOpts(t, dir, size, tc.format, create, opts)
			ctx := t.Context()
			open := OpenOptions{Cache: bdrv.CacheWriteback, Image: opts}
			incremental := tc.format == "qcow2"
			if incremental {
				addBitmap(t, d.node, "b0", 0)
			}
			loop, err := coroutine.Start(coroutine.Config{})
			if err != nil {
				t.Fatal(err)
			}
			defer loop.Close()
			// The guest writes a fresh marker before each backup, where
			// no guest goroutine writes: three guests write the 64 KiB
			// chunks up to 3*(128/3)-1 = 125 of the 128, not the last.
			writeMarker := func(n int) []byte {
				t.Helper()
				m := fmt.Appendf(nil, "%s-%d", marker, n)
				buf := bdrv.AlignedBuffer(4096, 4096)
				for i := 0; i+len(m) <= len(buf); i += len(m) {
					copy(buf[i:], m)
				}
				if err := d.write(loop, size-4096, buf); err != nil {
					t.Fatal(err)
				}
				return m
			}
			backup := func(o BackupOptions) (BackupResult, []byte) {
				t.Helper()
				o.Open = open
				stop := make(chan struct{})
				wait := d.guests(t, 3, stop)
				first := len(d.pauses)
				res, err := Backup(ctx, d, o, nil)
				close(stop)
				if gerr := wait(); gerr != nil {
					t.Fatalf("guest write: %v", gerr)
				}
				if err != nil {
					t.Fatal(err)
				}
				return res, d.pauses[first]
			}
			// check compares the backup, opened with res's options, with
			// want through qemu-img, and looks for marker m in clear.
			check := func(name string, res BackupResult, want, m []byte) {
				t.Helper()
				path := filepath.Join(dir, name)
				wantRaw := filepath.Join(dir, name+".want")
				if err := os.WriteFile(wantRaw, want, 0o644); err != nil {
					t.Fatal(err)
				}
				imageOpts := "driver=qcow2,file.filename=" + path
				for _, k := range slices.Sorted(maps.Keys(res.Options)) {
					imageOpts += "," + k + "=" + res.Options[k]
				}
				// qemu-img info opens no backing file, and takes no option for one.
				info := "driver=qcow2,file.filename=" + path + ",encrypt.key-secret=" + res.Secret
				if out := qemuImg(t, "info", "--object", obj, "--image-opts", info); !strings.Contains(out, "encrypted: yes") {
					t.Errorf("%s is not encrypted:\n%s", name, out)
				}
				qemuImg(t, "check", "--object", obj, "--image-opts", imageOpts)
				qemuImg(t, "compare", "--object", obj, "--image-opts", imageOpts, "driver=raw,file.filename="+wantRaw)
				sameData(t, name, readImageOpts(t, path, res.Options), want)
				if !bytes.Contains(want, m) {
					t.Fatalf("%s: the marker is not on the device at the point in time", name)
				}
				if raw, err := os.ReadFile(path); err != nil {
					t.Fatal(err)
				} else if bytes.Contains(raw, m) || bytes.Contains(raw, want[:4096]) {
					t.Errorf("%s holds guest data in clear", name)
				}
			}

			// Refused: nothing paused, nothing left.
			rawTarget := filepath.Join(dir, "full.raw")
			_, err = Backup(ctx, d, BackupOptions{Target: rawTarget, Format: "raw", Open: open}, nil)
			wantErr := "backup: the device's image is encrypted and a raw target would hold its data in clear: " +
				"use -f qcow2 (encrypted with the image's secret), or --plaintext to write it in clear"
			if err == nil || err.Error() != wantErr {
				t.Fatalf("raw backup: %v, want %q", err, wantErr)
			}
			if _, err := os.Lstat(rawTarget); err == nil || len(d.pauses) != 0 {
				t.Fatalf("the refused backup left %s or paused the device (%d pauses)", rawTarget, len(d.pauses))
			}

			m := writeMarker(0)
			full := filepath.Join(dir, "full.qcow2")
			o := BackupOptions{Target: full}
			if incremental {
				o.Bitmap = "b0"
			}
			res, want := backup(o)
			if wantRes := (BackupResult{Secret: id, Options: bdrv.Options{"encrypt.key-secret": id}}); fmt.Sprint(res) != fmt.Sprint(wantRes) {
				t.Fatalf("full backup: %+v, want %+v", res, wantRes)
			}
			check("full.qcow2", res, want, m)

			m = writeMarker(1)
			res, want = backup(BackupOptions{Target: rawTarget, Format: "raw", Plaintext: true})
			if wantRes := (BackupResult{Plaintext: true}); fmt.Sprint(res) != fmt.Sprint(wantRes) {
				t.Fatalf("raw backup in clear: %+v, want %+v", res, wantRes)
			}
			sameData(t, "raw backup in clear", readImage(t, rawTarget), want)
			if raw, err := os.ReadFile(rawTarget); err != nil || !bytes.Contains(raw, m) {
				t.Fatalf("the raw backup in clear does not hold the marker (%v)", err)
			}
			if !incremental {
				return
			}

			prev := full
			for i, backing := range []string{"backing.", "backing.backing."} {
				m = writeMarker(2 + i)
				name := fmt.Sprintf("inc%d.qcow2", i)
				path := filepath.Join(dir, name)
				res, want = backup(BackupOptions{Target: path, Bitmap: "b0", Incremental: prev})
				wantOpts := bdrv.Options{"encrypt.key-secret": id, "backing.encrypt.key-secret": id, backing + "encrypt.key-secret": id}
				if wantRes := (BackupResult{Secret: id, Options: wantOpts}); fmt.Sprint(res) != fmt.Sprint(wantRes) {
					t.Fatalf("%s: %+v, want %+v", name, res, wantRes)
				}
				check(name, res, want, m)
				if !strings.Contains(qemuImg(t, "info", path), "backing file: "+prev) {
					t.Errorf("%s is not backed by %s", name, prev)
				}
				prev = path
			}
		})
	}
}

// TestJobRefusals: each bad request is one line and changes nothing.
func TestJobRefusals(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	d := newGuestDevice(t, dir, 4<<20)
	exists := filepath.Join(dir, "exists")
	if err := os.WriteFile(exists, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	o := OpenOptions{Cache: bdrv.CacheWriteback}
	noPivot := func(string, string, bdrv.Options) error { return errors.New("pivot called") }
	backup := func(bo BackupOptions) error {
		_, err := Backup(ctx, d, bo, nil)
		return err
	}
	for _, tc := range []struct {
		name string
		run  func() error
		want string
	}{
		{"overlay exists", func() error { return Snapshot(ctx, d, exists, o, noPivot) },
			"overlay '" + exists + "' already exists: give a new file name"},
		{"commit without backing", func() error { return Commit(ctx, d, o, noPivot, nil) },
			"live commit: '" + d.node.Filename + "' has no backing file to commit into"},
		{"target exists", func() error { return backup(BackupOptions{Target: exists}) },
			"backup target '" + exists + "' already exists: give a new file name"},
		{"missing bitmap", func() error {
			return backup(BackupOptions{Target: filepath.Join(dir, "b.qcow2"), Bitmap: "nope"})
		}, "Dirty bitmap 'nope' not found"},
		{"incremental without bitmap", func() error {
			return backup(BackupOptions{Target: filepath.Join(dir, "b.qcow2"), Incremental: exists})
		}, "backup: an incremental backup needs the bitmap that recorded the changes (--bitmap)"},
		{"raw incremental", func() error {
			return backup(BackupOptions{Target: filepath.Join(dir, "b.raw"), Format: "raw", Bitmap: "x", Incremental: exists})
		}, "backup: an incremental backup is a qcow2 image backed by the previous one (-f qcow2)"},
		{"bad format", func() error {
			return backup(BackupOptions{Target: filepath.Join(dir, "b.vmdk"), Format: "vmdk"})
		}, "backup: unsupported target format 'vmdk' (qcow2, raw)"},
	} {
		err := tc.run()
		if err == nil || err.Error() != tc.want {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	if len(d.pauses) != 0 {
		t.Errorf("a refused job paused the device %d times", len(d.pauses))
	}
	for _, f := range []string{"b.qcow2", "b.raw", "b.vmdk"} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			t.Errorf("a refused job left %s", f)
		}
	}
}

// TestBackupFailureKeepsBitmap: a backup cancelled after its point in time
// (which took the bitmap's marks and cleared it) removes its target and
// gives the bitmap its marks back, so the next backup still copies them;
// the device serves the image again, without the filter.
func TestBackupFailureKeepsBitmap(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	d := newGuestDevice(t, dir, 8<<20)
	addBitmap(t, d.node, "b0", 65536)
	loop, err := coroutine.Start(coroutine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer loop.Close()
	for _, off := range []int64{1 << 20, 5<<20 + 4096} {
		if err := d.write(loop, off, bdrv.AlignedBuffer(4096, 4096)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	target := filepath.Join(dir, "b.qcow2")
	_, err = Backup(ctx, d, BackupOptions{Target: target, Bitmap: "b0"}, func(done, total int64) { cancel() })
	if !errors.Is(err, ErrJobCancelled) {
		t.Fatalf("backup: %v, want it cancelled", err)
	}
	if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the failed backup left its target (%v)", err)
	}
	if bdrv.Unfiltered(d.node) != d.node {
		t.Error("the device still serves through the backup's filter")
	}
	if dirty, want := dirtyRanges(t, d.node, "b0"), "1048576+65536 5242880+65536"; dirty != want {
		t.Errorf("bitmap after the failed backup: dirty %v, want %v", dirty, want)
	}
}

// addBitmap adds an enabled persistent bitmap to image n (granularity
// 0: the default).
func addBitmap(t *testing.T, n *bdrv.Node, name string, granularity uint64) {
	t.Helper()
	err := coroutine.Run(func(co *coroutine.Co) error {
		return n.Driver().(bdrv.PersistentBitmaps).AddBitmap(co, name, granularity, false)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// dirtyRanges lists the dirty ranges of bitmap name of image n as
// "start+length" words.
func dirtyRanges(t *testing.T, n *bdrv.Node, name string) string {
	t.Helper()
	var dirty []string
	err := coroutine.Run(func(co *coroutine.Co) error {
		data, err := n.Driver().(bdrv.PersistentBitmaps).ExportBitmap(co, name)
		if err != nil {
			return err
		}
		for off := uint64(0); ; {
			start, n := data.NextDirty(off)
			if n == 0 {
				return nil
			}
			dirty = append(dirty, fmt.Sprintf("%d+%d", start, n))
			off = start + n
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(dirty, " ")
}

// TestBitmapMergeAndSnapshot: a merge on a served image sets in its
// target what the source marked, from the image itself or from another
// file (-b); a merge from a missing bitmap is qemu-img's one line. After a
// live snapshot the bitmaps stay in the base, read-only: backup --bitmap
// and bitmap --clear say where the bitmap is.
func TestBitmapMergeAndSnapshot(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	d := newGuestDevice(t, dir, 8<<20)
	other := filepath.Join(dir, "other.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", other, "8M")
	qemuImg(t, "bitmap", "--add", other, "ob")
	// qemu-io's write is recorded by ob, enabled.
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write 5M 4k", other).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	ctx := t.Context()
	add := []BitmapOp{{Action: bdrv.BitmapAdd, Granularity: 65536}}
	for _, name := range []string{"b0", "b1"} {
		if err := Bitmap(ctx, d, name, add, BitmapSource{}); err != nil {
			t.Fatal(err)
		}
	}
	loop, err := coroutine.Start(coroutine.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer loop.Close()
	if err := d.write(loop, 3<<20, bdrv.AlignedBuffer(4096, 4096)); err != nil {
		t.Fatal(err)
	}
	merge := []BitmapOp{{Action: bdrv.BitmapMerge, Source: "b0"}}
	if err := Bitmap(ctx, d, "b1", []BitmapOp{{Action: bdrv.BitmapClear}}, BitmapSource{}); err != nil {
		t.Fatal(err)
	}
	if err := Bitmap(ctx, d, "b1", merge, BitmapSource{}); err != nil {
		t.Fatal(err)
	}
	if err := Bitmap(ctx, d, "b1", []BitmapOp{{Action: bdrv.BitmapMerge, Source: "ob"}}, BitmapSource{File: other, Format: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	err = Bitmap(ctx, d, "b1", []BitmapOp{{Action: bdrv.BitmapMerge, Source: "nope"}}, BitmapSource{})
	if want := "Operation merge on bitmap b1 failed: Dirty bitmap 'nope' not found"; err == nil || err.Error() != want {
		t.Errorf("merge from a missing bitmap: %v, want %q", err, want)
	}
	if dirty, want := dirtyRanges(t, d.node, "b1"), "3145728+65536 5242880+65536"; dirty != want {
		t.Errorf("b1 after the merges: dirty %v, want %v", dirty, want)
	}

	base := d.node.Filename
	top := filepath.Join(dir, "top.qcow2")
	if err := Snapshot(ctx, d, top, OpenOptions{Cache: bdrv.CacheWriteback}, func(string, string, bdrv.Options) error { return nil }); err != nil {
		t.Fatal(err)
	}
	hint := ": it is in the backing file '" + base + "', read-only since a live snapshot and recording no writes (ublkimg bitmap --add adds one to '" + top + "')"
	_, err = Backup(ctx, d, BackupOptions{Target: filepath.Join(dir, "b.qcow2"), Bitmap: "b0"}, nil)
	if want := "Dirty bitmap 'b0' not found" + hint; err == nil || err.Error() != want {
		t.Errorf("backup from a bitmap of the base: %v, want %q", err, want)
	}
	err = Bitmap(ctx, d, "b0", []BitmapOp{{Action: bdrv.BitmapClear}}, BitmapSource{})
	if want := "Operation clear on bitmap b0 failed: Dirty bitmap 'b0' not found" + hint; err == nil || err.Error() != want {
		t.Errorf("clear of a bitmap of the base: %v, want %q", err, want)
	}
	d.close(t)
	if out := qemuImg(t, "info", base); !strings.Contains(out, "name: b1") {
		t.Errorf("the base lost its bitmaps:\n%s", out)
	}
}

// TestOverlayOptions: what a live snapshot's overlay is created and
// opened with, for the images a device may serve with --image-opts.
func TestOverlayOptions(t *testing.T) {
	for _, tc := range []struct {
		name, format string
		opts         bdrv.Options
		create, open string // fmt.Sprint of the maps
		err          string
	}{
		{"no options", "qcow2", nil, "map[]", "map[]", ""},
		{"encrypted qcow2", "qcow2", bdrv.Options{"encrypt.key-secret": "s", "l2-cache-size": "4M", "file.aio": "threads", "discard": "unmap"},
			"map[encrypt.format:luks encrypt.key-secret:s]",
			"map[backing.discard:unmap backing.encrypt.key-secret:s backing.file.aio:threads backing.l2-cache-size:4M discard:unmap encrypt.key-secret:s file.aio:threads]", ""},
		{"luks", "luks", bdrv.Options{"key-secret": "s", "cache.direct": "on"},
			"map[encrypt.format:luks encrypt.key-secret:s]",
			"map[backing.cache.direct:on backing.key-secret:s cache.direct:on encrypt.key-secret:s]", ""},
		{"raw", "raw", bdrv.Options{"detect-zeroes": "on"}, "map[]", "map[backing.detect-zeroes:on detect-zeroes:on]", ""},
		{"raw with offset", "raw", bdrv.Options{"offset": "512"}, "", "",
			"live snapshot: '/d.img' is opened with the raw option offset, which the overlay's backing file name cannot carry"},
	} {
		base := &bdrv.Node{Filename: "/d.img", Format: &bdrv.Format{Name: tc.format}}
		create, open, err := overlayOptions(base, tc.opts)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%s: %v, want %q", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if got := fmt.Sprint(create); got != tc.create {
			t.Errorf("%s: created with %s, want %s", tc.name, got, tc.create)
		}
		if got := fmt.Sprint(open); got != tc.open {
			t.Errorf("%s: opened with %s, want %s", tc.name, got, tc.open)
		}
	}
}
