package qcow2

import (
	"bytes"
	"encoding/binary"
	"runtime"
	"testing"

	"github.com/klauspost/compress/zstd"

	"ublkimg/internal/fuzzlimit"
	"ublkimg/internal/qemutest"
)

// zstdParts encodes data as one zstd frame (content checksum on) and
// returns the frame's blocks and its checksum, to be framed again with
// any header by zstdFrame.
func zstdParts(t testing.TB, data []byte) (blocks, crc []byte) {
	t.Helper()
	e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(true))
	if err != nil {
		t.Fatal(err)
	}
	f := e.EncodeAll(data, nil)
	var h zstd.Header
	if err := h.Decode(f); err != nil {
		t.Fatal(err)
	}
	return f[h.HeaderSize : len(f)-4], f[len(f)-4:]
}

// zstdHdr is a frame header to build: wd is the window descriptor
// (ignored for single-segment frames), fcs the size of the frame content
// size field (0, 1 only for single segment, 2, 4, 8).
type zstdHdr struct {
	single bool
	wd     byte
	fcs    int
	crc    bool
}

// zstdFrame builds a frame of header h around blocks (RFC 8878 3.1.1).
func zstdFrame(h zstdHdr, size int, blocks, crc []byte) []byte {
	fhd := map[int]byte{0: 0, 1: 0, 2: 1, 4: 2, 8: 3}[h.fcs] << 6
	if h.single {
		fhd |= 0x20
	}
	if h.crc {
		fhd |= 0x04
	}
	f := binary.LittleEndian.AppendUint32(nil, 0xfd2fb528)
	f = append(f, fhd)
	if !h.single {
		f = append(f, h.wd)
	}
	switch h.fcs {
	case 1:
		f = append(f, byte(size))
	case 2:
		f = binary.LittleEndian.AppendUint16(f, uint16(size-256))
	case 4:
		f = binary.LittleEndian.AppendUint32(f, uint32(size))
	case 8:
		f = binary.LittleEndian.AppendUint64(f, uint64(size))
	}
	f = append(f, blocks...)
	if h.crc {
		f = append(f, crc...)
	}
	return f
}

// Window descriptors (RFC 8878 3.1.1.1.2): exponent<<3 | mantissa, window
// 2^(10+exponent) * (1 + mantissa/8).
const (
	wd64M  = 16 << 3
	wd128M = 17 << 3
	wd1G   = 20 << 3
	wdMax  = 0xff // 3.75 TiB
)

