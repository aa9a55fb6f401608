package img

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"slices"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Defaults and limits of qemu-img convert.
const (
	// DefaultSparseSize is -S's default: runs of at least 4 KiB of zeros
	// are not written.
	DefaultSparseSize = 4096
	// MaxSparseSize is the largest -S (MAX_BUF_SECTORS sectors).
	MaxSparseSize = maxBufSectors * sectorSize
	// DefaultCoroutines is -m's default.
	DefaultCoroutines = 8
	// MaxCoroutines is -m's maximum (MAX_COROUTINES).
	MaxCoroutines = 16

	// ioBufSectors is the default copy buffer, 2 MiB (IO_BUF_SIZE).
	ioBufSectors = 2 << 20 / sectorSize
	// maxBufSectors caps the copy buffer at 16 MiB (MAX_BUF_SECTORS).
	maxBufSectors = 32768
	// maxRequestSectors bounds one block-status query
	// (BDRV_REQUEST_MAX_SECTORS: requests stay below 2 GiB).
	maxRequestSectors = (1<<31 - 1) / sectorSize
)

// ConvertOptions are qemu-img convert's arguments. The zero value is not
// useful: callers start from the defaults (SparseSize DefaultSparseSize,
// Coroutines DefaultCoroutines, TargetCache unsafe).
type ConvertOptions struct {
	// Sources are the images to copy; several are concatenated.
	Sources      []string
	SourceFormat string // -f; "" probes
	Target       string
	TargetFormat string // -O; "" means raw
	// Options are the target's -o create options.
	Options bdrv.Options
	// SourceCache (-T, default writeback) and TargetCache (-t, default
	// unsafe: convert flushes once at the end).
	SourceCache, TargetCache bdrv.CacheMode
	// Compress (-c) writes compressed clusters; the target format must
	// support bdrv.ReqWriteCompressed.
	Compress bool
	// SparseSize (-S) is the number of consecutive zero bytes, a multiple
	// of 512, that convert leaves unwritten; 0 writes every byte (a fully
	// allocated target).
	SparseSize int64
	// Coroutines (-m) is the number of requests in flight, 1 to 16.
	Coroutines int
	// OutOfOrder (-W) lets writes complete in any order.
	OutOfOrder bool
	// NoCreate (-n) writes into an existing target instead of creating it.
	NoCreate bool
	// TargetIsZero (--target-is-zero, with NoCreate) promises that the
	// target reads as zeros, so zero ranges are skipped.
	TargetIsZero bool
	// ForceShare (-U) opens the sources even if another process holds them.
	ForceShare bool
	// Progress, if not nil, receives -p's progress line.
	Progress io.Writer
	// Bitmaps (--bitmaps) copies the source's persistent bitmaps to the
	// target (one qcow2 source, a qcow2 target); inconsistent ones fail
	// the copy unless SkipBroken (--skip-broken-bitmaps).
	Bitmaps, SkipBroken bool
	// Warn, if not nil, receives warnings (skipped bitmaps).
	Warn func(msg string)
}

// IOError is a failed read or write of convert, worded as qemu-img's
// "error while writing at byte N: No space left on device". Offset is the
// start of the chunk that failed. It unwraps to the errno.
type IOError struct {
	Op     string // "reading", "writing", "reading block status" or "closing"
	Offset int64
	Err    error
}

func (e *IOError) Error() string {
	switch e.Op {
	case "reading block status":
		return fmt.Sprintf("error while reading block status at offset %d: %s", e.Offset, Strerror(e.Err))
	case "closing":
		return fmt.Sprintf("Error while closing the image: %s", Strerror(e.Err))
	}
	return fmt.Sprintf("error while %s at byte %d: %s", e.Op, e.Offset, Strerror(e.Err))
}

func (e *IOError) Unwrap() error { return e.Err }

// blkStatus is how convert treats a range of the source
// (ImgConvertBlockStatus).
type blkStatus int

const (
	blkData blkStatus = iota // copy it
	blkZero                  // reads as zeros: skip or write zeros
)

