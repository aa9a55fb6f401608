package lukscrypto

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"hash"
	"strings"
)

// suite is a parsed cipher specification: AES in XTS, CBC or CTR mode with a
// plain, plain64 or essiv IV generator, and the hash used by PBKDF2 and the
// AF splitter.
type suite struct {
	aesKeyBytes int    // 16, 24 or 32: one AES key
	mode        string // "xts", "cbc" or "ctr"
	ivgen       string // "plain", "plain64" or "essiv"
	ivgenHash   string // essiv's hash name
	hash        string // PBKDF2 / AF hash name
	newHash     func() hash.Hash
	newIVHash   func() hash.Hash
}

// hashes are the LUKS hash_spec names this package supports.
var hashes = map[string]func() hash.Hash{
	"md5":    md5.New,
	"sha1":   sha1.New,
	"sha224": sha256.New224,
	"sha256": sha256.New,
	"sha384": sha512.New384,
	"sha512": sha512.New,
}

// parseSuite resolves the header's cipher_name, cipher_mode and hash_spec
// for a master key of keyBytes bytes. Unsupported choices are refused by
// name.
func parseSuite(name, mode, hashSpec string, keyBytes int) (suite, error) {
	var s suite
	if name != "aes" {
		return s, fmt.Errorf("Cipher name '%s' is not supported", name)
	}
	m, iv, ok := strings.Cut(mode, "-")
	if !ok {
		return s, fmt.Errorf("Cipher mode '%s' is not supported", mode)
	}
	s.mode = m
	switch m {
	case "xts":
		s.aesKeyBytes = keyBytes / 2
		if keyBytes%2 != 0 {
			s.aesKeyBytes = 0
		}
	case "cbc", "ctr":
		s.aesKeyBytes = keyBytes
	default:
		return s, fmt.Errorf("Cipher mode '%s' is not supported", mode)
	}
	switch s.aesKeyBytes {
	case 16, 24, 32:
	default:
		return s, fmt.Errorf("Algorithm '%s' with key size %d bytes not supported", name, keyBytes)
	}
	ivAlg, ivHash, hasHash := strings.Cut(iv, ":")
	s.ivgen = ivAlg
	switch ivAlg {
	case "plain", "plain64":
		if hasHash {
			return s, fmt.Errorf("IV generator '%s' is not supported", iv)
		}
	case "essiv":
		if m == "xts" {
			return s, fmt.Errorf("Cipher mode '%s' is not supported", mode)
		}
		f, ok := hashes[ivHash]
		if !ok {
			return s, fmt.Errorf("Hash algorithm '%s' is not supported", ivHash)
		}
		s.ivgenHash, s.newIVHash = ivHash, f
	default:
		return s, fmt.Errorf("IV generator '%s' is not supported", iv)
	}
	f, ok := hashes[hashSpec]
	if !ok {
		return s, fmt.Errorf("Hash algorithm '%s' is not supported", hashSpec)
	}
	s.hash, s.newHash = hashSpec, f
	return s, nil
}

// String returns the cipher_mode field for s ("xts-plain64").
func (s suite) modeString() string {
	if s.ivgen == "essiv" {
		return s.mode + "-essiv:" + s.ivgenHash
	}
	return s.mode + "-" + s.ivgen
}

// Cipher encrypts and decrypts whole sectors in place. It is safe for
// concurrent use: it holds only expanded keys.
type Cipher struct {
	xts   *xtsCipher   // xts mode
	block cipher.Block // cbc and ctr modes
	ctr   bool         // ctr mode: the IV is the initial counter block
	essiv cipher.Block // essiv IV generator: AES keyed with hash(key)
	plain bool         // 32-bit sector numbers (plain) instead of 64-bit
}

