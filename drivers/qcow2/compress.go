package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"

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
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxWindow(64<<20), zstd.WithDecoderMaxMemory(64<<20))
		if err != nil {
			panic(err)
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
		d := zstdDecoders.Get().(*zstd.Decoder)
		defer zstdDecoders.Put(d)
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			return err
		}
		_, err := io.ReadFull(d, dst)
		d.Reset(nil)
		return err
	}
	return fmt.Errorf("qcow2: unknown compression type %d", ctype)
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
// on a worker goroutine instead of the loop's thread (BenchmarkDecompress:
// inflating a 64 KiB cluster costs about as much as the hand-off).
var offloadDecompressAbove = 64 << 10

// clusterCache keeps the last few decompressed clusters, so that small
// sequential reads of a compressed cluster inflate it once rather than once
// per request. Entries are keyed by the compressed descriptor and dropped
// whenever a host cluster is freed (gen changes), so a descriptor that comes
// back for new data never finds stale content.
type clusterCache struct {
	mu      sync.Mutex
	gen     uint64
	entries [4]struct {
		desc, gen, lru uint64
		data           []byte
	}
	tick uint64
}

// lookup copies bytes [off, off+len(dst)) of the cached cluster for desc
// into dst and reports whether it was there.
func (c *clusterCache) lookup(desc, off uint64, dst bdrv.IOVec) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.entries {
		e := &c.entries[i]
		if e.data != nil && e.desc == desc && e.gen == c.gen {
			c.tick++
			e.lru = c.tick
			dst.CopyFrom(e.data[off:off+uint64(dst.Len())], 0)
			return true
		}
	}
	return false
}

// store remembers a decompressed cluster; gen is the generation read
// before decompressing.
func (c *clusterCache) store(desc, gen uint64, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	v := 0
	for i := range c.entries {
		if c.entries[i].data == nil || c.entries[i].gen != c.gen {
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
	e.desc, e.gen, e.lru = desc, c.gen, c.tick
}

// generation returns the current generation.
func (c *clusterCache) generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

// invalidate forgets everything (a host cluster was freed).
func (c *clusterCache) invalidate() {
	c.mu.Lock()
	c.gen++
	c.mu.Unlock()
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
