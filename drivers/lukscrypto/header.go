package lukscrypto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// On-disk constants of LUKS1 (cryptsetup docs/on-disk-format.pdf, 1.2.1).
const (
	// HeaderSize is the size of the LUKS1 partition header (phdr).
	HeaderSize = 592
	// SectorSize is the unit of payload_offset and key_material_offset and
	// the size of one encryption sector (the IV advances once per sector).
	SectorSize = 512
	// NumKeySlots is the number of key slots in a LUKS1 header.
	NumKeySlots = 8
	// Stripes is the anti-forensic stripe count QEMU writes and requires.
	Stripes = 4000
	// DigestSize is the size of the master key digest.
	DigestSize = 20
	// SaltSize is the size of the digest and key slot salts.
	SaltSize = 32
	// MaxKeyBytes bounds the master key size (AES-256-XTS uses 64 bytes).
	MaxKeyBytes = 64
	// MaxIterations caps the PBKDF2 iteration counts accepted from a header:
	// a hostile header must not turn an unlock into an hour of hashing. It is
	// far above what qemu-img's 2 s default produces on current hardware.
	MaxIterations = 1 << 24

	slotActive   = 0x00AC71F3
	slotDisabled = 0x0000DEAD

	// keySlotAlign is the alignment QEMU (and cryptsetup) give key material.
	keySlotAlign = 4096
)

var magic = [6]byte{'L', 'U', 'K', 'S', 0xba, 0xbe}

// ErrNotLUKS is returned by ParseHeader when the magic does not match.
var ErrNotLUKS = errors.New("Volume is not in LUKS format")

// KeySlot is one of the eight key slots of a LUKS1 header (48 bytes on disk:
// active, iterations, salt[32], key_material_offset, stripes).
type KeySlot struct {
	Active     bool
	Iterations uint32
	Salt       [SaltSize]byte
	// KeyOffset is the start of the slot's key material in sectors, relative
	// to the start of the header.
	KeyOffset uint32
	Stripes   uint32
}

// Header is a parsed and validated LUKS1 partition header.
type Header struct {
	CipherName string // "aes"
	CipherMode string // "xts-plain64", "cbc-essiv:sha256", ...
	HashSpec   string // "sha256"
	// PayloadOffset is the size of the header area (header and key
	// material) in sectors; for a raw LUKS volume the payload starts there.
	PayloadOffset uint32
	KeyBytes      uint32 // master key size
	MKDigest      [DigestSize]byte
	MKDigestSalt  [SaltSize]byte
	MKDigestIter  uint32
	UUID          string
	Slots         [NumKeySlots]KeySlot

	suite suite // parsed CipherName/CipherMode/HashSpec
}

// AreaSize returns the size in bytes of the header area (PayloadOffset
// sectors).
func (h *Header) AreaSize() int64 { return int64(h.PayloadOffset) * SectorSize }

// SplitKeySize returns the size in bytes of one slot's key material.
func (h *Header) SplitKeySize() int64 { return int64(h.KeyBytes) * int64(Stripes) }

// cstring returns the NUL-terminated string of a fixed-size field.
func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// ParseHeader parses and validates a LUKS1 header. b holds at least
// HeaderSize bytes from the start of the header area; areaLimit, when
// positive, is the number of bytes available to the header area (the qcow2
// full disk encryption extension's length), which key material and the
// payload offset must not exceed. Errors read like QEMU's.
func ParseHeader(b []byte, areaLimit int64) (*Header, error) {
	if len(b) < HeaderSize {
		return nil, fmt.Errorf("LUKS header is truncated (%d bytes)", len(b))
	}
	if !bytes.Equal(b[:6], magic[:]) {
		return nil, ErrNotLUKS
	}
	be := binary.BigEndian
	if v := be.Uint16(b[6:]); v != 1 {
		return nil, fmt.Errorf("LUKS version %d is not supported", v)
	}
	h := &Header{
		CipherName:    cstring(b[8:40]),
		CipherMode:    cstring(b[40:72]),
		HashSpec:      cstring(b[72:104]),
		PayloadOffset: be.Uint32(b[104:]),
		KeyBytes:      be.Uint32(b[108:]),
		MKDigestIter:  be.Uint32(b[164:]),
		UUID:          cstring(b[168:208]),
	}
	copy(h.MKDigest[:], b[112:132])
	copy(h.MKDigestSalt[:], b[132:164])
	for i := range h.Slots {
		p := b[208+48*i:]
		s := &h.Slots[i]
		switch st := be.Uint32(p); st {
		case slotActive:
			s.Active = true
		case slotDisabled:
		default:
			return nil, fmt.Errorf("Keyslot %d state (active/disable) is corrupted", i)
		}
		s.Iterations = be.Uint32(p[4:])
		copy(s.Salt[:], p[8:40])
		s.KeyOffset = be.Uint32(p[40:])
		s.Stripes = be.Uint32(p[44:])
	}
	if err := h.validate(areaLimit); err != nil {
		return nil, err
	}
	return h, nil
}

