package qcow2

import (
	"errors"
	"fmt"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/lukscrypto"
)

// Key slot changes of a LUKS-encrypted image (qemu-img amend -o
// encrypt.state=..., QEMU's qcow2_amend_options handing the encrypt.*
// options to qcrypto_block_amend_options). The LUKS header area is the
// image's crypto header extension; the luks package orders the writes so
// that a crash leaves a header whose active slots all open.

// Errors of an encryption amend on an image without LUKS, worded as QEMU's.
var (
	ErrAmendNoCrypto = errors.New("Can't amend encryption options - encryption not present")
	ErrAmendNotLUKS  = errors.New("Only LUKS encryption options can be amended")
)

// checkAmendCrypto refuses encrypt.* options on an image they cannot
// apply to (QEMU checks this among the option values, before any change).
func (img *Image) checkAmendCrypto() error {
	switch {
	case img.hdr.CryptMethod == CryptNone:
		return ErrAmendNoCrypto
	case img.hdr.CryptMethod != CryptLUKS:
		return ErrAmendNotLUKS
	case img.crypt.luks == nil:
		return errNoKey
	}
	return nil
}

// amendCryptoLocked applies o to the LUKS header. Called with img.meta
// held.
func (img *Image) amendCryptoLocked(co *coroutine.Co, o lukscrypto.AmendOptions) error {
	area := img.hdr.Crypto
	inArea := func(p []byte, off int64) error {
		if off < 0 || uint64(off)+uint64(len(p)) > area.Length {
			return fmt.Errorf("qcow2: LUKS header access at %#x+%d outside the %d-byte header area", off, len(p), area.Length)
		}
		return nil
	}
	if o.Lookup == nil {
		o.Lookup = bdrv.LookupSecret
	}
	return img.crypt.luks.Amend(o, lukscrypto.AmendIO{
		Read: func(p []byte, off int64) error {
			if err := inArea(p, off); err != nil {
				return err
			}
			buf, err := img.readFile(co, area.Offset+uint64(off), uint64(len(p)))
			if err == nil {
				copy(p, buf)
				clear(buf)
			}
			return err
		},
		Write: func(p []byte, off int64) error {
			if err := inArea(p, off); err != nil {
				return err
			}
			return img.file.Pwritev(co, int64(area.Offset)+off, bdrv.IOVec{p}, 0)
		},
		Flush: func() error { return img.file.Flush(co) },
	})
}
