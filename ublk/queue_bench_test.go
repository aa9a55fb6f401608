package ublk

import (
	"path/filepath"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/null"
	"ublkimg/ublk/internal/uapi"
)

// BenchmarkHandle measures the server's cost of one 4 KiB request, from the
// descriptor to the result, without the kernel: on null-co (the stack
// alone: queue, bdrv, the null driver) and on a raw file in the page cache.
// It is the figure the per-queue statistics must not move (see stats.go).
func BenchmarkHandle(b *testing.B) {
	for _, img := range []struct{ name, format, file string }{
		{"null", "null-co", "null-co://"},
		{"raw", "raw", ""},
	} {
		for _, op := range []uapi.IOOp{uapi.IOOpRead, uapi.IOOpWrite} {
			b.Run(img.name+"/"+op.String(), func(b *testing.B) {
				spec := bdrv.Spec{Filename: img.file, Format: img.format, Cache: bdrv.CacheWriteback,
					Options: bdrv.Options{"read-zeroes": "off"}}
				if img.file == "" {
					spec.Filename = filepath.Join(b.TempDir(), "img")
					spec.Options = nil
				}
				err := coroutine.Run(func(co *coroutine.Co) error {
					if img.file == "" {
						if err := bdrv.Create(co, img.format, &bdrv.CreateRequest{Filename: spec.Filename, Size: 16 << 20}); err != nil {
							return err
						}
					}
					node, err := bdrv.Open(co, spec)
					if err != nil {
						return err
					}
					defer node.Close(co)
					q := benchQueue(b, node)
					tg := &tag{buf: bdrv.AlignedBuffer(4096, 4096), iov: bdrv.IOVec{nil}}
					desc := uapi.IODesc{OpFlags: uint32(op), NrSectors: 8}
					b.ResetTimer()
					for i := 0; b.Loop(); i++ {
						desc.StartSector = uint64(i%4096) * 8
						if res := q.handle(co, tg, &desc); res != 4096 {
							b.Fatalf("result %d", res)
						}
					}
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}

// benchQueue is a queue of a device that was never started, serving node.
func benchQueue(tb testing.TB, node *bdrv.Node) *queue {
	cfg, err := Config{}.withDefaults()
	if err != nil {
		tb.Fatal(err)
	}
	return &queue{dev: &Device{cfg: cfg, node: node}}
}