// converter is the state of one convert (QEMU's ImgConvertState). Every
// field is used from coroutines of one loop only; lock serialises the
// block-status walk, which yields in the middle.
type converter struct {
	opts ConvertOptions

	srcs          []*bdrv.Node
	srcSectors    []int64
	srcAlignment  []int64 // sectors: request alignment or cluster size
	totalSectors  int64
	target        *bdrv.Node
	hasZeroInit   bool
	compressed    bool
	minSparse     int64 // sectors
	alignment     int64 // sectors, a power of two
	clusterSector int64
	bufSectors    int64

	lock             coroutine.Mutex // guards the walk: sectorNum, status, sectorNextStatus
	sectorNum        int64
	status           blkStatus
	sectorNextStatus int64

	allocatedSectors, allocatedDone int64
	progress                        *Progress

	err     error           // first failure; stops every worker
	wrOffs  int64           // in-order mode: the next sector to write
	wrQueue coroutine.Queue // workers waiting for their turn to write
	running int
	doneQ   coroutine.Queue // Convert waits here for the workers
}

// Convert copies one or more source images into a new (or, with NoCreate,
// existing) target image, as qemu-img convert does: block status skips
// ranges that read as zeros, SparseSize-long zero runs in data are not
// written, Coroutines requests are in flight, and writes land in order
// unless OutOfOrder. On any failure after Convert created a target that
// did not exist before, the partial target is removed; the first error is
// returned.
func Convert(co *coroutine.Co, opts ConvertOptions) (err error) {
	if opts.SparseSize < 0 || opts.SparseSize%sectorSize != 0 || opts.SparseSize > MaxSparseSize {
		return fmt.Errorf("Invalid buffer size for sparse output specified. Valid sizes are multiples of %d up to %d. Select 0 to disable sparse detection (fully allocates output).", sectorSize, MaxSparseSize)
	}
	if opts.Coroutines < 1 || opts.Coroutines > MaxCoroutines {
		return fmt.Errorf("Invalid number of coroutines. Allowed number of coroutines is between 1 and %d", MaxCoroutines)
	}
	if len(opts.Sources) == 0 {
		return errors.New("Must specify image file name")
	}
	if opts.TargetIsZero && !opts.NoCreate {
		return errors.New("--target-is-zero requires use of -n flag")
	}
	if opts.NoCreate && len(opts.Options) > 0 {
		return errors.New("-o has no effect when skipping image creation")
	}
	if opts.Compress && (opts.Options.Has("encrypt.format") || opts.Options.Bool("encryption", false)) {
		return errors.New("Compression and encryption not supported at the same time")
	}
	if opts.TargetFormat == "" {
		opts.TargetFormat = "raw"
	}
	c := &converter{opts: opts, minSparse: opts.SparseSize / sectorSize}
	c.progress = NewProgress(opts.Progress, 1)
	defer c.progress.End()
	c.progress.Print(0, 100)

	defer func() {
		for _, s := range c.srcs {
			s.Close(co)
		}
	}()
	for _, name := range opts.Sources {
		s := openSpec{filename: name, format: opts.SourceFormat, cache: opts.SourceCache, readOnly: true}
		if opts.ForceShare {
			s.options = bdrv.Options{bdrv.OptForceShare: "on"}
		}
		n, err := openImage(co, s)
		if err != nil {
			return err
		}
		c.srcs = append(c.srcs, n)
		sectors := qemuLength(n) / sectorSize
		align := max(alignUp(n.Limits().RequestAlignment, sectorSize)/sectorSize, clusterSize(n)/sectorSize, 1)
		c.srcSectors = append(c.srcSectors, sectors)
		c.srcAlignment = append(c.srcAlignment, align)
		c.totalSectors += sectors
	}

	if opts.Bitmaps {
		if err := checkBitmapSource(co, c.srcs, opts.SkipBroken); err != nil {
			return err
		}
	}

	created, keep := false, false
	if !opts.NoCreate {
		// Only a target that did not exist is removed on failure: an
		// existing one may be refused untouched (another process holds
		// it, or it is a source) and must then stay as it was.
		var statErr error
		co.Offload(func() { _, statErr = os.Lstat(opts.Target) })
		if err := c.createTarget(co); err != nil {
			return err
		}
		created = errors.Is(statErr, os.ErrNotExist)
	}
	// From here on a failure leaves a partial image behind: remove a new
	// one, so that no one mistakes it for a good copy.
	defer func() {
		if err != nil && created && !keep {
			co.Offload(func() { os.Remove(opts.Target) })
		}
	}()

	// With -S, qemu-img opens the target with BDRV_O_UNMAP. It opens an
	// existing target's backing chain (-n): a target whose backing file is
	// missing, or written by another process, is refused untouched.
	target, err := openImage(co, openSpec{filename: opts.Target, format: opts.TargetFormat, cache: opts.TargetCache,
		unmap: opts.SparseSize > 0, options: keySecretOption(opts.Options)})
	if err != nil {
		return err
	}
	c.target = target
	tq, _ := target.Driver().(bdrv.PersistentBitmaps)
	if opts.Bitmaps && (tq == nil || !tq.SupportsBitmaps()) {
		// qemu-img leaves the new target behind.
		target.Close(co)
		keep = true
		return fmt.Errorf("Format driver '%s' does not support bitmaps", opts.TargetFormat)
	}
	if err := c.copy(co); err != nil {
		target.Close(co)
		return err
	}
	if opts.Bitmaps {
		if err := copyBitmaps(co, c.srcs[0], tq, opts); err != nil {
			target.Close(co)
			keep = true
			return err
		}
	}
	if err := target.Close(co); err != nil {
		// The final flush failed: the data may not all be on disk.
		return &IOError{Op: "closing", Err: err}
	}
	c.progress.Print(100, 0)
	return nil
}

