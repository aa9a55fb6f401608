package lukscrypto

import (
	"crypto/rand"
	"fmt"
	"strings"
	"time"

	"golang.org/x/crypto/pbkdf2"
)

// CreateOptions are qemu-img's encrypt.* creation options. Zero values take
// qemu-img's defaults.
type CreateOptions struct {
	CipherAlg    string        // encrypt.cipher-alg: aes-128, aes-192, aes-256 (default)
	CipherMode   string        // encrypt.cipher-mode: xts (default), cbc
	IVGenAlg     string        // encrypt.ivgen-alg: plain64 (default), plain, essiv
	IVGenHashAlg string        // encrypt.ivgen-hash-alg: essiv's hash (default sha256)
	HashAlg      string        // encrypt.hash-alg: PBKDF2 and AF hash (default sha256)
	IterTime     time.Duration // encrypt.iter-time: PBKDF2 time per unlock (default 2 s)
}

// DefaultIterTime is qemu-img's default encrypt.iter-time.
const DefaultIterTime = 2000 * time.Millisecond

// minIterations is QEMU's floor for both slot and digest iterations.
const minIterations = 1000

// suite resolves the options into a cipher suite and master key size.
func (o CreateOptions) suite() (suite, int, error) {
	alg := cmp(o.CipherAlg, "aes-256")
	mode := cmp(o.CipherMode, "xts")
	ivgen := cmp(o.IVGenAlg, "plain64")
	switch ivgen {
	case "plain", "plain64", "essiv":
	default: // not a QAPI QCryptoIVGenAlgorithm
		return suite{}, 0, fmt.Errorf("Parameter 'ivgen-alg' does not accept value '%s'", ivgen)
	}
	var aesBytes int
	switch alg {
	case "aes-128":
		aesBytes = 16
	case "aes-192":
		aesBytes = 24
	case "aes-256":
		aesBytes = 32
	case "des", "3des":
		return suite{}, 0, fmt.Errorf("Algorithm '%s' not supported", alg)
	case "cast5-128", "serpent-128", "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256":
		// QEMU's other LUKS ciphers, which this package lacks.
		return suite{}, 0, fmt.Errorf("Cipher algorithm '%s' is not supported", alg)
	default:
		return suite{}, 0, fmt.Errorf("Parameter 'cipher-alg' does not accept value '%s'", alg)
	}
	keyBytes := aesBytes
	if mode == "xts" {
		keyBytes *= 2
	}
	ivspec := ivgen
	if ivgen == "essiv" {
		ivspec += ":" + cmp(o.IVGenHashAlg, "sha256")
	}
	s, err := parseSuite(strings.SplitN(alg, "-", 2)[0], mode+"-"+ivspec, cmp(o.HashAlg, "sha256"), keyBytes)
	return s, keyBytes, err
}

