package rbd

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"ublkimg/bdrv"
	"ublkimg/bdrv/bdrvtest"
	"ublkimg/coroutine"
	"ublkimg/internal/cephtest"
)

// TestOSDRestart restarts the OSD under a write load from 32 coroutines on
// two loops: I/O stalls while the OSD is away and then resumes, with no
// request failing and no write lost (every block reads back as the last
// write that completed on it).
func TestOSDRestart(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts a cluster of its own")
	}
	p := cephtest.NewPrivate(t, cephtest.PrivateOptions{})
	cephtest.Rbd(t, p.Conf, "create", "--size", "64M", cephtest.Pool+"/r")
	const block, blocks = 4096, 16384 // 64 MiB
	var last [blocks]atomic.Uint64    // sequence number of the last completed write per block
	var seq, completed atomic.Uint64
	var stop atomic.Bool
	restarted := make(chan error, 1)
	var longest time.Duration
	bdrvtest.WithNode(t, bdrv.Spec{Filename: cephtest.Spec(p.Conf, "r"), Format: "raw", Cache: bdrv.CacheNone}, func(co *coroutine.Co, n *bdrv.Node) error {
		go func() {
			// Restart once the load runs, and stop it a while after the
			// OSD is back.
			for completed.Load() < 200 {
				time.Sleep(10 * time.Millisecond)
			}
			err := p.RestartOSD()
			after := completed.Load()
			for completed.Load() < after+500 {
				time.Sleep(10 * time.Millisecond)
			}
			stop.Store(true)
			restarted <- err
		}()
		var maxLat atomic.Int64
		err := onLoops(2, 16, func(co *coroutine.Co, loop, i int) error {
			// Each coroutine writes its own blocks (those equal to w
			// modulo 32), one at a time, so the last completed write
			// is what a block must hold.
			w := loop*16 + i
			buf := make([]byte, block)
			for j := 0; !stop.Load(); j++ {
				b := (w + 32*j) % blocks
				s := seq.Add(1)
				for o := 0; o < block; o += 8 {
					binary.LittleEndian.PutUint64(buf[o:], s)
				}
				t0 := time.Now()
				if err := n.Pwritev(co, int64(b)*block, bdrv.IOVec{buf}, 0); err != nil {
					return fmt.Errorf("write of block %d failed: %w", b, err)
				}
				if d := time.Since(t0); int64(d) > maxLat.Load() {
					maxLat.Store(int64(d))
				}
				last[b].Store(s)
				completed.Add(1)
			}
			return nil
		})
		if err != nil {
			return err
		}
		longest = time.Duration(maxLat.Load())
		if err := n.Flush(co); err != nil {
			return err
		}
		buf := make([]byte, block)
		for b := range blocks {
			if err := n.Preadv(co, int64(b)*block, bdrv.IOVec{buf}, 0); err != nil {
				return err
			}
			if got, want := binary.LittleEndian.Uint64(buf), last[b].Load(); got != want {
				return fmt.Errorf("block %d holds write %d, want %d", b, got, want)
			}
		}
		return nil
	})
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d writes, none failed; the longest stalled %v across the OSD restart", completed.Load(), longest.Round(time.Millisecond))
}
