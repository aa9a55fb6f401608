package ublk

import (
	"math/bits"
	"time"

	"ublkimg/ublk/internal/uapi"
)

// Per-queue statistics.
//
// Every queue counts the requests it serves, by operation: requests,
// bytes, errors and a latency histogram, plus the requests in flight. The
// figures are plain fields of the queue, written only by its loop's thread:
// a request costs a few increments on the queue's own cache lines, with no
// lock, no atomic instruction (an atomic store is a locked XCHG on amd64,
// which measured 30 ns a request for seven of them) and no clock read
// (BenchmarkHandle measures it). A reader ([Device.Stats]) gets a copy
// made on the queue's loop, between two requests (Loop.Post).
//
// The latency is the server's: from the moment the queue's loop received the
// request (the io_uring_enter that returned its FETCH or COMMIT_AND_FETCH
// completion) to the moment it received the last completion the request
// waited for (coroutine.Loop.WokeAt, read once per io_uring_enter rather
// than twice per request: two reads of the clock measured 90 ns a request
// on the development machine, more than the rest of the stack on null-co).
// The processing after that last completion, typically well under a
// microsecond, is left out; a request served without any I/O (data in
// the format's cache, a read of a hole) counts as 0.

// StatOp is an operation the statistics are kept for.
type StatOp int

// The operations counted; others (zone operations, which a non-zoned
// device never receives) are not.
const (
	StatRead StatOp = iota
	StatWrite
	StatFlush
	StatDiscard
	StatWriteZeroes
	NumStatOps
)

var statOpNames = [NumStatOps]string{"read", "write", "flush", "discard", "write-zeroes"}

// String is the name used in stats and metrics ("read", "write-zeroes").
func (o StatOp) String() string {
	if o >= 0 && o < NumStatOps {
		return statOpNames[o]
	}
	return "unknown"
}

// statOpOf maps the ublk operations counted to their StatOp, -1 for others.
func statOpOf(op uapi.IOOp) StatOp {
	switch op {
	case uapi.IOOpRead:
		return StatRead
	case uapi.IOOpWrite:
		return StatWrite
	case uapi.IOOpFlush:
		return StatFlush
	case uapi.IOOpDiscard:
		return StatDiscard
	case uapi.IOOpWriteZeroes:
		return StatWriteZeroes
	}
	return -1
}

// The latency histogram is log-linear, as HdrHistogram's: values below 8 ns
// have a bucket each; above, each power of two is split into 8 buckets, so
// a bucket's bounds are within 12.5% of each other. Values from 2^40 ns
// (18 minutes) up share the last bucket.
const (
	histSubBits = 3
	histSub     = 1 << histSubBits
	histMaxExp  = 40
	// HistBuckets is the number of latency buckets.
	HistBuckets = (histMaxExp-histSubBits+1)*histSub + histSub
)

// histBucket returns the bucket of a latency of ns nanoseconds.
func histBucket(ns uint64) int {
	if ns < histSub {
		return int(ns)
	}
	e := bits.Len64(ns) - 1
	if e > histMaxExp {
		return HistBuckets - 1
	}
	sub := int(ns>>(e-histSubBits)) & (histSub - 1)
	return (e-histSubBits+1)<<histSubBits + sub
}

// HistUpper returns the upper bound of bucket i in nanoseconds: the bucket
// holds latencies from HistUpper(i-1) (0 for the first) up to, not
// including, HistUpper(i).
func HistUpper(i int) uint64 {
	if i < histSub {
		return uint64(i) + 1
	}
	e := i>>histSubBits + histSubBits - 1
	sub := uint64(i & (histSub - 1))
	return (histSub + sub + 1) << (e - histSubBits)
}

// opStats are the figures of one operation on one queue. The counters
// every request updates come first, on one cache line; the histogram's
// buckets follow.
type opStats struct {
	requests, bytes, errors, latencySumNs uint64
	buckets                               [HistBuckets]uint64
}

// queueStats are a queue's figures, owned by its loop's thread. The
// padding keeps them off the cache lines of the fields before them, which
// other threads read.
type queueStats struct {
	_        [64]byte
	inFlight uint64
	ops      [NumStatOps]opStats
	_        [64]byte
}

// record counts one request of op that moved n bytes (READ, WRITE), with
// result res and latency ns. Called on the queue's loop.
func (s *queueStats) record(op StatOp, n int64, res int32, ns uint64) {
	if op < 0 {
		return
	}
	o := &s.ops[op]
	o.requests++
	if res < 0 {
		o.errors++
	} else {
		o.bytes += uint64(n)
	}
	o.latencySumNs += ns
	o.buckets[histBucket(ns)]++
}

// OpStats are the figures of one operation, cumulative since the device
// (or its current server) started.
type OpStats struct {
	Requests uint64 `json:"requests"`
	// Bytes moved by successful requests (READ, WRITE), or covered
	// (DISCARD, WRITE_ZEROES); 0 for FLUSH.
	Bytes  uint64 `json:"bytes"`
	Errors uint64 `json:"errors"`
	// LatencySumNs is the sum of all latencies, for averages.
	LatencySumNs uint64 `json:"latency-sum-ns"`
	// Latency holds the non-empty buckets of the latency histogram.
	Latency []HistBucket `json:"latency,omitempty"`
}

