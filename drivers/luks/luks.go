// Package luks is the luks image format: a LUKS1 header followed by the
// encrypted payload, as QEMU's block/crypto.c serves it. The guest sees the
// payload decrypted; guest sector s is encrypted with IV sector number s
// (the payload sector, not the file sector), as qcrypto_block_encrypt is
// called with the guest offset. The header and ciphers are drivers/lukscrypto.
package luks

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/lukscrypto"
)

func init() {
	bdrv.Register(&bdrv.Format{
		Name:          "luks",
		Probe:         probe,
		Open:          open,
		Create:        create,
		CreateOptions: createOptions,
		StrongOptions: []string{OptKeySecret},
		Measure:       measure,
	})
}

// OptKeySecret names the secret object holding the passphrase, at open
// and create alike (QEMU's key-secret).
const OptKeySecret = "key-secret"

// maxBounce bounds one bounce buffer; longer requests are processed in
// pieces (QEMU's BLOCK_CRYPTO_MAX_IO_SIZE).
const maxBounce = 1 << 20

func probe(head []byte, _ string) int {
	if len(head) >= lukscrypto.HeaderSize {
		if _, err := lukscrypto.ParseHeader(head, 0); err == nil {
			return 100
		}
	}
	return 0
}

// driver is an open luks image. All fields are set at open; cipher is
// safe for concurrent use, so requests need no lock.
type driver struct {
	node   *bdrv.Node
	file   *bdrv.Node
	hdr    *lukscrypto.Header
	cipher *lukscrypto.Cipher // nil when opened for metadata only
	// payload is the byte offset of the guest's sector 0 in the file.
	payload int64
}

// open parses the header and, unless the node is opened for metadata only
// (qemu-img info), unlocks it with the secret named by key-secret (QEMU's
// block_crypto_open_generic).
func open(co *coroutine.Co, n *bdrv.Node, opts bdrv.Options) (bdrv.Driver, error) {
	d := &driver{node: n, file: n.File}
	b, err := d.readFile(co, 0, lukscrypto.HeaderSize)
	if err != nil {
		return nil, fmt.Errorf("luks: reading the header: %w", err)
	}
	if d.hdr, err = lukscrypto.ParseHeader(b, 0); err != nil {
		if errors.Is(err, lukscrypto.ErrNotLUKS) {
			return nil, errors.New("Volume is not in LUKS format")
		}
		return nil, err
	}
	d.payload = d.hdr.AreaSize()
	if flen := n.File.Length(); flen < d.payload {
		return nil, fmt.Errorf("luks: payload offset %d is past the end of the file (%d bytes)", d.payload, flen)
	}
	n.SetLength(n.File.Length() - d.payload)
	if n.NoIO {
		return d, nil
	}
	id, ok := opts[OptKeySecret]
	if !ok {
		return nil, &bdrv.KeyError{Err: fmt.Errorf("Parameter '%s' is required for cipher", OptKeySecret)}
	}
	pass, err := bdrv.LookupSecret(id)
	if err != nil {
		return nil, &bdrv.KeyError{Err: err}
	}
	defer clear(pass)
	v, err := d.hdr.Unlock(pass, func(p []byte, off int64) error {
		buf, err := d.readFile(co, off, len(p))
		copy(p, buf)
		clear(buf)
		return err
	})
	if errors.Is(err, lukscrypto.ErrInvalidPassword) {
		return nil, &bdrv.KeyError{Err: err}
	}
	if err != nil {
		return nil, err
	}
	d.cipher = v.Cipher
	return d, nil
}

// OpenOptions implements bdrv.OptionLister: key-secret alone (QEMU's
// block_crypto_runtime_opts_luks).
func (d *driver) OpenOptions() []string { return []string{OptKeySecret} }

// readFile reads n bytes of the file at off, which must lie within it.
func (d *driver) readFile(co *coroutine.Co, off int64, n int) ([]byte, error) {
	if off+int64(n) > d.file.Length() {
		return nil, fmt.Errorf("luks: %d bytes at %d lie past the end of the file (%d bytes)", n, off, d.file.Length())
	}
	buf := bdrv.AlignedBuffer(n, 4096)
	if err := d.file.Preadv(co, off, bdrv.IOVec{buf}, 0); err != nil {
		return nil, err
	}
	return buf, nil
}

var errNoKey = fmt.Errorf("luks: image opened without its key: %w", unix.EIO)