// createTarget creates the target with the sources' total size and the -o
// options, as img_convert does before opening it.
func (c *converter) createTarget(co *coroutine.Co) error {
	opts := c.opts
	f, err := bdrv.LookupFormat(opts.TargetFormat)
	if err != nil || f.Protocol {
		return fmt.Errorf("Unknown file format '%s'", opts.TargetFormat)
	}
	if f.Create == nil {
		return fmt.Errorf("Format driver '%s' does not support image creation", opts.TargetFormat)
	}
	o := bdrv.Options{}.Merge(opts.Options)
	if err := checkOptionNames(f, o); err != nil {
		return err
	}
	if _, ok := o[optBackingFile]; ok {
		// img_convert's -B path (target_has_backing) is not implemented.
		return errors.New("convert: a backing file for the target is not supported")
	}
	if opts.Compress && !f.CompressedWrites {
		// Before the target exists: an existing one stays as it was.
		return errors.New("Compression not supported for this file format")
	}
	if opts.Compress {
		if p, ok := o["preallocation"]; ok && p != "off" {
			return errors.New("Compression and preallocation not supported at the same time")
		}
	}
	// The size comes from the sources; an -o size is overridden, as in
	// qemu-img.
	size := c.totalSectors * sectorSize
	err = bdrv.Create(co, opts.TargetFormat, &bdrv.CreateRequest{
		Filename: opts.Target, Size: size, Options: createOptions(f, o, size),
	})
	if err != nil {
		return fmt.Errorf("%s: error while converting %s: %w", opts.Target, opts.TargetFormat, err)
	}
	return nil
}

// clusterSize is the node's cluster size when its driver has one.
func clusterSize(n *bdrv.Node) int64 {
	if cs, ok := n.Driver().(bdrv.ClusterSizer); ok {
		return cs.ClusterSize()
	}
	return 0
}

// copy sets the copy parameters from the opened target and runs the
// workers (img_convert after opening the target, and convert_do_copy).
func (c *converter) copy(co *coroutine.Co) error {
	opts, target := c.opts, c.target
	if opts.NoCreate && qemuLength(target)/sectorSize < c.totalSectors {
		return errors.New("output file is smaller than input file")
	}
	if opts.Compress {
		wf, ok := target.Driver().(bdrv.WriteFlagser)
		if !ok || wf.SupportedWriteFlags()&bdrv.ReqWriteCompressed == 0 {
			return errors.New("Compression not supported for this file format")
		}
	}
	c.compressed = opts.Compress
	l := target.Limits()
	// A larger buffer when the target prefers larger requests, up to
	// 16 MiB.
	c.bufSectors = min(maxBufSectors, max(ioBufSectors, l.OptTransfer/sectorSize, l.PdiscardAlignment/sectorSize))
	// Writes aligned to the sparse size and to the target's alignment
	// avoid read-modify-write cycles.
	c.alignment = max(pow2floor(c.minSparse), alignUp(l.RequestAlignment, sectorSize)/sectorSize)
	c.clusterSector = clusterSize(target) / sectorSize
	c.hasZeroInit = opts.TargetIsZero || (!opts.NoCreate && c.minSparse > 0 && target.HasZeroInit())
	if c.compressed {
		if c.clusterSector <= 0 || c.clusterSector > c.bufSectors {
			return errors.New("invalid cluster size")
		}
		c.bufSectors = c.clusterSector
	}

	// The allocation pass only feeds the progress percentage: skip it
	// when nobody watches.
	if c.progress.w != nil {
		for s := int64(0); s < c.totalSectors; {
			n, err := c.iterationSectors(co, s)
			if err != nil {
				return err
			}
			if c.status == blkData || (c.minSparse == 0 && c.status == blkZero) {
				c.allocatedSectors += n
			}
			s += n
		}
		c.sectorNextStatus = 0
	}

	workers := min(int64(opts.Coroutines), max(1, c.totalSectors))
	c.running = int(workers)
	for range workers {
		co.Loop().Go(c.worker)
	}
	for c.running > 0 {
		c.doneQ.Wait(co, nil)
	}
	return c.err
}

