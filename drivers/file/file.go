// Package file is the protocol driver for regular files and host block
// devices (QEMU's file-posix). Data I/O goes through the calling
// coroutine's io_uring ring: reads and writes, fdatasync for flush, and
// fallocate for write-zeroes and discard. Where io_uring would only hand
// the work to one of its worker threads, the driver makes the system call
// on the calling thread instead: all I/O of files in memory (tmpfs), and
// buffered writes of whole pages on ext4 (see fileSystem and
// puntsBufferedWrites).
//
// With cache mode none (O_DIRECT) requests reach the driver aligned to the
// device's logical block size (the generic layer pads them), and buffers
// whose addresses or lengths are not aligned go through an aligned bounce
// buffer.
package file

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

func init() {
	bdrv.Register(&bdrv.Format{
		Name:          "file",
		Protocol:      true,
		Open:          open,
		Create:        create,
		CreateOptions: bdrv.ProtocolCreateOptions,
	})
}

type driver struct {
	node     *bdrv.Node
	fd       int
	blockDev bool
	direct   bool
	// align is the request and buffer alignment O_DIRECT needs; 1 without
	// O_DIRECT.
	align int64
	// noZeroRange and noPunch remember that the filesystem refused
	// fallocate modes, so later requests fall back without a syscall. Any
	// queue's loop may set them while the others read them.
	noZeroRange, noPunch atomic.Bool
	// locking: the image locks are taken (the locking option), when the
	// opener says what the node's users need (SetPerm). forceShare
	// (force-share=on, read-only only) shares everything.
	locking, forceShare bool
	// locked: fd holds image lock bytes, released before it is closed.
	locked bool
	// inline: the file lives in memory (tmpfs, ramfs), where a read or
	// write is a copy that never waits for a device. Such file systems
	// cannot do non-blocking I/O, so io_uring would hand every request to
	// an io-wq worker thread; the driver does them synchronously on the
	// calling thread instead (see fileSystem).
	inline bool
	// inlineWrites: buffered writes of whole pages go out as pwritev on
	// the calling thread too, on file systems where io_uring would hand
	// every buffered write to an io-wq worker (see puntsBufferedWrites).
	inlineWrites bool
	// mappable: the file is in tmpfs, whose pages MappedRange hands out
	// (mapped.go).
	mappable bool
	maps     mapState
	// eof orders the requests that extend the file, as QEMU's
	// raw_do_pwrite_zeroes does: a write-zeroes past the end of the
	// file (fallocate growing it) runs alone, writes past the end share
	// the lock. XFS loses writes past the end that race with such an
	// fallocate, and ext4 allocates the blocks of concurrent extending
	// fallocates out of order, fragmenting a growing qcow2 image (1490
	// extents instead of 14 for 100000 allocating 4 KiB writes, and
	// writeback then costs twice as long).
	eof coroutine.RWMutex
}

func open(co *coroutine.Co, n *bdrv.Node, opts bdrv.Options) (bdrv.Driver, error) {
	if err := checkOpenOptions(n, opts); err != nil {
		return nil, err
	}
	// O_NONBLOCK until setup has seen a regular file or a block device:
	// an image may name any file as its backing or data file, and
	// opening a FIFO for reading would wait for a writer (O_NOCTTY: nor
	// may a terminal become the controlling one).
	flags := unix.O_CLOEXEC | unix.O_NONBLOCK | unix.O_NOCTTY
	if n.ReadOnly {
		flags |= unix.O_RDONLY
	} else {
		flags |= unix.O_RDWR
	}
	direct := n.Cache.Direct()
	if direct {
		flags |= unix.O_DIRECT
	}
	// Opening is control-path work done before any I/O, like QEMU's
	// raw_open; it does not go through the ring.
	fd, err := openRetry(n.Filename, flags, 0)
	if canDegrade(err) && n.AutoReadOnly && !n.ReadOnly {
		// auto-read-only=on: a file that may not be written opens
		// read-only, as QEMU's raw_open_common degrades it; the opener
		// allows this only where the node's users just read.
		flags = flags&^unix.O_RDWR | unix.O_RDONLY
		if fd, err = openRetry(n.Filename, flags, 0); err == nil {
			n.ReadOnly = true
		}
	}
	if err != nil {
		return nil, fmt.Errorf("Could not open '%s': %w", n.Filename, syscallErr(err))
	}
	d := &driver{node: n, fd: fd, direct: direct, align: 1}
	if err := d.setup(opts); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return d, nil
}

