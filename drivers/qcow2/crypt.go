package qcow2

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

// Encryption (QEMU's qcow2 crypto glue in block/qcow2.c and
// qcow2-threads.c). Guest data clusters are encrypted in 512-byte sectors;
// metadata and compressed clusters never are. LUKS images take the IV from
// the host offset of the sector, legacy AES images from the guest offset.
// Requests are aligned to the sector size (RefreshLimits), and data goes
// through a bounce buffer so the caller's memory never holds ciphertext.

// OptKeySecret names the secret object (bdrv.AddSecretObject) that holds
// the passphrase of an encrypted image.
const OptKeySecret = "encrypt.key-secret"

// maxCryptChunk bounds one bounce buffer (QEMU processes encrypted data in
// chunks of at most 32 clusters; 1 MiB suffices for a coroutine).
const maxCryptChunk = 1 << 20

// cryptState is the encryption of an open image; the zero value means
// unencrypted.
type cryptState struct {
	// cipher is nil for an unencrypted image and for one opened for
	// metadata only (bdrv.Spec.NoIO).
	cipher *lukscrypto.Cipher
	// physical: the IV counts host sectors (LUKS), not guest sectors (AES).
	physical bool
	// luks is the parsed LUKS header, for info.
	luks *lukscrypto.Header
	// keySecret is the encrypt.key-secret the image was opened with: the
	// passphrase amend's key slot changes unlock the header with.
	keySecret string
}

// errNoKey fails guest I/O of an encrypted image opened without its key.
var errNoKey = &ioError{unix.EIO, errors.New("qcow2: encrypted image opened without a key")}

// openCrypto reads the encryption header and, unless the node was opened
// for metadata only, unlocks it with the secret named by encrypt.key-secret
// (QEMU's qcow2_update_options_prepare and qcrypto_block_open).
func (img *Image) openCrypto(co *coroutine.Co, opts bdrv.Options) error {
	img.crypt.keySecret = opts[OptKeySecret]
	h := img.hdr
	if h.CryptMethod == CryptNone {
		return nil
	}
	img.crypt.physical = h.CryptMethod == CryptLUKS
	if h.CryptMethod == CryptLUKS {
		area := h.Crypto
		if area.Length < lukscrypto.HeaderSize {
			return fmt.Errorf("qcow2: LUKS header area of %d bytes is too short", area.Length)
		}
		b, err := img.readFile(co, area.Offset, lukscrypto.HeaderSize)
		if err != nil {
			return fmt.Errorf("qcow2: reading LUKS header at %#x: %w", area.Offset, err)
		}
		if img.crypt.luks, err = lukscrypto.ParseHeader(b, int64(area.Length)); err != nil {
			return err
		}
	}
	if img.node.NoIO {
		return nil
	}
	id, ok := opts[OptKeySecret]
	if !ok {
		return &KeyError{Err: fmt.Errorf("Parameter '%s' is required for cipher", OptKeySecret)}
	}
	pass, err := bdrv.LookupSecret(id)
	if err != nil {
		return &KeyError{Err: err}
	}
	defer clear(pass)
	if h.CryptMethod == CryptAES {
		img.crypt.cipher = lukscrypto.NewQCowCipher(pass)
		return nil
	}
	base := h.Crypto.Offset
	v, err := img.crypt.luks.Unlock(pass, func(p []byte, off int64) error {
		buf, err := img.readFile(co, base+uint64(off), uint64(len(p)))
		if err == nil {
			copy(p, buf)
			clear(buf)
		}
		return err
	})
	if errors.Is(err, lukscrypto.ErrInvalidPassword) {
		return &KeyError{Err: err}
	}
	if err != nil {
		return err
	}
	img.crypt.cipher = v.Cipher
	return nil
}

// KeyError is the failure to open an encrypted image for want of its key
// (no encrypt.key-secret, no such secret, or a wrong passphrase).
type KeyError = bdrv.KeyError

// encrypted reports whether guest data clusters are encrypted.
func (img *Image) encrypted() bool { return img.hdr.CryptMethod != CryptNone }

// cryptSector is the IV sector number of data at host offset host that
// holds guest offset guest.
func (img *Image) cryptSector(host, guest uint64) uint64 {
	if img.crypt.physical {
		return host / lukscrypto.SectorSize
	}
	return guest / lukscrypto.SectorSize
}