// fail records the first error and wakes writers waiting for their turn so
// that they notice it.
func (c *converter) fail(co *coroutine.Co, err error) {
	if c.err == nil {
		c.err = err
	}
	c.wrQueue.RestartAll(co)
}

// selectPart finds the source that holds sectorNum and the sector where it
// starts in the concatenation.
func (c *converter) selectPart(sectorNum int64) (int, int64) {
	cur, off := 0, int64(0)
	for sectorNum-off >= c.srcSectors[cur] {
		off += c.srcSectors[cur]
		cur++
	}
	return cur, off
}

// iterationSectors decides how many sectors from sectorNum the next step
// handles and how (convert_iteration_sectors): it asks the source's block
// status when the previous answer is used up, keeps the end of each answer
// aligned to the source's alignment, and caps data steps at the buffer.
// Called with c.lock held (or before the workers start).
func (c *converter) iterationSectors(co *coroutine.Co, sectorNum int64) (int64, error) {
	cur, curOff := c.selectPart(sectorNum)
	n := min(c.totalSectors-sectorNum, maxRequestSectors)

	if c.sectorNextStatus <= sectorNum {
		src := c.srcs[cur]
		offset := (sectorNum - curOff) * sectorSize
		st, err := src.BlockStatusAbove(co, nil, true, offset, n*sectorSize)
		if err != nil {
			return 0, &IOError{Op: "reading block status", Offset: offset, Err: err}
		}
		count := st.Pnum
		if count <= 0 {
			// Only the part past the node's exact length, inside its
			// last sector: that reads as zeros.
			count, st.Flags = sectorSize, bdrv.StatusZero
		}
		n = (count + sectorSize - 1) / sectorSize
		// Keep the next status query aligned to the source's request
		// alignment or cluster size, avoiding needless re-reads.
		if tail := (sectorNum - curOff + n) % c.srcAlignment[cur]; n > tail {
			n -= tail
		}
		switch {
		case st.Flags&bdrv.StatusZero != 0:
			c.status = blkZero
		default:
			// Data, or unallocated with nothing below (the target has
			// no backing file to show through).
			c.status = blkData
		}
		c.sectorNextStatus = sectorNum + n
	}

	n = min(n, c.sectorNextStatus-sectorNum)
	if c.status == blkData {
		n = min(n, c.bufSectors)
	}
	// Compressed clusters are written whole: a short unallocated range is
	// treated as data of a whole cluster.
	if c.compressed {
		if n < c.clusterSector {
			n = min(c.clusterSector, c.totalSectors-sectorNum)
			c.status = blkData
		} else {
			n = alignDown(n, c.clusterSector)
		}
	}
	return n, nil
}

