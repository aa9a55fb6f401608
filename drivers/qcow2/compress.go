package qcow2

import (
	"bytes"
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