// readEncrypted reads len(part) bytes of encrypted data at host offset host
// (guest offset guest) and decrypts them into part, in bounce-buffer
// chunks (QEMU's qcow2_co_preadv_encrypted). Called unlocked.
func (img *Image) readEncrypted(co *coroutine.Co, host, guest uint64, part bdrv.IOVec) error {
	c := img.crypt.cipher
	if c == nil {
		return errNoKey
	}
	total := uint64(part.Len())
	buf := bdrv.AlignedBuffer(int(min(total, maxCryptChunk)), 4096)
	defer clear(buf)
	for done := uint64(0); done < total; {
		n := min(total-done, maxCryptChunk)
		b := buf[:n]
		if err := img.data.Preadv(co, int64(host+done), bdrv.IOVec{b}, 0); err != nil {
			return err
		}
		c.Decrypt(b, img.cryptSector(host+done, guest+done))
		part.CopyFrom(b, int64(done))
		done += n
	}
	return nil
}

// encryptCopy returns the ciphertext of iov as stored at host offset host
// for guest offset guest, in a new buffer (QEMU encrypts a bounce copy in
// qcow2_co_pwritev_task). Called unlocked.
func (img *Image) encryptCopy(host, guest uint64, iov bdrv.IOVec) (bdrv.IOVec, error) {
	c := img.crypt.cipher
	if c == nil {
		return nil, errNoKey
	}
	n := iov.Len()
	if n%lukscrypto.SectorSize != 0 || host%lukscrypto.SectorSize != 0 {
		return nil, fmt.Errorf("qcow2: internal error: unaligned encrypted write %#x+%d: %w", host, n, unix.EIO)
	}
	b := bdrv.AlignedBuffer(int(n), 4096)
	iov.CopyTo(b, 0)
	c.Encrypt(b, img.cryptSector(host, guest))
	return bdrv.IOVec{b}, nil
}

// encryptCow encrypts the copy-on-write areas of m, read decrypted from
// their old place, for their new clusters (QEMU's perform_cow encrypts
// its bounce buffers the same way). Called unlocked.
func (img *Image) encryptCow(m *l2Meta, startBuf, endBuf []byte) error {
	c := img.crypt.cipher
	if c == nil {
		return errNoKey
	}
	for _, r := range []struct {
		buf []byte
		off uint64
	}{{startBuf, m.cowStart.off}, {endBuf, m.cowEnd.off}} {
		if len(r.buf) == 0 {
			continue
		}
		host := m.allocOffset + r.off
		if len(r.buf)%lukscrypto.SectorSize != 0 || host%lukscrypto.SectorSize != 0 {
			return fmt.Errorf("qcow2: internal error: unaligned copy-on-write %#x+%d in an encrypted image: %w", host, len(r.buf), unix.EIO)
		}
		c.Encrypt(r.buf, img.cryptSector(host, m.offset+r.off))
	}
	return nil
}

// Encryption create options (qemu-img's encrypt.* names). CreateEncryption
// (encryption=on) and CreateEncryptFormat are in create.go.
const (
	CreateEncryptKeySecret    = "encrypt.key-secret"
	CreateEncryptCipherAlg    = "encrypt.cipher-alg"
	CreateEncryptCipherMode   = "encrypt.cipher-mode"
	CreateEncryptIVGenAlg     = "encrypt.ivgen-alg"
	CreateEncryptIVGenHashAlg = "encrypt.ivgen-hash-alg"
	CreateEncryptHashAlg      = "encrypt.hash-alg"
	CreateEncryptIterTime     = "encrypt.iter-time"
)

// encryptOptionSpecs are the encrypt.* options after encrypt.format, in
// qemu-img's order.
var encryptOptionSpecs = []bdrv.OptionSpec{
	{Name: CreateEncryptKeySecret, Type: bdrv.OptString, Help: "ID of secret providing qcow AES key or LUKS passphrase"},
	{Name: CreateEncryptCipherAlg, Type: bdrv.OptString, Help: "Name of encryption cipher algorithm"},
	{Name: CreateEncryptCipherMode, Type: bdrv.OptString, Help: "Name of encryption cipher mode"},
	{Name: CreateEncryptIVGenAlg, Type: bdrv.OptString, Help: "Name of IV generator algorithm"},
	{Name: CreateEncryptIVGenHashAlg, Type: bdrv.OptString, Help: "Name of IV generator hash algorithm"},
	{Name: CreateEncryptHashAlg, Type: bdrv.OptString, Help: "Name of encryption hash algorithm"},
	{Name: CreateEncryptIterTime, Type: bdrv.OptNumber, Help: "Time to spend in PBKDF in milliseconds"},
}

// encryptParams are validated encryption create options.
type encryptParams struct {
	method uint32 // CryptAES or CryptLUKS
	secret string
	luks   lukscrypto.CreateOptions
}

