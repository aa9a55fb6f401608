package img

import (
	"errors"
	"fmt"
	"io"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Defaults of qemu-img bench.
const (
	DefaultBenchCount   = 75000
	DefaultBenchDepth   = 64
	DefaultBenchBufSize = 4096
)

// BenchOptions are qemu-img bench's arguments.
type BenchOptions struct {
	Filename string
	Format   string // "" probes
	// Count (-c) is the number of requests.
	Count int
	// Depth (-d) is the number of requests in flight.
	Depth int
	// Offset (-o) is where the first request starts.
	Offset int64
	// BufSize (-s) is the size of each request.
	BufSize int
	// Step (-S) is the distance between the offsets of consecutive
	// requests; 0 means BufSize.
	Step int
	// Cache (-t), writeback by default.
	Cache bdrv.CacheMode
	// Write (-w) sends writes of the Pattern byte instead of reads.
	Write   bool
	Pattern byte
	// FlushInterval (--flush-interval), write tests only: flush whenever
	// the number of requests left to send is a multiple of it. Unless
	// NoDrain, the requests in flight complete first and none are sent
	// until the flush is done.
	FlushInterval int
	NoDrain       bool
	// Native (-n, or -i native) asks for Linux native AIO, which QEMU
	// allows only with O_DIRECT; ublkimg always uses io_uring, so it only
	// checks the cache mode as qemu-img does.
	Native     bool
	ForceShare bool
}

// BenchResult is the outcome of a run.
type BenchResult struct {
	// Elapsed is the wall-clock time from the first request to the
	// completion of the last (a final flush is not counted, as in
	// qemu-img).
	Elapsed time.Duration
}

// bench is one run's shared state (QEMU's BenchData). Only coroutines of
// one loop touch it, so it needs no lock: every field changes between
// yields.
type bench struct {
	node      *bdrv.Node
	imageSize int64
	bufSize   int64
	step      int64
	offset    int64 // of the next request
	n         int   // requests not yet completed
	inFlight  int
	write     bool
	interval  int
	drain     bool

	flushing bool            // a drained flush is in progress or pending
	gate     coroutine.Queue // workers parked while the queue drains for a flush
	err      error
	end      time.Time
	running  int // worker and undrained-flush coroutines alive
	doneQ    coroutine.Queue
}

// Bench runs qemu-img bench: Count reads (or writes) of BufSize bytes,
// Depth in flight, the i-th at Offset + i*Step wrapped modulo the image
// size. It prints qemu-img's lines on out: "Sending N read requests, S
// bytes each, D in parallel (starting at offset O, step size T)", the
// flush interval if any, and "Run completed in X.XXX seconds.". Any failed
// request ends the run with "Failed request: <strerror>".
func Bench(co *coroutine.Co, opts BenchOptions, out io.Writer) (BenchResult, error) {
	if out == nil {
		out = io.Discard
	}
	if !opts.Write && opts.FlushInterval != 0 {
		return BenchResult{}, errors.New("--flush-interval is only available in write tests")
	}
	if opts.FlushInterval != 0 && opts.FlushInterval < opts.Depth {
		return BenchResult{}, errors.New("Flush interval can't be smaller than depth")
	}
	if opts.Depth <= 0 && opts.Count > 0 {
		// qemu-img accepts -d 0 and then waits forever.
		return BenchResult{}, errors.New("Invalid queue depth specified")
	}
	if opts.Native && !opts.Cache.Direct() {
		return BenchResult{}, openError(opts.Filename, errors.New("aio=native was specified, but it requires cache.direct=on, which was not specified."))
	}

	s := openSpec{filename: opts.Filename, format: opts.Format, cache: opts.Cache, readOnly: !opts.Write}
	if opts.ForceShare {
		s.options = bdrv.Options{bdrv.OptForceShare: "on"}
	}
	node, err := openImage(co, s)
	if err != nil {
		return BenchResult{}, err
	}
	defer node.Close(co)

	step := opts.Step
	if step == 0 {
		step = opts.BufSize
	}
	b := &bench{
		node:      node,
		imageSize: qemuLength(node),
		bufSize:   int64(opts.BufSize),
		step:      int64(step),
		offset:    opts.Offset,
		n:         opts.Count,
		write:     opts.Write,
		interval:  opts.FlushInterval,
		drain:     !opts.NoDrain,
	}
	rw := "read"
	if opts.Write {
		rw = "write"
	}
	fmt.Fprintf(out, "Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %d, step size %d)\n",
		opts.Count, rw, opts.BufSize, opts.Depth, opts.Offset, step)
	if opts.FlushInterval != 0 {
		fmt.Fprintf(out, "Sending flush every %d requests\n", opts.FlushInterval)
	}

	// No more than Count requests can ever be in flight, so a huge -d
	// needs no more buffers than that.
	workers := min(opts.Depth, opts.Count)
	align := max(4096, node.Limits().MinMemAlignment)
	buf := bdrv.AlignedBuffer(max(workers, 1)*opts.BufSize, align)
	if opts.Pattern != 0 {
		for i := range buf {
			buf[i] = opts.Pattern
		}
	}

	start := time.Now()
	b.end = start
	b.running = workers
	for i := range workers {
		iov := bdrv.IOVec{buf[i*opts.BufSize : (i+1)*opts.BufSize]}
		co.Loop().Go(func(wco *coroutine.Co) { b.worker(wco, iov) })
	}
	for b.running > 0 {
		b.doneQ.Wait(co, nil)
	}
	if b.err != nil {
		return BenchResult{}, b.err
	}
	elapsed := b.end.Sub(start)
	fmt.Fprintf(out, "Run completed in %.3f seconds.\n", elapsed.Seconds())
	return BenchResult{Elapsed: elapsed}, nil
}

// worker keeps one request in flight until none is left to send: the
// coroutine form of bench_cb, one per queue slot. iov is its buffer, built
// once so that the request path allocates nothing.
func (b *bench) worker(co *coroutine.Co, iov bdrv.IOVec) {
	defer b.exit(co)
	defer recoverTo(func(err error) { b.fail(co, err) })
	for b.err == nil && b.n > b.inFlight {
		off := b.offset
		b.inFlight++
		b.offset += b.step
		if b.imageSize > 0 {
			b.offset %= b.imageSize
		} else {
			b.offset = 0
		}

		var err error
		if off > b.imageSize || b.imageSize-off < b.bufSize {
			// BlockBackend refuses requests past the end
			// (blk_check_byte_request); bdrv would read zeros.
			err = unix.EIO
		} else if b.write {
			err = b.node.Pwritev(co, off, iov, 0)
		} else {
			err = b.node.Preadv(co, off, iov, 0)
		}
		if err != nil {
			b.fail(co, fmt.Errorf("Failed request: %s", Strerror(err)))
			return
		}

		// Completion: the number of requests still to be sent decides
		// whether a flush is due.
		remaining := b.n - b.inFlight
		b.n--
		b.inFlight--
		if b.n == 0 {
			b.end = time.Now()
		}
		if b.interval == 0 || remaining%b.interval != 0 {
			continue
		}
		if !b.drain {
			b.running++
			co.Loop().Go(b.undrainedFlush)
			continue
		}
		if b.inFlight > 0 {
			// Wait for the other requests in flight; the last one to
			// complete flushes and lets everyone go on.
			b.flushing = true
			for b.flushing && b.err == nil {
				b.gate.Wait(co, nil)
			}
			continue
		}
		err = b.node.Flush(co)
		b.flushing = false
		b.gate.RestartAll(co)
		if err != nil {
			b.fail(co, fmt.Errorf("Failed flush request: %s", Strerror(err)))
			return
		}
	}
}

// undrainedFlush is a --no-drain flush: it runs beside the requests.
func (b *bench) undrainedFlush(co *coroutine.Co) {
	defer b.exit(co)
	if err := b.node.Flush(co); err != nil {
		b.fail(co, fmt.Errorf("Failed flush request: %s", Strerror(err)))
	}
}

func (b *bench) fail(co *coroutine.Co, err error) {
	if b.err == nil {
		b.err = err
	}
	b.gate.RestartAll(co)
}

func (b *bench) exit(co *coroutine.Co) {
	b.running--
	if b.running == 0 {
		b.doneQ.RestartAll(co)
	}
}