func cmp(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// Create makes a new LUKS1 volume protected by passphrase in key slot 0,
// laid out as QEMU lays it out: the header in the first 4096 bytes, then
// eight 4096-aligned key material areas, payload offset right after the
// last one. It returns the unlocked volume and the whole header area
// (Header.AreaSize bytes) to write at the start of the area.
func Create(passphrase []byte, o CreateOptions) (*Volume, []byte, error) {
	s, keyBytes, err := o.suite()
	if err != nil {
		return nil, nil, err
	}
	iterTime := o.IterTime
	if iterTime <= 0 {
		iterTime = DefaultIterTime
	}
	h := &Header{
		CipherName: "aes",
		CipherMode: s.modeString(),
		HashSpec:   s.hash,
		KeyBytes:   uint32(keyBytes),
		suite:      s,
	}
	if h.UUID, err = newUUID(); err != nil {
		return nil, nil, err
	}
	mk := make([]byte, keyBytes)
	defer clear(mk)
	if _, err := rand.Read(mk); err != nil {
		return nil, nil, fmt.Errorf("generating the master key: %w", err)
	}
	if _, err := rand.Read(h.MKDigestSalt[:]); err != nil {
		return nil, nil, err
	}
	// The digest gets an eighth of the time, as in QEMU and cryptsetup.
	h.MKDigestIter = iterations(s, DigestSize, iterTime/8)
	d := pbkdf2.Key(mk, h.MKDigestSalt[:], int(h.MKDigestIter), DigestSize, s.newHash)
	copy(h.MKDigest[:], d)

	first, splitSectors, payload := layout(keyBytes)
	for i := range h.Slots {
		h.Slots[i] = KeySlot{KeyOffset: uint32(first + int64(i)*splitSectors), Stripes: Stripes}
	}
	h.PayloadOffset = uint32(payload)

	area := make([]byte, h.AreaSize())
	copy(area, h.Marshal())
	if err := h.setSlot(0, passphrase, mk, iterTime, area); err != nil {
		return nil, nil, err
	}
	copy(area, h.Marshal())
	c, err := s.newCipher(mk)
	if err != nil {
		return nil, nil, err
	}
	return &Volume{Header: h, Cipher: c}, area, nil
}

// layout places the header area of a master key of keyBytes bytes as QEMU
// does, in sectors: the first key slot after the 4096-byte header, each
// slot's material rounded up to 4096 bytes, the payload after the last.
func layout(keyBytes int) (first, slotSectors, payload int64) {
	split := roundUp(int64(keyBytes)*Stripes, SectorSize) / SectorSize
	first = keySlotAlign / SectorSize
	slotSectors = roundUp(split, keySlotAlign/SectorSize)
	return first, slotSectors, first + NumKeySlots*slotSectors
}

// AreaSize returns the size in bytes of the header area Create makes with
// options o (what qemu-img measure adds for encrypt.format=luks).
func AreaSize(o CreateOptions) (int64, error) {
	_, keyBytes, err := o.suite()
	if err != nil {
		return 0, err
	}
	_, _, payload := layout(keyBytes)
	return payload * SectorSize, nil
}

// setSlot activates slot i for passphrase: fresh salt, iteration count for
// iterTime, AF-split master key encrypted into the slot's place in area.
func (h *Header) setSlot(i int, passphrase, mk []byte, iterTime time.Duration, area []byte) error {
	s := &h.Slots[i]
	if _, err := rand.Read(s.Salt[:]); err != nil {
		return err
	}
	s.Iterations = iterations(h.suite, int(h.KeyBytes), iterTime)
	slotKey := pbkdf2.Key(passphrase, s.Salt[:], int(s.Iterations), int(h.KeyBytes), h.suite.newHash)
	defer clear(slotKey)
	c, err := h.suite.newCipher(slotKey)
	if err != nil {
		return err
	}
	off := int64(s.KeyOffset) * SectorSize
	split := area[off : off+roundUp(h.SplitKeySize(), SectorSize)]
	n := int(h.SplitKeySize())
	if _, err := rand.Read(split[:n-int(h.KeyBytes)]); err != nil {
		return err
	}
	afSplit(split[:n], mk, Stripes, h.suite.newHash())
	c.Encrypt(split, 0)
	s.Active = true
	return nil
}

// iterations measures how many PBKDF2 iterations of s's hash producing
// keyLen bytes fit in d, with QEMU's floor of 1000 and this package's cap.
func iterations(s suite, keyLen int, d time.Duration) uint32 {
	pw, salt := make([]byte, 32), make([]byte, SaltSize)
	n := 1 << 10
	var el time.Duration
	for {
		t := time.Now()
		pbkdf2.Key(pw, salt, n, keyLen, s.newHash)
		el = time.Since(t)
		if el >= 20*time.Millisecond || el >= d || n >= MaxIterations {
			break
		}
		n *= 2
	}
	el = max(el, time.Microsecond)
	it := float64(n) * float64(d) / float64(el)
	return uint32(min(max(it, minIterations), MaxIterations))
}

// newUUID returns a random (version 4) UUID in its canonical text form.
func newUUID() (string, error) {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		return "", err
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:]), nil
}