// parseEncryptOptions validates the encryption options of a create request
// with qemu-img 7.2's rules and wording; nil means unencrypted. The legacy
// encryption=on means encrypt.format=aes, as in qemu-img 7.2.
func parseEncryptOptions(o bdrv.Options) (*encryptParams, error) {
	format, hasFormat := o[CreateEncryptFormat]
	if o.Has(CreateEncryption) {
		if hasFormat {
			return nil, errors.New("'encrypt.format' and its alias 'encryption' can't be used at the same time")
		}
		if !o.Bool(CreateEncryption, false) {
			return nil, nil
		}
		format, hasFormat = "aes", true
	}
	if !hasFormat {
		for _, s := range encryptOptionSpecs {
			if o.Has(s.Name) {
				return nil, fmt.Errorf("Parameter '%s' is missing", CreateEncryptFormat)
			}
		}
		return nil, nil
	}
	e := &encryptParams{}
	switch format {
	case "aes":
		e.method = CryptAES
		for _, s := range encryptOptionSpecs[1:] {
			if o.Has(s.Name) {
				return nil, fmt.Errorf("Parameter '%s' is unexpected", s.Name)
			}
		}
	case "luks":
		e.method = CryptLUKS
		e.luks = lukscrypto.CreateOptions{
			CipherAlg:    o.String(CreateEncryptCipherAlg, ""),
			CipherMode:   o.String(CreateEncryptCipherMode, ""),
			IVGenAlg:     o.String(CreateEncryptIVGenAlg, ""),
			IVGenHashAlg: o.String(CreateEncryptIVGenHashAlg, ""),
			HashAlg:      o.String(CreateEncryptHashAlg, ""),
		}
		if v, ok := o[CreateEncryptIterTime]; ok {
			ms, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("Parameter '%s' expects a number", CreateEncryptIterTime)
			}
			// 0 means the fewest iterations (QEMU's floor), not the
			// default that a zero Duration stands for.
			e.luks.IterTime = max(time.Duration(ms)*time.Millisecond, time.Nanosecond)
		}
	default:
		return nil, fmt.Errorf("Parameter 'format' does not accept value '%s'", format)
	}
	id, ok := o[CreateEncryptKeySecret]
	if !ok {
		return nil, fmt.Errorf("Parameter '%s' is required for cipher", CreateEncryptKeySecret)
	}
	e.secret = id
	return e, nil
}

// setUpEncryptionLocked makes a new, still empty image encrypted (QEMU's
// qcow2_set_up_encryption): for LUKS, a header area with the header and the
// key material is allocated after the existing clusters and written, its
// refcounts flushed, then the header names it; legacy AES only sets
// crypt_method. Called with meta held.
func (img *Image) setUpEncryptionLocked(co *coroutine.Co, e *encryptParams) error {
	pass, err := bdrv.LookupSecret(e.secret)
	if err != nil {
		return err
	}
	defer clear(pass)
	h := *img.hdr
	h.CryptMethod = e.method
	if e.method == CryptLUKS {
		v, area, err := lukscrypto.Create(pass, e.luks)
		if err != nil {
			return err
		}
		defer clear(area)
		cs := img.cs
		n := (uint64(len(area)) + cs - 1) / cs
		off, err := img.allocClustersLocked(co, n)
		if err != nil {
			return fmt.Errorf("Could not allocate the encryption header: %w", err)
		}
		buf := bdrv.AlignedBuffer(int(n*cs), 4096)
		copy(buf, area)
		if err := img.file.Pwritev(co, int64(off), bdrv.IOVec{buf}, 0); err != nil {
			return fmt.Errorf("Could not write the encryption header: %w", err)
		}
		if err := img.rcCache.flushLocked(co); err != nil {
			return err
		}
		h.Crypto = &CryptoHeaderExt{Offset: off, Length: uint64(len(area))}
		img.crypt = cryptState{cipher: v.Cipher, physical: true, luks: v.Header}
	} else {
		img.crypt = cryptState{cipher: lukscrypto.NewQCowCipher(pass)}
	}
	if err := img.rewriteHeaderLocked(co, &h); err != nil {
		return fmt.Errorf("Could not update qcow2 header: %w", err)
	}
	return nil
}

// EncryptionHeaderSize validates the encryption options of a create request
// and returns the bytes its encryption header area takes (0 unencrypted or
// legacy AES), for qemu-img measure.
func EncryptionHeaderSize(o bdrv.Options) (int64, error) {
	e, err := parseEncryptOptions(o)
	if err != nil || e == nil || e.method != CryptLUKS {
		return 0, err
	}
	return lukscrypto.AreaSize(e.luks)
}