// Preadv reads ciphertext into a bounce buffer and decrypts it into iov.
func (d *driver) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	return d.bounce(off, iov, func(b []byte, done int64) error {
		if err := d.file.Preadv(co, d.payload+off+done, bdrv.IOVec{b}, 0); err != nil {
			return err
		}
		d.cipher.Decrypt(b, uint64(off+done)/lukscrypto.SectorSize)
		iov.CopyFrom(b, done)
		return nil
	})
}

// Pwritev encrypts a copy of iov in a bounce buffer and writes it; iov
// itself is left alone (it may be guest memory). FUA applies to each
// piece's write.
func (d *driver) Pwritev(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	return d.bounce(off, iov, func(b []byte, done int64) error {
		iov.CopyTo(b, done)
		d.cipher.Encrypt(b, uint64(off+done)/lukscrypto.SectorSize)
		return d.file.Pwritev(co, d.payload+off+done, bdrv.IOVec{b}, flags&bdrv.ReqFUA)
	})
}

// bounce runs piece for each successive piece of a request at guest offset
// off (done bytes into it) with a bounce buffer of the piece's size, which
// is wiped afterwards. No lock is held: the cipher is safe for concurrent
// use (QEMU's block_crypto_co_preadv/pwritev).
func (d *driver) bounce(off int64, iov bdrv.IOVec, piece func(b []byte, done int64) error) error {
	if d.cipher == nil {
		return errNoKey
	}
	total := iov.Len()
	buf := bdrv.AlignedBuffer(int(min(total, maxBounce)), 4096)
	defer clear(buf)
	for done := int64(0); done < total; {
		b := buf[:min(total-done, maxBounce)]
		if err := piece(b, done); err != nil {
			return err
		}
		done += int64(len(b))
	}
	return nil
}

// Flush has nothing of its own to write; bdrv flushes the file below.
func (d *driver) Flush(co *coroutine.Co) error { return nil }

func (d *driver) Close(co *coroutine.Co) error { return nil }

// SupportedWriteFlags implements bdrv.WriteFlagser: FUA passes to the file.
func (d *driver) SupportedWriteFlags() bdrv.ReqFlags { return bdrv.ReqFUA }

// RefreshLimits implements bdrv.LimitsRefresher: whole encryption sectors
// only. There is no ZeroWriter: as in QEMU, write-zeroes becomes writes of
// encrypted zeros (bdrv's fallback), never an unmap, and block status is
// the default, data everywhere.
func (d *driver) RefreshLimits() bdrv.Limits {
	return bdrv.Limits{RequestAlignment: lukscrypto.SectorSize}
}

// Truncate implements bdrv.Truncater: the file is resized to hold the
// header area and size bytes of payload (QEMU's block_crypto_co_truncate).
func (d *driver) Truncate(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc) error {
	if err := d.file.Truncate(co, d.payload+size, exact, prealloc); err != nil {
		return err
	}
	d.node.SetLength(d.file.Length() - d.payload)
	return nil
}

// IsEncrypted reports "encrypted: yes" for qemu-img info.
func (d *driver) IsEncrypted() bool { return true }

// FormatSpecific returns the header's description (QAPI
// ImageInfoSpecific's luks member).
func (d *driver) FormatSpecific(co *coroutine.Co) (any, error) { return d.hdr.Info(), nil }

// Create options, as qemu-img's luks format names them.
var createOptions = []bdrv.OptionSpec{
	{Name: "size", Type: bdrv.OptSize, Help: "Virtual disk size"},
	{Name: OptKeySecret, Type: bdrv.OptString, Help: "ID of the secret that provides the keyslot passphrase"},
	{Name: "cipher-alg", Type: bdrv.OptString, Help: "Name of encryption cipher algorithm"},
	{Name: "cipher-mode", Type: bdrv.OptString, Help: "Name of encryption cipher mode"},
	{Name: "ivgen-alg", Type: bdrv.OptString, Help: "Name of IV generator algorithm"},
	{Name: "ivgen-hash-alg", Type: bdrv.OptString, Help: "Name of IV generator hash algorithm"},
	{Name: "hash-alg", Type: bdrv.OptString, Help: "Name of encryption hash algorithm"},
	{Name: "iter-time", Type: bdrv.OptNumber, Help: "Time to spend in PBKDF in milliseconds"},
	{Name: "preallocation", Type: bdrv.OptString,
		Help: "Preallocation mode (allowed values: off, falloc, full)"},
	{Name: "nocow", Type: bdrv.OptBool,
		Help: "Turn off copy-on-write (valid only on btrfs)"},
}

