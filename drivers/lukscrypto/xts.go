package lukscrypto

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
)

// xtsCipher is AES-XTS (IEEE P1619) over whole sectors, the tweak being the
// little-endian sector number encrypted with the second key, as in
// x/crypto/xts and the kernel's dm-crypt "xts-plain64". It works on 64-bit
// words and keeps no per-call state in pools, which makes it several times
// faster than x/crypto/xts for 512-byte sectors (TestXTSMatchesXCrypto
// checks that both agree).
type xtsCipher struct {
	k1, k2 cipher.Block
}

func newXTS(key []byte) (*xtsCipher, error) {
	if len(key)%2 != 0 {
		return nil, fmt.Errorf("xts key of %d bytes", len(key))
	}
	k1, err := aes.NewCipher(key[:len(key)/2])
	if err != nil {
		return nil, err
	}
	k2, err := aes.NewCipher(key[len(key)/2:])
	if err != nil {
		return nil, err
	}
	return &xtsCipher{k1, k2}, nil
}

// crypt encrypts or decrypts one sector in place; len(s) is a multiple of
// 16.
func (x *xtsCipher) crypt(s []byte, sector uint64, encrypt bool) {
	le := binary.LittleEndian
	t0, t1 := x.tweak(sector)
	for ; len(s) >= 16; s = s[16:] {
		b := s[:16]
		le.PutUint64(b[:8], le.Uint64(b[:8])^t0)
		le.PutUint64(b[8:], le.Uint64(b[8:])^t1)
		if encrypt {
			x.k1.Encrypt(b, b)
		} else {
			x.k1.Decrypt(b, b)
		}
		le.PutUint64(b[:8], le.Uint64(b[:8])^t0)
		le.PutUint64(b[8:], le.Uint64(b[8:])^t1)
		// Multiply the tweak by x in GF(2^128) (little-endian, 0x87).
		carry := t1 >> 63
		t1 = t1<<1 | t0>>63
		t0 = t0<<1 ^ carry*0x87
	}
}

// tweak is the first tweak of sector, as two little-endian words.
func (x *xtsCipher) tweak(sector uint64) (t0, t1 uint64) {
	le := binary.LittleEndian
	var tb [16]byte
	le.PutUint64(tb[:8], sector)
	x.k2.Encrypt(tb[:], tb[:])
	return le.Uint64(tb[:8]), le.Uint64(tb[8:])
}

// decryptSectors decrypts whole sectors of SectorSize bytes in place, the
// first being sector number sector (32-bit numbers if plain). It lets the
// standard library's CBC decrypter, which decrypts many blocks at once,
// do the AES work: with X[i] = C[i]^T[i], CBC decryption with a zero IV
// yields D(X[i])^X[i-1], so P[i] = D(X[i])^T[i] is that ^X[i-1]^T[i].
func (x *xtsCipher) decryptSectors(buf []byte, sector uint64, plain bool) {
	le := binary.LittleEndian
	var zero [16]byte
	var xs [SectorSize]byte
	cbc := cipher.NewCBCDecrypter(x.k1, zero[:])
	for ; len(buf) >= SectorSize; buf, sector = buf[SectorSize:], sector+1 {
		n := sector
		if plain {
			n &= 0xffffffff
		}
		t0, t1 := x.tweak(n)
		s := buf[:SectorSize]
		for i := 0; i < SectorSize; i += 16 {
			le.PutUint64(s[i:], le.Uint64(s[i:])^t0)
			le.PutUint64(s[i+8:], le.Uint64(s[i+8:])^t1)
			carry := t1 >> 63
			t1 = t1<<1 | t0>>63
			t0 = t0<<1 ^ carry*0x87
		}
		copy(xs[:], s)
		cbc.(ivSetter).SetIV(zero[:])
		cbc.CryptBlocks(s, s)
		t0, t1 = x.tweak(n) // x.k2 again: cheaper than keeping 32 tweaks
		for i := 0; i < SectorSize; i += 16 {
			var p0, p1 uint64
			if i > 0 {
				p0, p1 = le.Uint64(xs[i-16:]), le.Uint64(xs[i-8:])
			}
			le.PutUint64(s[i:], le.Uint64(s[i:])^p0^t0)
			le.PutUint64(s[i+8:], le.Uint64(s[i+8:])^p1^t1)
			carry := t1 >> 63
			t1 = t1<<1 | t0>>63
			t0 = t0<<1 ^ carry*0x87
		}
	}
}
