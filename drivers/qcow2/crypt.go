package qcow2

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/luks"
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
	cipher *luks.Cipher
	// physical: the IV counts host sectors (LUKS), not guest sectors (AES).
	physical bool
	// luks is the parsed LUKS header, for info.
	luks *luks.Header
}

// errNoKey fails guest I/O of an encrypted image opened without its key.
var errNoKey = &ioError{unix.EIO, errors.New("qcow2: encrypted image opened without a key")}

// openCrypto reads the encryption header and, unless the node was opened
// for metadata only, unlocks it with the secret named by encrypt.key-secret
// (QEMU's qcow2_update_options_prepare and qcrypto_block_open).
func (img *Image) openCrypto(co *coroutine.Co, opts bdrv.Options) error {
	h := img.hdr
	if h.CryptMethod == CryptNone {
		return nil
	}
	img.crypt.physical = h.CryptMethod == CryptLUKS
	if h.CryptMethod == CryptLUKS {
		area := h.Crypto
		if area.Length < luks.HeaderSize {
			return fmt.Errorf("qcow2: LUKS header area of %d bytes is too short", area.Length)
		}
		b, err := img.readFile(co, area.Offset, luks.HeaderSize)
		if err != nil {
			return fmt.Errorf("qcow2: reading LUKS header at %#x: %w", area.Offset, err)
		}
		if img.crypt.luks, err = luks.ParseHeader(b, int64(area.Length)); err != nil {
			return err
		}
	}
	if img.node.NoIO {
		return nil
	}
	id, ok := opts[OptKeySecret]
	if !ok {
		return fmt.Errorf("Parameter '%s' is required for cipher", OptKeySecret)
	}
	pass, err := bdrv.LookupSecret(id)
	if err != nil {
		return err
	}
	defer clear(pass)
	if h.CryptMethod == CryptAES {
		img.crypt.cipher = luks.NewQCowCipher(pass)
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
	if err != nil {
		return err
	}
	img.crypt.cipher = v.Cipher
	return nil
}

// encrypted reports whether guest data clusters are encrypted.
func (img *Image) encrypted() bool { return img.hdr.CryptMethod != CryptNone }

// cryptSector is the IV sector number of data at host offset host that
// holds guest offset guest.
func (img *Image) cryptSector(host, guest uint64) uint64 {
	if img.crypt.physical {
		return host / luks.SectorSize
	}
	return guest / luks.SectorSize
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
	if n%luks.SectorSize != 0 || host%luks.SectorSize != 0 {
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
		if len(r.buf)%luks.SectorSize != 0 || host%luks.SectorSize != 0 {
			return fmt.Errorf("qcow2: internal error: unaligned copy-on-write %#x+%d in an encrypted image: %w", host, len(r.buf), unix.EIO)
		}
		c.Encrypt(r.buf, img.cryptSector(host, m.offset+r.off))
	}
	return nil
}
