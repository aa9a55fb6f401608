package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Cluster compression (QEMU's block/qcow2-threads.c).
//
// Deflate streams are raw (no zlib header) and must only refer back 4 KiB:
// QEMU inflates with windowBits -12 and rejects longer distances, so
// compression uses klauspost/compress's custom-window encoder with a 4 KiB
// window. Zstd streams are ordinary frames. Decompression must produce
// exactly one cluster and ignores whatever follows the stream in the sectors
// the descriptor covers (the next compressed cluster may start there).
//
// A zstd frame header declares a window of up to 3.75 TiB, which a
// streaming decoder would allocate. The output here is one cluster, so no
// match can reach further back than the cluster's start: frames are
// delimited (zstdFrameLen) and decoded whole into the cluster buffer
// (DecodeAll, output capped at the cluster), whatever window they declare.
// Memory is then the cluster plus the decoder's block buffers (~300 KiB),
// where QEMU's ZSTD_decompressStream allocates the declared window (and
// refuses windows above 128 MiB).

// deflateWindow is the window QEMU's inflate accepts (windowBits -12).
const deflateWindow = 4096

// errNoFit reports data that does not compress below a cluster: it is then
// written uncompressed, as QEMU does.
var errNoFit = errors.New("qcow2: data does not compress")

var (
	inflaters = sync.Pool{New: func() any { return flate.NewReader(nil) }}
	deflaters = sync.Pool{New: func() any {
		w, err := flate.NewWriterWindow(nil, deflateWindow)
		if err != nil {
			panic(err) // constant arguments
		}
		return w
	}}
	zstdDecoders = sync.Pool{New: func() any {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(zstdMaxWindow), zstd.WithDecoderMaxMemory(zstdMaxWindow),
			zstd.WithDecodeAllCapLimit(true))
		if err != nil {
			panic(err) // constant arguments
		}
		return d
	}}
	zstdEncoder = sync.OnceValue(func() *zstd.Encoder {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
		if err != nil {
			panic(err)
		}
		return e
	})
)

// decompressCluster fills dst (one cluster) from the compressed stream in
// src. It fails unless the stream yields at least len(dst) bytes.
func decompressCluster(ctype uint8, dst, src []byte) error {
	switch ctype {
	case CompressionDeflate:
		r := inflaters.Get().(io.ReadCloser)
		defer inflaters.Put(r)
		if err := r.(flate.Resetter).Reset(bytes.NewReader(src), nil); err != nil {
			return err
		}
		_, err := io.ReadFull(r, dst)
		return err
	case CompressionZstd:
		return zstdDecompress(dst, src)
	}
	return fmt.Errorf("qcow2: unknown compression type %d", ctype)
}

// zstdMaxWindow is the largest window a frame header can declare
// (exponent 31, mantissa 7): every frame is accepted, since the window
// costs no memory here.
const zstdMaxWindow = 1<<41 + 7<<38

// zstdDecompress fills dst from the zstd frames at the start of src, as
// QEMU's qcow2_zstd_decompress: frames are decoded until dst is full, a
// frame that would overflow it is an error, and whatever follows the frame
// that fills it is ignored.
func zstdDecompress(dst, src []byte) error {
	d := zstdDecoders.Get().(*zstd.Decoder)
	defer zstdDecoders.Put(d)
	// The capacity caps DecodeAll's output at the cluster.
	out := dst[:0:len(dst)]
	for len(out) < len(dst) {
		n, skip, err := zstdFrameLen(src)
		if err != nil {
			return err
		}
		frame := src[:n]
		src = src[n:]
		if skip {
			continue
		}
		if out, err = d.DecodeAll(frame, out); err != nil {
			return err
		}
	}
	if &out[0] != &dst[0] {
		copy(dst, out) // not reached: DecodeAll never outgrows the cap
	}
	return nil
}

// errZstdTruncated reports a frame that runs past the compressed data.
var errZstdTruncated = errors.New("zstd: frame truncated")

// zstdFrameLen returns the length of the zstd frame at the start of src
// (RFC 8878 section 3.1) and whether it is a skippable frame, by walking
// its header and block headers without decoding.
func zstdFrameLen(src []byte) (n int, skip bool, err error) {
	if len(src) < 8 {
		return 0, false, errZstdTruncated
	}
	magic := binary.LittleEndian.Uint32(src)
	if magic&^0xf == 0x184d2a50 {
		n := 8 + uint64(binary.LittleEndian.Uint32(src[4:]))
		if n > uint64(len(src)) {
			return 0, false, errZstdTruncated
		}
		return int(n), true, nil
	}
	if magic != 0xfd2fb528 {
		return 0, false, zstd.ErrMagicMismatch
	}
	fhd := src[4]
	if fhd&0x08 != 0 {
		return 0, false, errors.New("zstd: reserved bit set in the frame header")
	}
	single := fhd&0x20 != 0
	n = 5 + [4]int{0, 1, 2, 4}[fhd&3] // descriptor, dictionary ID
	if !single {
		n++ // window descriptor
	}
	switch fcs := fhd >> 6; {
	case fcs == 0 && single:
		n++
	case fcs > 0:
		n += 1 << fcs
	}
	for {
		if n+3 > len(src) {
			return 0, false, errZstdTruncated
		}
		bh := uint32(src[n]) | uint32(src[n+1])<<8 | uint32(src[n+2])<<16
		n += 3
		switch bh >> 1 & 3 {
		case 0, 2: // raw, compressed
			n += int(bh >> 3)
		case 1: // RLE: one byte repeated
			n++
		default:
			return 0, false, zstd.ErrReservedBlockType
		}
		if bh&1 != 0 {
			break
		}
	}
	if fhd&0x04 != 0 {
		n += 4 // content checksum
	}
	if n > len(src) {
		return 0, false, errZstdTruncated
	}
	return n, false, nil
}