// parseCreateOptions validates create options with qemu-img's wording
// and returns the header's options and the secret's id.
func parseCreateOptions(o bdrv.Options) (lukscrypto.CreateOptions, string, error) {
	c := lukscrypto.CreateOptions{
		CipherAlg:    o.String("cipher-alg", ""),
		CipherMode:   o.String("cipher-mode", ""),
		IVGenAlg:     o.String("ivgen-alg", ""),
		IVGenHashAlg: o.String("ivgen-hash-alg", ""),
		HashAlg:      o.String("hash-alg", ""),
	}
	if v, ok := o["iter-time"]; ok {
		ms, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return c, "", errors.New("Parameter 'iter-time' expects a number")
		}
		// 0 means the fewest iterations, not the default.
		c.IterTime = max(time.Duration(ms)*time.Millisecond, time.Nanosecond)
	}
	id, ok := o[OptKeySecret]
	if !ok {
		return c, "", fmt.Errorf("Parameter '%s' is required for cipher", OptKeySecret)
	}
	return c, id, nil
}

// measure is QEMU's block_crypto_measure: the header area of an image
// created with o (the options validated as create validates them), then
// the payload, all of it written.
func measure(co *coroutine.Co, o bdrv.Options, in *bdrv.Node) (*bdrv.MeasureInfo, error) {
	c, _, err := parseCreateOptions(o)
	if err != nil {
		return nil, err
	}
	hdr, err := lukscrypto.AreaSize(c)
	if err != nil {
		return nil, err
	}
	size := int64(0)
	if in != nil {
		size = in.SectorLength()
	} else if size, err = o.Size("size", 0); err != nil {
		return nil, err
	}
	return &bdrv.MeasureInfo{Required: hdr + size, FullyAllocated: hdr + size}, nil
}

// create makes a luks image as QEMU's block_crypto_co_create_luks: an
// empty file, grown to the header area plus size bytes (preallocated as
// asked; metadata preallocation is none for luks), then the header and
// slot 0's key material written. Unused key slot areas stay holes, as QEMU
// leaves them.
func create(co *coroutine.Co, req *bdrv.CreateRequest) error {
	prealloc, err := bdrv.ParsePrealloc(req.Options.String("preallocation", "off"))
	if err != nil {
		return fmt.Errorf("invalid parameter value: %s", req.Options.String("preallocation", "off"))
	}
	if prealloc == bdrv.PreallocMetadata {
		prealloc = bdrv.PreallocOff
	}
	c, id, err := parseCreateOptions(req.Options)
	if err != nil {
		return err
	}
	pass, err := bdrv.LookupSecret(id)
	if err != nil {
		return err
	}
	defer clear(pass)
	v, area, err := lukscrypto.Create(pass, c)
	if err != nil {
		return err
	}
	defer clear(area)

	o := req.Options
	fileOpts := bdrv.Options{}
	if nocow, ok := o["nocow"]; ok {
		fileOpts["nocow"] = nocow
	}
	if err := bdrv.Create(co, "file", &bdrv.CreateRequest{Filename: req.Filename, Options: fileOpts}); err != nil {
		return err
	}
	f, err := bdrv.Open(co, bdrv.Spec{Filename: req.Filename, Format: "file"})
	if err != nil {
		return err
	}
	err = writeHeader(co, f, v.Header, area, req.Size, prealloc)
	if cerr := f.Close(co); err == nil {
		err = cerr
	}
	return err
}

// writeHeader grows the new file f and writes the header and the active
// key slots' material of area into it.
func writeHeader(co *coroutine.Co, f *bdrv.Node, h *lukscrypto.Header, area []byte, size int64, prealloc bdrv.Prealloc) error {
	if err := f.Truncate(co, int64(len(area))+size, true, prealloc); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	parts := [][2]int64{{0, lukscrypto.HeaderSize}}
	for _, s := range h.Slots {
		if s.Active {
			off := int64(s.KeyOffset) * lukscrypto.SectorSize
			parts = append(parts, [2]int64{off, off + h.SplitKeySize()})
		}
	}
	for _, p := range parts {
		if err := f.Pwritev(co, p[0], bdrv.IOVec{area[p[0]:p[1]]}, 0); err != nil {
			return fmt.Errorf("Could not write the LUKS header: %w", err)
		}
	}
	return f.Flush(co)
}