// TestZstdDecompress decodes one cluster from frames of every header form
// QEMU's libzstd accepts, whatever window they declare, plus what follows
// a frame in the compressed sectors; and refuses frames that do not yield
// exactly one cluster.
func TestZstdDecompress(t *testing.T) {
	const cs = 2 << 20
	data := qemutest.Text(1, cs)
	blocks, crc := zstdParts(t, data)
	half := func(i int) []byte {
		b, c := zstdParts(t, data[i*cs/2:(i+1)*cs/2])
		return zstdFrame(zstdHdr{single: true, fcs: 4, crc: true}, cs/2, b, c)
	}
	frame := func(h zstdHdr) []byte { return zstdFrame(h, cs, blocks, crc) }
	skippable := append(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 0x184d2a53), 5), "hello"...)
	long := qemutest.Text(2, cs+1)
	lb, lc := zstdParts(t, long)
	short := half(0)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	badCRC := frame(zstdHdr{wd: wd64M, crc: true})
	badCRC[len(badCRC)-1] ^= 1
	reserved := frame(zstdHdr{single: true, fcs: 4})
	reserved[4] |= 0x08
	badBlock := frame(zstdHdr{single: true, fcs: 4})
	badBlock[9] |= 3 << 1 // first block header: reserved type
	for _, tc := range []struct {
		name string
		src  []byte
		ok   bool
	}{
		{"single segment (QEMU's frames)", frame(zstdHdr{single: true, fcs: 4}), true},
		{"window 64 MiB, no content size", frame(zstdHdr{wd: wd64M}), true},
		{"window 128 MiB, content size", frame(zstdHdr{wd: wd128M, fcs: 4}), true},
		{"window 1 GiB, 8-byte content size, checksum", frame(zstdHdr{wd: wd1G, fcs: 8, crc: true}), true},
		{"window 3.75 TiB", frame(zstdHdr{wd: wdMax}), true},
		{"trailing garbage", cat(frame(zstdHdr{wd: wd64M}), bytes.Repeat([]byte{0xff}, 700)), true},
		{"next cluster's frame follows", cat(frame(zstdHdr{wd: wd64M}), frame(zstdHdr{wd: wd64M})), true},
		{"two frames", cat(half(0), half(1)), true},
		{"skippable frame first", cat(skippable, frame(zstdHdr{wd: wd128M})), true},
		{"content larger than the cluster", zstdFrame(zstdHdr{single: true, fcs: 4}, cs+1, lb, lc), false},
		{"content larger, size unknown", zstdFrame(zstdHdr{wd: wdMax}, cs+1, lb, lc), false},
		{"content shorter, zeros follow", cat(short, make([]byte, 512)), false},
		{"content shorter, nothing follows", short, false},
		{"truncated", frame(zstdHdr{wd: wd64M})[:len(blocks)/2], false},
		{"bad checksum", badCRC, false},
		{"reserved header bit", reserved, false},
		{"reserved block type", badBlock, false},
		{"not a frame", make([]byte, 4096), false},
		{"empty", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := make([]byte, cs)
			err := decompressCluster(CompressionZstd, dst, tc.src)
			if tc.ok != (err == nil) {
				t.Fatalf("error %v, want ok %v", err, tc.ok)
			}
			if tc.ok && !bytes.Equal(dst, data) {
				t.Fatal("wrong data")
			}
		})
	}
}

// TestZstdDecompressMemory: the memory a decompression takes does not
// depend on the window the frame declares (the cluster is the bound).
func TestZstdDecompressMemory(t *testing.T) {
	const cs = 2 << 20
	data := qemutest.Text(3, cs)
	blocks, crc := zstdParts(t, data)
	dst := make([]byte, cs)
	for _, wd := range []byte{wd64M, wd128M, wd1G, wdMax} {
		src := zstdFrame(zstdHdr{wd: wd}, cs, blocks, crc)
		const runs = 20
		// Two collections empty the decoder pool: the first run makes a
		// new decoder, as after any GC in a long-running process.
		runtime.GC()
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range runs {
			if err := decompressCluster(CompressionZstd, dst, src); err != nil {
				t.Fatalf("window descriptor %#x: %v", wd, err)
			}
		}
		runtime.ReadMemStats(&after)
		// A new decoder (the pool may be emptied by a GC, or at random
		// under the race detector) allocates its block buffers, ~300 KiB.
		t.Logf("window descriptor %#x: %d bytes allocated in %d decompressions", wd, after.TotalAlloc-before.TotalAlloc, runs)
		if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 1<<20 {
			t.Errorf("window descriptor %#x: %d bytes allocated per decompression of a %d-byte cluster", wd, per, cs)
		}
	}
}

// FuzzZstdDecompress: any input decompresses to one cluster or fails,
// never allocating for the window its frame header declares.
func FuzzZstdDecompress(f *testing.F) {
	const cs = 64 << 10
	data := qemutest.Text(4, cs)
	blocks, crc := zstdParts(f, data)
	for _, h := range []zstdHdr{{single: true, fcs: 4}, {wd: wd64M}, {wd: wdMax, fcs: 8, crc: true}} {
		f.Add(zstdFrame(h, cs, blocks, crc))
	}
	f.Fuzz(func(t *testing.T, src []byte) {
		fuzzlimit.Guard(t, fuzzlimit.Limits{Alloc: 64 << 20})
		dst := make([]byte, cs)
		if decompressCluster(CompressionZstd, dst, src) == nil {
			if n, _, err := zstdFrameLen(src); err != nil || n > len(src) {
				t.Fatalf("decoded, but frame length %d, %v", n, err)
			}
		}
	})
}