// canDegrade reports the errors of a read-write open that a read-only one
// may not meet: no permission to write, or a read-only file system.
func canDegrade(err error) bool {
	return err == unix.EACCES || err == unix.EPERM || err == unix.EROFS
}

func openRetry(name string, flags int, perm uint32) (int, error) {
	for {
		fd, err := unix.Open(name, flags, perm)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// syscallErr makes an errno read the way qemu-img prints it ("No such file
// or directory"): uring's Errno with the C library's text.
func syscallErr(err error) error {
	var errno unix.Errno
	if errors.As(err, &errno) {
		return uring.NewErrno(errno, true)
	}
	return err
}

func (d *driver) setup(opts bdrv.Options) error {
	n := d.node
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return fmt.Errorf("Could not stat '%s': %w", n.Filename, syscallErr(err))
	}
	// Anything else (FIFO, socket, character device, directory) is
	// refused before any read: /dev/zero or a FIFO named by a hostile
	// image would read forever or block. QEMU's host_device driver takes
	// character devices; this driver does not.
	mode := st.Mode & unix.S_IFMT
	if mode != unix.S_IFREG && mode != unix.S_IFBLK {
		return fmt.Errorf("'file' driver requires '%s' to be a regular file or a block device", n.Filename)
	}
	fl, err := unix.FcntlInt(uintptr(d.fd), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(uintptr(d.fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
	}
	if err != nil {
		return fmt.Errorf("Could not open '%s': %w", n.Filename, syscallErr(err))
	}
	if mode == unix.S_IFREG {
		n.SetLength(st.Size)
	} else {
		d.blockDev = true
		var size uint64
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(d.fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
		if e != 0 {
			err := error(e)
			return fmt.Errorf("'%s': cannot get block device size: %w", n.Filename, syscallErr(err))
		}
		n.SetLength(int64(size))
	}
	if mode == unix.S_IFREG {
		fsType := fileSystem(d.fd)
		d.inline = fsType == tmpfsMagic || fsType == ramfsMagic
		d.mappable = fsType == tmpfsMagic
		d.inlineWrites = !d.direct && !d.inline && puntsBufferedWrites(fsType)
	}
	if d.direct {
		if err := d.probeAlignment(); err != nil {
			return err
		}
	}
	d.locking = opts.Bool(bdrv.OptLocking, true)
	d.forceShare = opts.Bool(bdrv.OptForceShare, false)
	if d.forceShare && !n.ReadOnly {
		return fmt.Errorf("force-share=on can only be used with read-only images")
	}
	return nil
}

// Magic numbers of file systems (statfs(2)).
const (
	tmpfsMagic = 0x01021994
	ramfsMagic = 0x858458f6
	ext4Magic  = 0xef53 // also ext2 and ext3
)

// fileSystem returns the magic number of fd's file system, 0 if unknown.
//
// Files on tmpfs and ramfs keep their data in memory, where reads and
// writes only copy pages and never sleep on a device: all their I/O is
// served inline. On any other file system a synchronous read may wait for
// the disk or the network and stall the loop's other requests. (A tmpfs
// page swapped out is the exception the kernel's loop device pays too.)
func fileSystem(fd int) int64 {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return 0
	}
	return int64(fs.Type)
}

// puntsBufferedWrites reports whether the file system cannot do a buffered
// write without blocking (no FMODE_BUF_WASYNC: ext4 as of Linux 6.18,
// unlike XFS and btrfs), so that io_uring punts every buffered write to an
// io-wq worker: a thread hop and two wake-ups per request for a copy into
// the page cache. The driver writes whole pages there with pwritev on the
// calling thread instead (see inlineWrite). A whole-page write never reads
// the page from the disk first; what may still sleep is what the loop
// device's buffered writes also wait for: dirty-page throttling
// (balance_dirty_pages) and, once, reading the file's extent tree.
func puntsBufferedWrites(fsType int64) bool {
	return fsType == ext4Magic
}

// probeAlignment finds the smallest request alignment O_DIRECT accepts, as
// QEMU's raw_probe_alignment does: the logical block size of a block device,
// or the smallest power of two from 512 up that a real read accepts.
func (d *driver) probeAlignment() error {
	if d.blockDev {
		ssz, err := unix.IoctlGetInt(d.fd, unix.BLKSSZGET)
		if err == nil && ssz > 0 {
			d.align = int64(ssz)
			return nil
		}
	}
	buf := bdrv.AlignedBuffer(64<<10, 64<<10)
	for a := 512; a <= 64<<10; a *= 2 {
		_, err := unix.Pread(d.fd, buf[:a], 0)
		if err == nil {
			d.align = int64(a)
			return nil
		}
		if err != unix.EINVAL {
			break
		}
	}
	// An empty file reads 0 bytes at any alignment above; a failure
	// here means O_DIRECT itself does not work on this file.
	d.align = 4096
	return nil
}

// RefreshLimits implements bdrv.LimitsRefresher.
func (d *driver) RefreshLimits() bdrv.Limits {
	l := bdrv.Limits{
		RequestAlignment: d.align,
		MinMemAlignment:  int(d.align),
		// One ring request moves at most 2 GiB - 4 KiB (MAX_RW_COUNT).
		MaxTransfer: 1 << 30,
	}
	if d.blockDev {
		l.PdiscardAlignment = d.align
	}
	return l
}

// SupportedWriteFlags implements bdrv.WriteFlagser: no native FUA, the
// generic layer follows the write with a flush.
func (d *driver) SupportedWriteFlags() bdrv.ReqFlags { return 0 }

// OpenOptions are file-posix's runtime options: the ones this driver
// honours and the ones it accepts without effect (aio, pr-manager, ...).
func (d *driver) OpenOptions() []string {
	return []string{"filename", "aio", "aio-max-batch", bdrv.OptLocking, "pr-manager", "drop-cache", "x-check-cache-dropped"}
}

func (d *driver) Close(co *coroutine.Co) error {
	if d.fd < 0 {
		return nil
	}
	err := d.unmapFile()
	if d.locked {
		if uerr := unlockAll(d.fd); err == nil {
			err = uerr
		}
		d.locked = false
	}
	if cerr := unix.Close(d.fd); err == nil {
		err = cerr
	}
	d.fd = -1
	return err
}

// HasZeroInit implements bdrv.ZeroIniter: a new regular file reads as zeros,
// a block device keeps whatever it held.
func (d *driver) HasZeroInit() bool { return !d.blockDev }

// AllocatedSize implements bdrv.AllocatedSizer (st_blocks, like du).
func (d *driver) AllocatedSize(co *coroutine.Co) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return 0, err
	}
	if d.blockDev {
		return 0, nil
	}
	return st.Blocks * 512, nil
}

// create makes (or empties) a file of the requested size and
// preallocation, for the raw format and as the protocol step of the others.
// Like QEMU's raw_co_create it opens without O_TRUNC and takes the image
// locks before it changes a byte, so an image another process uses is
// refused and left as it was; it holds them until the file is ready.
func create(co *coroutine.Co, req *bdrv.CreateRequest) error {
	prealloc, err := bdrv.ParsePrealloc(req.Options.String("preallocation", "off"))
	if err != nil {
		return err
	}
	if prealloc == bdrv.PreallocMetadata {
		return fmt.Errorf("unsupported preallocation mode 'metadata' for the file protocol")
	}
	fd, err := openRetry(req.Filename, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("Could not create '%s': %w", req.Filename, syscallErr(err))
	}
	if err := lockPerms(fd, createPerm, createShared, req.Filename); err != nil {
		unix.Close(fd)
		return err
	}
	d := &driver{fd: fd, align: 1, locked: true}
	err = d.fill(co, req.Size, prealloc)
	if cerr := d.Close(co); err == nil {
		err = cerr
	}
	return err
}

// fill empties the new file and grows it to size (whole sectors, like
// QEMU's file-posix), writing the first block so that O_DIRECT alignment
// probing finds data to read.
func (d *driver) fill(co *coroutine.Co, size int64, prealloc bdrv.Prealloc) error {
	var st unix.Stat_t
	if unix.Fstat(d.fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
		if err := unix.Ftruncate(d.fd, 0); err != nil {
			return fmt.Errorf("Could not resize file: %w", syscallErr(err))
		}
	}
	size = (size + 511) &^ 511
	if err := d.grow(co, 0, size, prealloc); err != nil {
		return err
	}
	if size == 0 || prealloc != bdrv.PreallocOff {
		return nil
	}
	return d.rw(co, true, 0, bdrv.IOVec{make([]byte, min(size, 4096))})
}