// newCipher builds the sector cipher of suite s with key.
func (s suite) newCipher(key []byte) (*Cipher, error) {
	if len(key) != s.keyBytes() {
		return nil, fmt.Errorf("cipher key is %d bytes, want %d", len(key), s.keyBytes())
	}
	c := &Cipher{plain: s.ivgen == "plain", ctr: s.mode == "ctr"}
	var err error
	switch s.mode {
	case "xts":
		c.xts, err = newXTS(key)
	default:
		c.block, err = aes.NewCipher(key)
	}
	if err != nil {
		return nil, err
	}
	if s.ivgen == "essiv" {
		h := s.newIVHash()
		h.Write(key)
		sum := h.Sum(nil)
		// The essiv key is the digest; AES takes 16, 24 or 32 bytes, so a
		// longer digest is refused as QEMU does (its key size must match).
		if len(sum) > 32 {
			return nil, fmt.Errorf("Hash algorithm '%s' is too long for an essiv key", s.ivgenHash)
		}
		c.essiv, err = aes.NewCipher(sum)
		clear(sum)
		if err != nil {
			return nil, fmt.Errorf("essiv key: %w", err)
		}
	}
	return c, nil
}

// keyBytes is the size of the key the suite takes.
func (s suite) keyBytes() int {
	if s.mode == "xts" {
		return 2 * s.aesKeyBytes
	}
	return s.aesKeyBytes
}

// NewQCowCipher returns the legacy qcow/qcow2 "AES" cipher (crypt_method 1):
// AES-128-CBC with a plain64 IV, keyed with the passphrase's first 16 bytes,
// zero-padded when shorter, as QEMU's crypto/block-qcow.c does. The IV's
// sector number is the guest sector.
func NewQCowCipher(passphrase []byte) *Cipher {
	var key [16]byte
	copy(key[:], passphrase)
	b, err := aes.NewCipher(key[:])
	clear(key[:])
	if err != nil {
		panic(err) // a 16-byte key is always valid
	}
	return &Cipher{block: b}
}

// iv fills iv with the initial vector of sector.
func (c *Cipher) iv(iv *[aes.BlockSize]byte, sector uint64) {
	*iv = [aes.BlockSize]byte{}
	if c.plain {
		sector &= 0xffffffff
	}
	binary.LittleEndian.PutUint64(iv[:8], sector)
	if c.essiv != nil {
		c.essiv.Encrypt(iv[:], iv[:])
	}
}

// checkLen panics unless buf holds whole sectors: callers align requests to
// SectorSize, so anything else is a programming error.
func checkLen(buf []byte) {
	if len(buf)%SectorSize != 0 {
		panic(fmt.Sprintf("luks: buffer of %d bytes is not a multiple of %d", len(buf), SectorSize))
	}
}

// Encrypt encrypts buf in place; buf holds whole sectors, the first of which
// is sector number sector.
func (c *Cipher) Encrypt(buf []byte, sector uint64) { c.crypt(buf, sector, true) }

// Decrypt decrypts buf in place; buf holds whole sectors, the first of which
// is sector number sector.
func (c *Cipher) Decrypt(buf []byte, sector uint64) { c.crypt(buf, sector, false) }

func (c *Cipher) crypt(buf []byte, sector uint64, encrypt bool) {
	checkLen(buf)
	if c.xts != nil && !encrypt {
		c.xts.decryptSectors(buf, sector, c.plain)
		return
	}
	var iv [aes.BlockSize]byte
	var cbc cipher.BlockMode
	for ; len(buf) > 0; buf, sector = buf[SectorSize:], sector+1 {
		s := buf[:SectorSize]
		if c.xts != nil {
			n := sector
			if c.plain {
				n &= 0xffffffff
			}
			c.xts.crypt(s, n, encrypt)
			continue
		}
		c.iv(&iv, sector)
		if c.ctr {
			cipher.NewCTR(c.block, iv[:]).XORKeyStream(s, s)
			continue
		}
		switch {
		case cbc != nil:
			cbc.(ivSetter).SetIV(iv[:])
		case encrypt:
			cbc = cipher.NewCBCEncrypter(c.block, iv[:])
		default:
			cbc = cipher.NewCBCDecrypter(c.block, iv[:])
		}
		cbc.CryptBlocks(s, s)
	}
}

// ivSetter is implemented by the standard library's CBC modes; it lets one
// BlockMode serve every sector of a request.
type ivSetter interface{ SetIV([]byte) }