// HistBucket is one bucket of a latency histogram: Count requests took
// less than UpperNs nanoseconds and at least the previous bucket's UpperNs.
type HistBucket struct {
	UpperNs uint64 `json:"le-ns"`
	Count   uint64 `json:"count"`
}

// QueueStats are one queue's figures.
type QueueStats struct {
	Queue    int    `json:"queue"`
	InFlight uint64 `json:"in-flight"`
	// Ops are the figures by operation name (StatOp.String).
	Ops map[string]OpStats `json:"ops"`
}

// snapshot copies the figures; called on the queue's loop, or once
// nothing writes them any more.
func (s *queueStats) snapshot(id int) QueueStats {
	out := QueueStats{Queue: id, InFlight: s.inFlight, Ops: make(map[string]OpStats, NumStatOps)}
	for op := range NumStatOps {
		o := &s.ops[op]
		d := OpStats{Requests: o.requests, Bytes: o.bytes, Errors: o.errors, LatencySumNs: o.latencySumNs}
		for i := range o.buckets {
			if c := o.buckets[i]; c > 0 {
				d.Latency = append(d.Latency, HistBucket{UpperNs: HistUpper(i), Count: c})
			}
		}
		out.Ops[op.String()] = d
	}
	return out
}

// Counter is a figure the image's format driver keeps (bdrv.Counter).
type Counter struct {
	Name  string `json:"name"`
	Value uint64 `json:"value"`
}

// DeviceStats are a device's figures at one moment, as [Device.Stats]
// returns them and the control command query-stats sends them.
type DeviceStats struct {
	ID     int    `json:"id"`
	Device string `json:"device"`
	Image  string `json:"image"`
	Format string `json:"format"`
	// UptimeNs is the time since the server started serving the device.
	UptimeNs uint64       `json:"uptime-ns"`
	Queues   []QueueStats `json:"queues"`
	// FormatCounters are the format driver's own figures (qcow2: cache
	// hits and misses, clusters allocated, copy-on-write bytes).
	FormatCounters []Counter `json:"format-counters,omitempty"`
}

// Total sums the figures of every queue for op.
func (s *DeviceStats) Total(op StatOp) OpStats {
	var t OpStats
	hist := map[uint64]uint64{}
	for _, q := range s.Queues {
		o := q.Op(op)
		t.Requests += o.Requests
		t.Bytes += o.Bytes
		t.Errors += o.Errors
		t.LatencySumNs += o.LatencySumNs
		for _, b := range o.Latency {
			hist[b.UpperNs] += b.Count
		}
	}
	for i := range HistBuckets {
		if c := hist[HistUpper(i)]; c > 0 {
			t.Latency = append(t.Latency, HistBucket{UpperNs: HistUpper(i), Count: c})
		}
	}
	return t
}

// InFlight sums the requests in flight on every queue.
func (s *DeviceStats) InFlight() uint64 {
	var n uint64
	for _, q := range s.Queues {
		n += q.InFlight
	}
	return n
}

// Op returns the figures of op.
func (q QueueStats) Op(op StatOp) OpStats { return q.Ops[op.String()] }

// Sub returns the figures of o minus those of an earlier snapshot prev of
// the same operation: what happened in between.
func (o OpStats) Sub(prev OpStats) OpStats {
	d := OpStats{Requests: o.Requests - prev.Requests, Bytes: o.Bytes - prev.Bytes,
		Errors: o.Errors - prev.Errors, LatencySumNs: o.LatencySumNs - prev.LatencySumNs}
	old := map[uint64]uint64{}
	for _, b := range prev.Latency {
		old[b.UpperNs] = b.Count
	}
	for _, b := range o.Latency {
		if c := b.Count - old[b.UpperNs]; c > 0 {
			d.Latency = append(d.Latency, HistBucket{UpperNs: b.UpperNs, Count: c})
		}
	}
	return d
}

// Percentile returns the latency below which a fraction p (0.5, 0.99) of
// the requests completed, as the upper bound of the bucket holding that
// rank (at most 12.5% above the true value), or 0 without requests.
func (o OpStats) Percentile(p float64) time.Duration {
	var total uint64
	for _, b := range o.Latency {
		total += b.Count
	}
	if total == 0 {
		return 0
	}
	rank := uint64(p*float64(total) + 0.5)
	rank = min(max(rank, 1), total)
	var seen uint64
	for _, b := range o.Latency {
		seen += b.Count
		if seen >= rank {
			return time.Duration(b.UpperNs)
		}
	}
	return time.Duration(o.Latency[len(o.Latency)-1].UpperNs)
}

// statsSnapshot copies q's figures on its loop, or directly once the loop
// is gone (or never served): then nothing writes them.
func (q *queue) statsSnapshot(d *Device) QueueStats {
	ch := make(chan QueueStats, 1)
	if d.postQueue(q, func() { ch <- q.stats.snapshot(int(q.id)) }) {
		return <-ch
	}
	if q.loop != nil && q.armed {
		q.loop.Close() // waits until the loop's thread is done with q
	}
	return q.stats.snapshot(int(q.id))
}
