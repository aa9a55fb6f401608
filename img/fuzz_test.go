package img

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/fuzzlimit"
)

// verbSeedScript makes the seed images of FuzzVerbs, one per feature
// qemu-img can give an image, each with data, zeros and compressed
// clusters where the format allows: version 2 with a snapshot, 512-byte
// clusters, extended L2 with zstd and lazy refcounts, a backing file, a
// raw external data file, persistent bitmaps (one in use, as a crash
// leaves it); and LUKS encryption (opened without its key), made by
// ublkimg's create (qemu-img takes seconds to time PBKDF2 on a busy
// machine).
const verbSeedScript = `
io() { f=$1; shift; for c in "$@"; do set -- "$@" -c "$c"; shift; done; qemu-io -f qcow2 "$@" "$f" >/dev/null; }
qemu-img create -q -f qcow2 base.qcow2 16M
io base.qcow2 "write -P 1 0 1M" "write -P 2 8M 64k"
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 16M
io v2.qcow2 "write -P 3 0 64k" "write -c -P 4 64k 64k" "write -z 1M 64k"
qemu-img snapshot -c snap v2.qcow2
io v2.qcow2 "write -P 5 0 4k"
qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 16M
io small.qcow2 "write -P 6 0 8k" "write -c -P 7 1M 4k" "discard 4k 2k"
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k,compression_type=zstd,lazy_refcounts=on,refcount_bits=8 ext.qcow2 16M
io ext.qcow2 "write -P 8 0 5k" "write -c -P 9 64k 16k" "write -z 2M 4k" "write -P 10 15M 100k"
qemu-img snapshot -c one ext.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 -o cluster_size=4k top.qcow2
io top.qcow2 "write -P 11 512k 8k" "write -z 0 4k"
qemu-img create -q -f qcow2 -o data_file=data.raw,data_file_raw=on,cluster_size=8k df.qcow2 16M
io df.qcow2 "write -P 12 0 100k" "write -z 1M 8k"
qemu-img create -q -f qcow2 bm.qcow2 16M
qemu-img bitmap --add bm.qcow2 on
qemu-img bitmap --add -g 512 --disable bm.qcow2 off
io bm.qcow2 "write -P 13 0 64k" "write -P 14 4M 1M"
qemu-img bitmap --add bm.qcow2 crashed
qemu-io -f qcow2 -c "write 0 4k" -c abort bm.qcow2 >/dev/null 2>&1 || true
`

// verbSeedNames are the seed images, in the order of FuzzVerbs' image
// number; encSeed is the encrypted one.
var verbSeedNames = []string{"base", "v2", "small", "ext", "top", "df", "bm", "enc"}

const encSeed = 7

// verbSeeds makes the seed images in dir and returns their contents.
func verbSeeds(f *testing.F, dir string) [][]byte {
	sh := exec.Command("bash", "-e", "-c", verbSeedScript)
	sh.Dir = dir
	if out, err := sh.CombinedOutput(); err != nil {
		f.Fatalf("making the seed images: %v\n%s", err, out)
	}
	id, err := bdrv.AddSecretObject("secret,id=fuzzverbs,data=x")
	if err != nil {
		f.Fatal(err)
	}
	defer bdrv.RemoveSecret(id)
	o, err := bdrv.ParseOptionString("encrypt.format=luks,encrypt.iter-time=10,encrypt.key-secret=" + id)
	if err == nil {
		err = coroutine.Run(func(co *coroutine.Co) error {
			return Create(co, CreateOptions{Filename: filepath.Join(dir, "enc.qcow2"), Format: "qcow2", Size: 4 << 20, Options: o, Quiet: true}, io.Discard)
		})
	}
	if err != nil {
		f.Fatal(err)
	}
	var imgs [][]byte
	for _, name := range verbSeedNames {
		b, err := os.ReadFile(filepath.Join(dir, name+".qcow2"))
		if err != nil {
			f.Fatal(err)
		}
		imgs = append(imgs, b)
	}
	return imgs
}

