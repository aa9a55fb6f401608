package ublk

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"ublkimg/ublk/internal/uapi"
)

// Defaults for Config fields left zero.
const (
	// DefaultDepth is the number of tags per queue: enough for fio and
	// the page cache's writeback at depth, small enough that the tags'
	// buffers stay cheap.
	DefaultDepth = 128
	// DefaultBlockSize is the logical block size, what disks and
	// qemu-nbd present.
	DefaultBlockSize = 512
	// DefaultMaxIOBytes is the largest request. Every tag owns a buffer
	// of this size (copy mode hands the kernel the buffer before the
	// request is known), and the kernel's tag allocation cycles through
	// all tags, so a server's buffers end up resident up to
	// Queues*Depth*MaxIOBytes: 128 KiB keeps that at 32 MiB for two
	// queues (64 MiB for four) where ublksrv's 512 KiB would take four
	// times as much, while sequential I/O still moves in 128 KiB requests.
	DefaultMaxIOBytes = 128 << 10
	// MaxDefaultQueues bounds DefaultQueues.
	MaxDefaultQueues = 4
	// MaxQueues and MaxDepth are the kernel's limits on Config.Queues and
	// Config.Depth (UBLK_MAX_NR_QUEUES, UBLK_MAX_QUEUE_DEPTH).
	MaxQueues = uapi.MaxNrQueues
	MaxDepth  = uapi.MaxQueueDepth
)

// DefaultPollMax is attach's poll time (Config.PollMax). In the test
// VM (TCG, 6.12) it doubled the IOPS of 4 KiB reads at depth 1 (on
// ext4: 2515 -> 5095, the loop device 4998; on tmpfs 4728 -> 14002),
// added 32% to depth-1 writes and 11% to 128 KiB reads at depth 4,
// and changed nothing at depth 16 (bench/README.md); 50 µs did not
// help there. Like QEMU's IOThread polling (32 µs by default) it
// costs CPU time only while requests come faster than this.
const DefaultPollMax = 200 * time.Microsecond

// DefaultQueues is the queue count used when Config.Queues is 0:
// min(CPUs, 4). blk-mq maps every CPU to one hardware queue, so with a queue
// per CPU a submitting CPU never shares its queue (and the kernel clamps any
// larger count to the CPUs); past four, each further queue costs a thread, a
// ring and Depth*MaxIOBytes of buffer address space while one image file
// rarely serves more requests in parallel.
func DefaultQueues() int { return min(runtime.NumCPU(), MaxDefaultQueues) }

// DiscardMode says what the device does with discard requests (qemu-nbd's
// --discard).
type DiscardMode int

const (
	// DiscardUnmap advertises discard and deallocates the range in the
	// image (a hole in a raw file, unallocated qcow2 clusters); write-zeroes
	// may deallocate too. It is the zero value.
	DiscardUnmap DiscardMode = iota
	// DiscardIgnore does not advertise discard; write-zeroes writes (or
	// preallocates) zeros and never deallocates.
	DiscardIgnore
)

// ParseDiscardMode parses "unmap" (also "on") or "ignore" (also "off").
func ParseDiscardMode(s string) (DiscardMode, error) {
	switch s {
	case "unmap", "on":
		return DiscardUnmap, nil
	case "ignore", "off":
		return DiscardIgnore, nil
	}
	return 0, fmt.Errorf("invalid discard mode %q (ignore, unmap)", s)
}

func (m DiscardMode) String() string {
	if m == DiscardIgnore {
		return "ignore"
	}
	return "unmap"
}

