package file_test

import (
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// TestSignalStormNoCanceled: io_uring cancels (ECANCELED) a request it meant
// to hand to a new io-wq worker when creating the worker, which happens in
// the submitting thread, is interrupted by pending signals too often (the
// kernel's WORKER_INIT_LIMIT, 6.11+). Go sends SIGURG to its threads for
// preemption; the driver resubmits such requests, so writes, flushes and
// fallocates succeed while the loop's thread is flooded with signals.
func TestSignalStormNoCanceled(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	rounds := 0
	for time.Now().Before(deadline) {
		// A new loop each round is a new thread, whose io-wq must
		// create its workers again.
		var tid atomic.Int64
		loop, err := coroutine.Start(coroutine.Config{OnThread: func() error { tid.Store(int64(unix.Gettid())); return nil }})
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				unix.Tgkill(unix.Getpid(), int(tid.Load()), unix.SIGURG)
			}
		}()
		err = loop.Call(func(co *coroutine.Co) error {
			n, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "raw", Cache: bdrv.CacheWriteback})
			if err != nil {
				return err
			}
			defer n.Close(co)
			for i := range 8 {
				// Not whole pages: on ext4 whole pages are written
				// inline (see puntsBufferedWrites), these go to io-wq.
				if err := n.Pwritev(co, int64(i)*4096+512, bdrv.IOVec{make([]byte, 4096)}, bdrv.ReqFUA); err != nil {
					return err
				}
				if err := n.PwriteZeroes(co, int64(i)*65536, 65536, bdrv.ReqMayUnmap); err != nil {
					return err
				}
			}
			return n.Flush(co)
		})
		close(stop)
		wg.Wait()
		loop.Close()
		if err != nil {
			t.Fatalf("round %d: %v", rounds, err)
		}
		rounds++
	}
	t.Logf("%d rounds", rounds)
}