// compressCluster compresses src into a new buffer of at most maxLen bytes,
// or returns errNoFit.
func compressCluster(ctype uint8, src []byte, maxLen int) ([]byte, error) {
	var out []byte
	switch ctype {
	case CompressionDeflate:
		var buf bytes.Buffer
		buf.Grow(len(src) + 64)
		w := deflaters.Get().(*flate.Writer)
		defer deflaters.Put(w)
		w.Reset(&buf)
		if _, err := w.Write(src); err != nil {
			return nil, err
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
		out = buf.Bytes()
	case CompressionZstd:
		out = zstdEncoder().EncodeAll(src, make([]byte, 0, len(src)))
	default:
		return nil, fmt.Errorf("qcow2: unknown compression type %d", ctype)
	}
	if len(out) > maxLen {
		return nil, errNoFit
	}
	return out, nil
}

// offloadDecompressAbove is the cluster size above which decompression runs
// on a worker goroutine instead of the loop's thread. BenchmarkDecompress
// (2-core EPYC): inflating 64 KiB takes 120-500 us, which would stall every
// other coroutine of the loop, while the hand-off cost of Co.Offload is
// lost in that noise; clusters up to 8 KiB inflate in a few microseconds.
var offloadDecompressAbove = 8 << 10

// clusterCache keeps the last few decompressed clusters, so that small
// sequential reads of a compressed cluster inflate it once rather than once
// per request, and makes concurrent readers of one cluster wait for a
// single decompression. Entries are keyed by the compressed descriptor and
// dropped whenever a host cluster is freed (gen changes), so a descriptor
// that comes back for new data never finds stale content.
type clusterCache struct {
	mu      coroutine.Mutex // never held across I/O or decompression
	gen     atomic.Uint64
	tick    uint64
	entries [4]struct {
		desc, gen, lru uint64
		data           []byte
	}
	// busy holds the descriptors being decompressed; readers of the same
	// cluster wait on the queue.
	busy map[uint64]*coroutine.Queue
}

// lookupLocked copies bytes [off, off+len(dst)) of the cached cluster for
// desc into dst and reports whether it was there. Called with c.mu held.
func (c *clusterCache) lookupLocked(desc, off uint64, dst bdrv.IOVec) bool {
	gen := c.gen.Load()
	for i := range c.entries {
		e := &c.entries[i]
		if e.data != nil && e.desc == desc && e.gen == gen {
			c.tick++
			e.lru = c.tick
			dst.CopyFrom(e.data[off:off+uint64(dst.Len())], 0)
			return true
		}
	}
	return false
}

// storeLocked remembers a decompressed cluster; gen is the generation read
// before decompressing. Called with c.mu held.
func (c *clusterCache) storeLocked(desc, gen uint64, data []byte) {
	if gen != c.gen.Load() {
		return
	}
	v := 0
	for i := range c.entries {
		if c.entries[i].data == nil || c.entries[i].gen != gen {
			v = i
			break
		}
		if c.entries[i].lru < c.entries[v].lru {
			v = i
		}
	}
	e := &c.entries[v]
	c.tick++
	if cap(e.data) < len(data) {
		e.data = make([]byte, len(data))
	}
	e.data = e.data[:len(data)]
	copy(e.data, data)
	e.desc, e.gen, e.lru = desc, gen, c.tick
}

// invalidate forgets everything (a host cluster was freed). It needs no
// lock: entries of an older generation are never used.
func (c *clusterCache) invalidate() { c.gen.Add(1) }

// read serves a read of len(dst) bytes at off within the compressed
// cluster desc from the cache, or claims the cluster for decompression: it
// returns (true, _) when dst was filled, else (false, done) and the caller
// must decompress and then call done with the cluster (or nil on failure).
// Concurrent readers of the same cluster wait for that instead of
// inflating it again.
func (c *clusterCache) read(co *coroutine.Co, desc, off uint64, dst bdrv.IOVec) (bool, func([]byte)) {
	c.mu.Lock(co)
	for {
		if c.lookupLocked(desc, off, dst) {
			c.mu.Unlock(co)
			return true, nil
		}
		q := c.busy[desc]
		if q == nil {
			break
		}
		q.Wait(co, &c.mu)
	}
	if c.busy == nil {
		c.busy = make(map[uint64]*coroutine.Queue)
	}
	q := &coroutine.Queue{}
	c.busy[desc] = q
	gen := c.gen.Load()
	c.mu.Unlock(co)
	return false, func(data []byte) {
		c.mu.Lock(co)
		if data != nil {
			c.storeLocked(desc, gen, data)
		}
		delete(c.busy, desc)
		q.RestartAll(co)
		c.mu.Unlock(co)
	}
}

// decompress runs decompressCluster, offloaded for large clusters.
func (img *Image) decompress(co *coroutine.Co, dst, src []byte) error {
	ctype := img.hdr.CompressionType
	if len(dst) <= offloadDecompressAbove {
		return decompressCluster(ctype, dst, src)
	}
	var err error
	co.Offload(func() { err = decompressCluster(ctype, dst, src) })
	return err
}

// compress runs compressCluster on a worker goroutine.
func (img *Image) compress(co *coroutine.Co, src []byte, maxLen int) ([]byte, error) {
	ctype := img.hdr.CompressionType
	var out []byte
	var err error
	co.Offload(func() { out, err = compressCluster(ctype, src, maxLen) })
	return out, err
}