// Config says how to export an image. The zero value asks for device id 0;
// set ID to -1 to let the kernel pick. Every other zero field takes the
// default its comment names.
type Config struct {
	// ID is N of /dev/ublkbN. -1 lets the kernel pick the lowest free
	// id; 0 and above ask for that id (ADD_DEV fails with ErrIDTaken when
	// it is in use).
	ID int
	// Queues is the number of hardware queues, each served by one locked
	// OS thread with its own io_uring, 1..4096 (UBLK_MAX_NR_QUEUES); the
	// kernel clamps it to the CPU count. 0 means DefaultQueues().
	Queues int
	// Depth is the number of tags (requests in flight) per queue, 1..4096
	// (UBLK_MAX_QUEUE_DEPTH).
	// 0 means DefaultDepth (128).
	Depth int
	// BlockSize is the logical block size: 512, 1024, 2048 or 4096. 0
	// means DefaultBlockSize (512).
	BlockSize int
	// MaxIOBytes is the largest request in bytes, a multiple of the page
	// size of at least one page and at most 32 MiB. 0 means
	// DefaultMaxIOBytes (128 KiB).
	MaxIOBytes int
	// ReadOnly exports the device read-only (UBLK_ATTR_READ_ONLY): the
	// kernel refuses writes with EROFS before they reach the server. A
	// read-only image node forces it.
	ReadOnly bool
	// Discard is what discard requests do; the zero value is
	// DiscardUnmap. An image node that ignores discards (bdrv.Node.Unmap
	// unset: discard=ignore) forces DiscardIgnore.
	Discard DiscardMode
	// UserCopy moves data with read/write on /dev/ublkcN
	// (UBLK_F_USER_COPY, 6.4+) instead of the kernel copying into
	// per-tag buffers during FETCH and COMMIT. Off by default (see the
	// package doc), except for nodes that hand out their data as memory
	// (bdrv.Node.Mappable: a raw image in tmpfs), which get it whenever
	// the kernel has it (Device.Config says whether a device uses it).
	// Start fails with an error matching ErrNotSupported when it is
	// asked for and the kernel lacks it.
	UserCopy bool
	// NoUserCopy turns that automatic choice off: a Mappable node is
	// served in copy mode too. The image's tmpfs pages a mapped READ
	// touches count in the server's RSS and in its OOM score (not in
	// the memory it uses: tmpfs holds them anyway); copy mode maps
	// none. It contradicts UserCopy.
	NoUserCopy bool
	// PollMax lets each queue thread poll its ring for up to this long
	// before it sleeps (adaptive, as QEMU's IOThread poll-max-ns: see
	// coroutine.Config.PollMax). Polling saves the wake-ups of the queue
	// thread (one when a request arrives, one when its image I/O
	// completes) at the cost of CPU time while the device is busy; an
	// idle device does not poll. 0 never polls; ublkimg attach uses
	// DefaultPollMax unless told otherwise.
	PollMax time.Duration
	// Recovery lets the device outlive its server: when the server dies
	// (killed, crashed), the kernel keeps /dev/ublkbN and holds new
	// requests (state QUIESCED) until [Recover] attaches a new server. It
	// asks for UBLK_F_USER_RECOVERY and UBLK_F_USER_RECOVERY_REISSUE.
	//
	// REISSUE decides the requests the dead server had received but not
	// completed. Without it the kernel fails them with EIO: a file system
	// sees failed writes (ext4 aborts its journal), fio's verify stops,
	// although nothing was lost. With it they are requeued and sent to the
	// next server. That is safe for a block device because every request
	// is idempotent: a read, a write of the same data to the same place, a
	// discard, write-zeroes or flush done twice leaves what doing it once
	// does, and the block layer never has two overlapping writes in flight
	// that it expects in order. So no write is dropped, silently or with an
	// error; a write the old server had half done is simply done again.
	// Acknowledged writes survive too, as long as the image keeps them
	// when its writer dies: a raw file does (its data is in the host
	// kernel once written); a format with a write-back metadata cache
	// (qcow2) must write its metadata before acknowledging, which the
	// attach command ensures with the qcow2 open option
	// x-crash-safe-metadata=on.
	Recovery bool
	// Logf receives progress and problem reports (queue start and stop,
	// failed requests). nil discards them.
	Logf func(format string, args ...any)
}

// Check returns the error Start would give for an invalid field of cfg (id,
// queue count, depth, block size, request size) without touching the
// kernel, so that a command can refuse a bad option before it does
// anything else. Zero fields stand for their defaults.
func (cfg Config) Check() error {
	_, err := cfg.withDefaults()
	return err
}

// withDefaults returns cfg with zero fields defaulted, or an error naming
// the first invalid field.
func (cfg Config) withDefaults() (Config, error) {
	if cfg.Queues == 0 {
		cfg.Queues = DefaultQueues()
	}
	if cfg.Depth == 0 {
		cfg.Depth = DefaultDepth
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = DefaultBlockSize
	}
	if cfg.MaxIOBytes == 0 {
		cfg.MaxIOBytes = DefaultMaxIOBytes
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	page := pageSize
	switch {
	case cfg.UserCopy && cfg.NoUserCopy:
		return cfg, errors.New("user copy both asked for and turned off")
	case cfg.ID < -1 || cfg.ID >= 1<<20:
		return cfg, fmt.Errorf("invalid device id %d (0..%d, or -1 for any)", cfg.ID, 1<<20-1)
	case cfg.Queues < 1 || cfg.Queues > MaxQueues:
		return cfg, fmt.Errorf("invalid queue count %d (1..%d)", cfg.Queues, MaxQueues)
	case cfg.Depth < 1 || cfg.Depth > MaxDepth:
		return cfg, fmt.Errorf("invalid queue depth %d (1..%d)", cfg.Depth, MaxDepth)
	case cfg.BlockSize < 512 || cfg.BlockSize > page || cfg.BlockSize&(cfg.BlockSize-1) != 0:
		return cfg, fmt.Errorf("invalid block size %d (a power of two from 512 to %d)", cfg.BlockSize, page)
	case cfg.MaxIOBytes < page || cfg.MaxIOBytes > 1<<uapi.IOBufBits || cfg.MaxIOBytes%page != 0:
		return cfg, fmt.Errorf("invalid maximum request size %d (a multiple of %d up to %d)", cfg.MaxIOBytes, page, 1<<uapi.IOBufBits)
	}
	return cfg, nil
}