// validate checks every field that later code uses as a size, an offset or
// a loop bound, and resolves the cipher suite.
func (h *Header) validate(areaLimit int64) error {
	if h.KeyBytes == 0 || h.KeyBytes > MaxKeyBytes {
		return fmt.Errorf("LUKS key size %d bytes is not supported", h.KeyBytes)
	}
	s, err := parseSuite(h.CipherName, h.CipherMode, h.HashSpec, int(h.KeyBytes))
	if err != nil {
		return err
	}
	h.suite = s
	if h.MKDigestIter == 0 || h.MKDigestIter > MaxIterations {
		return fmt.Errorf("LUKS master key digest iterations %d out of range (1..%d)", h.MKDigestIter, MaxIterations)
	}
	area := h.AreaSize()
	if areaLimit > 0 && area > areaLimit {
		return fmt.Errorf("LUKS payload offset %d sectors exceeds the header area (%d bytes)", h.PayloadOffset, areaLimit)
	}
	hdrSectors := int64((HeaderSize + SectorSize - 1) / SectorSize)
	keySectors := (h.SplitKeySize() + SectorSize - 1) / SectorSize
	for i := range h.Slots {
		s := &h.Slots[i]
		if s.Stripes != Stripes {
			return fmt.Errorf("Keyslot %d is corrupted (stripes %d != %d)", i, s.Stripes, Stripes)
		}
		start := int64(s.KeyOffset)
		if start < hdrSectors {
			return fmt.Errorf("Keyslot %d is overlapping with the LUKS header", i)
		}
		if start+keySectors > int64(h.PayloadOffset) {
			return fmt.Errorf("Keyslot %d is overlapping with the encrypted payload", i)
		}
		if s.Active && (s.Iterations == 0 || s.Iterations > MaxIterations) {
			return fmt.Errorf("Keyslot %d iterations %d out of range (1..%d)", i, s.Iterations, MaxIterations)
		}
	}
	for i := range h.Slots {
		start := int64(h.Slots[i].KeyOffset)
		for j := i + 1; j < len(h.Slots); j++ {
			o := int64(h.Slots[j].KeyOffset)
			if start < o+keySectors && o < start+keySectors {
				return fmt.Errorf("Keyslots %d and %d are overlapping in the header", i, j)
			}
		}
	}
	return nil
}

// putString writes s into a fixed-size NUL-padded field.
func putString(dst []byte, s string) {
	clear(dst)
	copy(dst[:len(dst)-1], s)
}

// Marshal returns the HeaderSize bytes of the on-disk header.
func (h *Header) Marshal() []byte {
	b := make([]byte, HeaderSize)
	be := binary.BigEndian
	copy(b, magic[:])
	be.PutUint16(b[6:], 1)
	putString(b[8:40], h.CipherName)
	putString(b[40:72], h.CipherMode)
	putString(b[72:104], h.HashSpec)
	be.PutUint32(b[104:], h.PayloadOffset)
	be.PutUint32(b[108:], h.KeyBytes)
	copy(b[112:132], h.MKDigest[:])
	copy(b[132:164], h.MKDigestSalt[:])
	be.PutUint32(b[164:], h.MKDigestIter)
	putString(b[168:208], h.UUID)
	for i := range h.Slots {
		p := b[208+48*i:]
		s := &h.Slots[i]
		if s.Active {
			be.PutUint32(p, slotActive)
		} else {
			be.PutUint32(p, slotDisabled)
		}
		be.PutUint32(p[4:], s.Iterations)
		copy(p[8:40], s.Salt[:])
		be.PutUint32(p[40:], s.KeyOffset)
		be.PutUint32(p[44:], s.Stripes)
	}
	return b
}

// Suite describes the cipher of a header the way qemu-img info reports it.
type Suite struct {
	CipherAlg  string // "aes-256"
	CipherMode string // "xts"
	IVGenAlg   string // "plain64"
	IVGenHash  string // "sha256" for essiv, else ""
	HashAlg    string // "sha256"
}

// Suite returns the header's cipher suite in qemu-img info's terms.
func (h *Header) Suite() Suite {
	s := h.suite
	return Suite{
		CipherAlg:  fmt.Sprintf("aes-%d", s.aesKeyBytes*8),
		CipherMode: s.mode,
		IVGenAlg:   s.ivgen,
		IVGenHash:  s.ivgenHash,
		HashAlg:    s.hash,
	}
}