// worker is one of the copy coroutines (convert_co_do_copy): it claims the
// next step of the walk, reads it, waits for its turn (in-order mode) and
// writes it.
func (c *converter) worker(co *coroutine.Co) {
	buf := bdrv.AlignedBuffer(int(c.bufSectors*sectorSize), bufAlign(c.target, c.srcs))
	defer func() {
		c.running--
		if c.running == 0 {
			c.doneQ.RestartAll(co)
		}
	}()
	defer recoverTo(func(err error) { c.fail(co, err) })
	for {
		c.lock.Lock(co)
		if c.err != nil || c.sectorNum >= c.totalSectors {
			c.lock.Unlock(co)
			return
		}
		n, err := c.iterationSectors(co, c.sectorNum)
		if err != nil {
			c.lock.Unlock(co)
			c.fail(co, err)
			return
		}
		sectorNum, status := c.sectorNum, c.status
		if c.minSparse == 0 && status == blkZero {
			n = min(n, c.bufSectors)
		}
		// Let the other workers move on past this step while it is
		// being copied.
		c.sectorNum += n
		c.lock.Unlock(co)

		if status == blkData || (c.minSparse == 0 && status == blkZero) {
			c.allocatedDone += n
			if c.allocatedSectors > 0 {
				c.progress.Print(float32(100.0*float64(c.allocatedDone)/float64(c.allocatedSectors)), 0)
			}
		}

		// Zero steps may be far larger than the buffer; they need no
		// data unless -S 0 writes them out.
		var data []byte
		if status == blkData || c.minSparse == 0 {
			data = buf[:n*sectorSize]
		}
		if status == blkData {
			if err := c.read(co, sectorNum, data); err != nil {
				c.fail(co, &IOError{Op: "reading", Offset: sectorNum * sectorSize, Err: err})
			}
		} else if c.minSparse == 0 {
			// -S 0: zeros are written out like data.
			status = blkData
			clear(data)
		}

		if !c.opts.OutOfOrder {
			for c.wrOffs != sectorNum && c.err == nil {
				c.wrQueue.Wait(co, nil)
			}
		}
		if c.err == nil {
			if err := c.write(co, sectorNum, n, data, status); err != nil {
				c.fail(co, &IOError{Op: "writing", Offset: sectorNum * sectorSize, Err: err})
			}
		}
		if !c.opts.OutOfOrder {
			c.wrOffs = sectorNum + n
			c.wrQueue.RestartAll(co)
		}
	}
}

// bufAlign is the memory alignment for copy buffers: enough for O_DIRECT
// on every node involved, at least a page.
func bufAlign(target *bdrv.Node, srcs []*bdrv.Node) int {
	a := max(4096, target.Limits().MinMemAlignment)
	for _, s := range srcs {
		a = max(a, s.Limits().MinMemAlignment)
	}
	return a
}

// read fills buf with the concatenated sources from sectorNum on
// (convert_co_read); a read may span two sources.
func (c *converter) read(co *coroutine.Co, sectorNum int64, buf []byte) error {
	for len(buf) > 0 {
		cur, curOff := c.selectPart(sectorNum)
		n := min(int64(len(buf))/sectorSize, c.srcSectors[cur]-(sectorNum-curOff))
		chunk := buf[:n*sectorSize]
		if err := c.srcs[cur].Preadv(co, (sectorNum-curOff)*sectorSize, bdrv.IOVec{chunk}, 0); err != nil {
			return err
		}
		sectorNum += n
		buf = buf[len(chunk):]
	}
	return nil
}

// write stores one step at sectorNum (convert_co_write). Data is written
// except for zero runs of at least minSparse sectors, which become
// write-zeroes, or nothing at all on a target that starts out zeroed.
// buf holds the data of the nb sectors, or is nil for a zero step.
func (c *converter) write(co *coroutine.Co, sectorNum, nb int64, buf []byte, status blkStatus) error {
	var flags bdrv.ReqFlags
	if c.compressed {
		flags = bdrv.ReqWriteCompressed
	}
	for nb > 0 {
		n := nb
		zero := status == blkZero
		if !zero {
			switch {
			case c.minSparse == 0:
			case !c.compressed:
				var used bool
				used, n = isAllocatedSectorsMin(buf[:nb*sectorSize], nb, c.minSparse, sectorNum, c.alignment)
				zero = !used
			default:
				// Compressed clusters are written whole unless the
				// whole buffer is zero.
				zero = bdrv.IsZero(buf[:nb*sectorSize])
			}
		}
		switch {
		case !zero:
			if err := c.target.Pwritev(co, sectorNum*sectorSize, bdrv.IOVec{buf[:n*sectorSize]}, flags); err != nil {
				return err
			}
		case c.hasZeroInit:
			// The fresh target already reads as zeros.
		default:
			if err := c.target.PwriteZeroes(co, sectorNum*sectorSize, n*sectorSize, bdrv.ReqMayUnmap); err != nil {
				return err
			}
		}
		sectorNum += n
		nb -= n
		if buf != nil {
			buf = buf[n*sectorSize:]
		}
	}
	return nil
}

