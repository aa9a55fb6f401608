package img

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestInfoQcow2MatchesQemuImg checks what the qcow2 driver reports to info
// (cluster size, dirty bit, format-specific data with bitmaps) against
// qemu-img info, human and JSON.
func TestInfoQcow2MatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	shell(t, dir, `
qemu-img create -q -f qcow2 v3.qcow2 1G
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 10M
qemu-img create -q -f qcow2 -o extended_l2=on,lazy_refcounts=on,refcount_bits=1,cluster_size=128k l2.qcow2 10M
qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 10M
qemu-img create -q -f qcow2 bitmaps.qcow2 10M
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add -g 128k --disable bitmaps.qcow2 b1
qemu-img create -q -f raw base.raw 10M
qemu-img create -q -f qcow2 -b base.raw -F raw overlay.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 10M
qemu-img create -q -f qcow2 corrupt.qcow2 10M
qemu-img create -q -f qcow2 -o data_file="$PWD/data.raw" datafile.qcow2 10M
qemu-io -c "write -P 1 0 2M" datafile.qcow2 >/dev/null
`)
	// Set the dirty bit of one image and the corrupt bit of another
	// (incompatible features, header offset 72).
	for name, bit := range map[string]uint64{"dirty.qcow2": 1, "corrupt.qcow2": 2} {
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], bit)
		f.WriteAt(b[:], 72)
		f.Close()
	}
	for _, name := range []string{"v3.qcow2", "v2.qcow2", "l2.qcow2", "zstd.qcow2", "bitmaps.qcow2", "overlay.qcow2", "dirty.qcow2", "corrupt.qcow2",
		// The disk size counts the image file alone, not the 2 MiB
		// in its data file.
		"datafile.qcow2"} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, name)
			var infos []*ImageInfo
			err := runCo(t, func(co *coroutine.Co) error {
				var err error
				infos, err = Info(co, InfoOptions{Filename: path, BackingChain: true})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			var human, js bytes.Buffer
			WriteInfoHuman(&human, infos)
			WriteInfoJSON(&js, infos, true)
			if want, _, _ := qemuIn(t, dir, "info", "--backing-chain", path); human.String() != want {
				t.Errorf("info:\n%s\nqemu-img:\n%s", human.String(), want)
			}
			if want, _, _ := qemuIn(t, dir, "info", "--backing-chain", "--output=json", path); js.String() != want {
				t.Errorf("info --output=json:\n%s\nqemu-img:\n%s", js.String(), want)
			}
		})
	}
}
