package qcow2

import (
	"math/rand/v2"
	"testing"

	"ublkimg/coroutine"
)

// benchCluster is a 64 KiB cluster of moderately compressible data.
func benchCluster() []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, 64<<10)
	for i := 0; i < len(b); {
		run := 1 + r.IntN(32)
		v := byte(r.IntN(16))
		for j := 0; j < run && i < len(b); j++ {
			b[i] = v
			i++
		}
	}
	return b
}

// BenchmarkDecompress measures inflating one 64 KiB cluster inline on the
// loop's thread and handed to a worker goroutine with Co.Offload; the
// difference is the hand-off cost that offloadDecompressAbove weighs.
func BenchmarkDecompress(b *testing.B) {
	src := benchCluster()
	for _, ct := range []struct {
		name string
		t    uint8
	}{{"deflate", CompressionDeflate}, {"zstd", CompressionZstd}} {
		comp, err := compressCluster(ct.t, src, len(src))
		if err != nil {
			b.Fatal(err)
		}
		dst := make([]byte, len(src))
		b.Run(ct.name+"/inline", func(b *testing.B) {
			b.SetBytes(int64(len(src)))
			for i := 0; i < b.N; i++ {
				if err := decompressCluster(ct.t, dst, comp); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(ct.name+"/offload", func(b *testing.B) {
			b.SetBytes(int64(len(src)))
			err := coroutine.Run(func(co *coroutine.Co) error {
				for i := 0; i < b.N; i++ {
					var err error
					co.Offload(func() { err = decompressCluster(ct.t, dst, comp) })
					if err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
		b.Run(ct.name+"/compress", func(b *testing.B) {
			b.SetBytes(int64(len(src)))
			for i := 0; i < b.N; i++ {
				if _, err := compressCluster(ct.t, src, len(src)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