// isAllocatedSectors reports whether the first sector of buf holds data,
// and how many sectors from the start share that state, with the end of
// the run moved to an alignment boundary where that saves a
// read-modify-write (is_allocated_sectors).
func isAllocatedSectors(buf []byte, n, sectorNum, alignment int64) (bool, int64) {
	if n <= 0 {
		return false, 0
	}
	isZero := bdrv.IsZero(buf[:sectorSize])
	i := int64(1)
	for ; i < n; i++ {
		if isZero != bdrv.IsZero(buf[i*sectorSize:(i+1)*sectorSize]) {
			break
		}
	}
	if i == n {
		// All the same: no reason to split.
		return !isZero, i
	}
	if tail := (sectorNum + i) & (alignment - 1); tail != 0 {
		if isZero && i <= tail {
			// Data follows and will rewrite this partial block
			// anyway: write it as data now.
			isZero = false
		}
		if !isZero {
			i = min(i+alignment-tail, n)
		} else {
			// Stop the zeros at the boundary so the data after them
			// starts aligned.
			i -= tail
		}
	}
	return !isZero, i
}

// isAllocatedSectorsMin is isAllocatedSectors, but once the buffer starts
// with data, zero runs shorter than min sectors are counted as data, so
// that small holes do not split writes (is_allocated_sectors_min).
func isAllocatedSectorsMin(buf []byte, n, min, sectorNum, alignment int64) (bool, int64) {
	if n < min {
		min = n
	}
	used, pnum := isAllocatedSectors(buf, n, sectorNum, alignment)
	if !used {
		return false, pnum
	}
	numUsed := pnum
	buf = buf[pnum*sectorSize:]
	n -= pnum
	sectorNum += pnum
	numChecked := numUsed
	for n > 0 {
		used, pnum = isAllocatedSectors(buf, n, sectorNum, alignment)
		buf = buf[pnum*sectorSize:]
		n -= pnum
		sectorNum += pnum
		numChecked += pnum
		if used {
			numUsed = numChecked
		} else if pnum >= min {
			break
		}
	}
	return true, numUsed
}

// pow2floor is the largest power of two not above x (1 for x <= 1).
func pow2floor(x int64) int64 {
	if x <= 1 {
		return 1
	}
	return 1 << (63 - bits.LeadingZeros64(uint64(x)))
}

// checkBitmapSource is qemu-img's convert_check_bitmaps: one source, able to
// hold bitmaps, none inconsistent unless skipBroken. Bitmaps are visited
// newest first, as QEMU walks its list.
func checkBitmapSource(co *coroutine.Co, srcs []*bdrv.Node, skipBroken bool) error {
	if len(srcs) > 1 {
		return errors.New("Copying bitmaps only possible with single source")
	}
	q, _ := srcs[0].Driver().(bdrv.PersistentBitmaps)
	if q == nil || !q.SupportsBitmaps() {
		return errors.New("Source lacks bitmap support")
	}
	bms, err := q.DirtyBitmaps(co)
	if err != nil {
		return err
	}
	for _, b := range slices.Backward(bms) {
		if b.Inconsistent && !skipBroken {
			// qemu-img's hint on the next line (--skip-broken-bitmaps or
			// bitmap --remove) is left out: errors are one line.
			return fmt.Errorf("Cannot copy inconsistent bitmap '%s'", b.Name)
		}
	}
	return nil
}

// copyBitmaps is qemu-img's convert_copy_bitmaps: each bitmap of src is
// added to the target with its granularity and state and filled with
// src's bits; one the target cannot fill is removed again.
func copyBitmaps(co *coroutine.Co, src *bdrv.Node, dst bdrv.PersistentBitmaps, opts ConvertOptions) error {
	q := src.Driver().(bdrv.PersistentBitmaps)
	bms, err := q.DirtyBitmaps(co)
	if err != nil {
		return err
	}
	for _, b := range slices.Backward(bms) {
		if b.Inconsistent {
			if opts.Warn != nil {
				opts.Warn(fmt.Sprintf("Skipping inconsistent bitmap '%s'", b.Name))
			}
			continue
		}
		if err := dst.AddBitmap(co, b.Name, b.Granularity, !b.Enabled); err != nil {
			return fmt.Errorf("Failed to create bitmap %s: %w", b.Name, err)
		}
		data, err := q.ExportBitmap(co, b.Name)
		if err == nil {
			err = dst.MergeBitmap(co, b.Name, data)
		}
		if err != nil {
			dst.RemoveBitmap(co, b.Name)
			return fmt.Errorf("Failed to populate bitmap %s: %w", b.Name, err)
		}
	}
	return nil
}