// FuzzVerbs runs the verbs that read untrusted images, info (human, JSON,
// backing chain), check (and a repair), map (human and JSON) and convert
// (to raw, and to qcow2 with bitmaps), on seed images whose first 512 KiB
// (all their metadata) are patched: 10-byte records of a big-endian
// 16-bit word index and the 8 bytes to put there. Each input runs under
// internal/fuzzlimit's bounds: a verb may fail, but never panic, hang,
// allocate without bound, or write a target larger than the image says;
// and on an unpatched seed every verb succeeds (but convert without the
// key of the encrypted one).
//
//	go test -run '^$' -fuzz '^FuzzVerbs$' -fuzztime 5m ./img/
func FuzzVerbs(f *testing.F) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		f.Fatal("qemu-img makes the seed images: apt-get install qemu-utils")
	}
	// The seeds are made in the directory where the inputs run: they
	// name base.qcow2 and data.raw there.
	dir := f.TempDir()
	seeds := verbSeeds(f, dir)
	patch := func(word uint16, v uint64) []byte {
		b := binary.BigEndian.AppendUint16(nil, word)
		return binary.BigEndian.AppendUint64(b, v)
	}
	for i := range seeds {
		// Unpatched: map --output=json (human map refuses compressed
		// clusters) and the other variants plain, then all the other
		// way (--bitmaps refuses version 2 images).
		f.Add(uint8(i), uint8(8), []byte{})
		f.Add(uint8(i), uint8(31), []byte{})
		f.Add(uint8(i), uint8(3), patch(24/8, 1<<50))                // size: 1 PiB
		f.Add(uint8(i), uint8(1), patch(1, 0x100))                   // backing name offset (word 1, byte 8)
		f.Add(uint8(i), uint8(2), patch(48/8, 0))                    // refcount table at 0
		f.Add(uint8(i), uint8(0), patch(0x30000/8, 1<<63|0x10000))   // an L2 entry onto the header area
		f.Add(uint8(i), uint8(1), patch(0x50000/8, 1<<62|0xfffffff)) // compressed garbage
	}
	p, out := filepath.Join(dir, "img.qcow2"), filepath.Join(dir, "out")
	f.Fuzz(func(t *testing.T, which, ops uint8, patches []byte) {
		fuzzlimit.Guard(t, fuzzlimit.Limits{Alloc: 1 << 30})
		img := append([]byte(nil), seeds[int(which)%len(seeds)]...)
		// The plain variants on an unpatched seed must succeed.
		seed := len(patches) < 10 && ops == 8
		for ; len(patches) >= 10; patches = patches[10:] {
			if w := int(binary.BigEndian.Uint16(patches)) * 8; w+8 <= len(img) {
				copy(img[w:], patches[2:10])
			}
		}
		if err := os.WriteFile(p, img, 0o644); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(out)
		coroutine.Run(func(co *coroutine.Co) error {
			for _, err := range runVerbs(t, co, p, out, ops) {
				if seed && err != nil && !(int(which)%len(seeds) == encSeed && errors.As(err, new(*bdrv.KeyError))) {
					t.Errorf("seed image %s: %v", verbSeedNames[int(which)%len(seeds)], err)
				}
			}
			return nil
		})
	})
}

// runVerbs runs the verbs on the image at path, ops choosing among their
// variants, and returns their errors: on a patched image they are
// expected; what the verbs must not do is checked here.
func runVerbs(t *testing.T, co *coroutine.Co, path, out string, ops uint8) []error {
	var errs []error
	size := int64(-1)
	infos, err := Info(co, InfoOptions{Filename: path, BackingChain: ops&1 != 0})
	if err == nil {
		WriteInfoHuman(io.Discard, infos)
		WriteInfoJSON(io.Discard, infos, ops&1 != 0)
		size = infos[0].VirtualSize
	}
	errs = append(errs, err)
	repair := RepairNone
	if ops&2 != 0 {
		repair = RepairAll
	}
	_, err = Check(co, CheckOptions{Filename: path, Repair: repair, JSON: ops&4 != 0}, io.Discard, io.Discard)
	errs = append(errs, err)
	errs = append(errs, Map(co, MapOptions{Filename: path, JSON: ops&8 != 0, MaxLength: -1}, io.Discard))
	opts := ConvertOptions{
		Sources: []string{path}, Target: out, TargetFormat: "raw",
		SparseSize: DefaultSparseSize, Coroutines: DefaultCoroutines,
		SourceCache: bdrv.CacheWriteback, TargetCache: bdrv.CacheUnsafe,
	}
	if ops&16 != 0 {
		opts.TargetFormat, opts.Bitmaps, opts.SkipBroken = "qcow2", true, true
	}
	err = Convert(co, opts)
	errs = append(errs, err)
	if err == nil && size >= 0 && opts.TargetFormat == "raw" {
		st, err := os.Stat(out)
		if err != nil {
			t.Fatalf("convert succeeded: %v", err)
		}
		if st.Size() > (size+511)&^511 {
			t.Fatalf("convert: target of %d bytes for an image of %d", st.Size(), size)
		}
	}
	return errs
}
