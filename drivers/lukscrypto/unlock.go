package lukscrypto

import (
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"

	"golang.org/x/crypto/pbkdf2"
)

// ErrInvalidPassword is returned by Unlock when no active key slot opens
// with the passphrase (QEMU's wording).
var ErrInvalidPassword = errors.New("Invalid password, cannot unlock any keyslot")

// diffuse is the AF splitter's diffusion: block is hashed in digest-sized
// chunks, each prefixed with its big-endian index.
func diffuse(h hash.Hash, block []byte) {
	ds := h.Size()
	var idx [4]byte
	sum := make([]byte, 0, 64)
	for i := 0; i*ds < len(block); i++ {
		chunk := block[i*ds : min((i+1)*ds, len(block))]
		h.Reset()
		binary.BigEndian.PutUint32(idx[:], uint32(i))
		h.Write(idx[:])
		h.Write(chunk)
		sum = h.Sum(sum[:0])
		copy(chunk, sum)
	}
	clear(sum)
}

// afMerge recovers a key of len(dst) bytes from split material of stripes
// blocks.
func afMerge(dst, split []byte, stripes int, h hash.Hash) {
	n := len(dst)
	clear(dst)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(dst, dst, split[i*n:(i+1)*n])
		diffuse(h, dst)
	}
	subtle.XORBytes(dst, dst, split[(stripes-1)*n:stripes*n])
}

// afSplit spreads key over stripes blocks in split, whose first stripes-1
// blocks the caller filled with random bytes.
func afSplit(split, key []byte, stripes int, h hash.Hash) {
	n := len(key)
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, split[i*n:(i+1)*n])
		diffuse(h, d)
	}
	subtle.XORBytes(split[(stripes-1)*n:stripes*n], d, key)
	clear(d)
}

// Volume is an unlocked LUKS header: the header and the payload cipher. The
// master key itself is not kept.
type Volume struct {
	Header *Header
	Cipher *Cipher
}

// ReadAtFunc reads len(p) bytes of the header area at offset off (relative
// to the start of the header).
type ReadAtFunc func(p []byte, off int64) error

// Unlock tries every active key slot with passphrase, as QEMU does, and
// returns the payload cipher of the first one whose master key matches the
// header's digest. read fetches key material from the header area. A
// passphrase that opens no slot gives ErrInvalidPassword; I/O errors are
// returned as they are.
func (h *Header) Unlock(passphrase []byte, read ReadAtFunc) (*Volume, error) {
	mk, err := h.masterKey(passphrase, read)
	if err != nil {
		return nil, err
	}
	defer clear(mk)
	c, err := h.suite.newCipher(mk)
	if err != nil {
		return nil, err
	}
	return &Volume{Header: h, Cipher: c}, nil
}

// masterKey returns the master key that the first active slot opened by
// passphrase holds (QEMU's qcrypto_block_luks_find_key), or
// ErrInvalidPassword. The caller clears it after use.
func (h *Header) masterKey(passphrase []byte, read ReadAtFunc) ([]byte, error) {
	mk := make([]byte, h.KeyBytes)
	for i := range h.Slots {
		ok, err := h.tryslot(i, passphrase, read, mk)
		if err != nil {
			clear(mk)
			return nil, err
		}
		if ok {
			return mk, nil
		}
	}
	clear(mk)
	return nil, ErrInvalidPassword
}

// tryslot derives slot i's key from passphrase, decrypts and merges its key
// material into mk and checks mk against the master key digest.
func (h *Header) tryslot(i int, passphrase []byte, read ReadAtFunc, mk []byte) (bool, error) {
	s := &h.Slots[i]
	if !s.Active {
		return false, nil
	}
	split := make([]byte, roundUp(h.SplitKeySize(), SectorSize))
	defer clear(split)
	if err := read(split, int64(s.KeyOffset)*SectorSize); err != nil {
		return false, fmt.Errorf("reading key slot %d material: %w", i, err)
	}
	slotKey := pbkdf2.Key(passphrase, s.Salt[:], int(s.Iterations), int(h.KeyBytes), h.suite.newHash)
	defer clear(slotKey)
	c, err := h.suite.newCipher(slotKey)
	if err != nil {
		return false, err
	}
	c.Decrypt(split, 0)
	afMerge(mk, split, int(s.Stripes), h.suite.newHash())
	return h.verify(mk), nil
}

// verify compares mk's PBKDF2 digest with the header's, in constant time.
func (h *Header) verify(mk []byte) bool {
	d := pbkdf2.Key(mk, h.MKDigestSalt[:], int(h.MKDigestIter), DigestSize, h.suite.newHash)
	defer clear(d)
	return subtle.ConstantTimeCompare(d, h.MKDigest[:]) == 1
}

func roundUp(n, a int64) int64 { return (n + a - 1) / a * a }
