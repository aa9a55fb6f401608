package lukscrypto

import (
	"crypto/rand"
	"errors"
	"fmt"
	"time"
)

// Key slot management of an existing header (QEMU's
// qcrypto_block_luks_amend_options): state=active stores the master key in
// a slot under a new passphrase, state=inactive erases slots, chosen by
// number or by the passphrase they hold. The checks, their order and
// their messages are QEMU's.
//
// Crash consistency, as QEMU orders it: a new slot's key material is
// written (and flushed) before the header that activates it, and an
// erased slot is deactivated in the header (flushed) before its material
// is overwritten. A crash therefore leaves either the old header, whose
// slots all still open, or the new one.

// WriteAtFunc writes p at offset off of the header area (relative to the
// start of the header).
type WriteAtFunc func(p []byte, off int64) error

// AmendIO is how Amend reaches the header area.
type AmendIO struct {
	Read  ReadAtFunc
	Write WriteAtFunc
	// Flush makes the writes so far durable.
	Flush func() error
}

// AmendOptions are the options of a key slot change, as given (nil: not
// given), with QEMU's names in the comments.
type AmendOptions struct {
	State     *string // state: "active" or "inactive" (required)
	Keyslot   *int64  // keyslot
	NewSecret *string // new-secret: the id of the new passphrase
	OldSecret *string // old-secret: the id of the passphrase to erase
	IterTime  *int64  // iter-time, in milliseconds (default 2000)
	// Secret is the id of the secret the image was opened with: adding a
	// slot takes the master key from the slot it opens.
	Secret string
	// Force allows overwriting an active slot and erasing the last ones.
	Force bool
	// Lookup returns the passphrase of a secret id; Amend clears it after
	// use.
	Lookup func(id string) ([]byte, error)
}

// eraseIterations is how many times an erased slot's material is
// overwritten with random bytes (QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS).
const eraseIterations = 40

// Amend changes key slots of h as o says, writing through io. h is
// updated only as far as the header on disk is.
func (h *Header) Amend(o AmendOptions, io AmendIO) error {
	if o.State == nil {
		return errors.New("Parameter 'state' is missing")
	}
	switch *o.State {
	case "active":
		return h.addKeySlot(o, io)
	case "inactive":
		return h.eraseKeySlots(o, io)
	}
	return fmt.Errorf("Parameter 'state' does not accept value '%s'", *o.State)
}

// lookup returns the passphrase of secret id.
func (o *AmendOptions) lookup(id string) ([]byte, error) {
	if o.Lookup == nil {
		return nil, fmt.Errorf("No secret with id '%s'", id)
	}
	return o.Lookup(id)
}

func checkSlot(i int64) error {
	if i < 0 || i >= NumKeySlots {
		return fmt.Errorf("Invalid keyslot %d specified, must be between 0 and %d", i, NumKeySlots-1)
	}
	return nil
}

// addKeySlot is qcrypto_block_luks_amend_add_keyslot.
func (h *Header) addKeySlot(o AmendOptions, io AmendIO) error {
	iterTime := DefaultIterTime
	if o.IterTime != nil {
		iterTime = time.Duration(*o.IterTime) * time.Millisecond
	}
	if o.NewSecret == nil {
		return errors.New("'new-secret' is required to activate a keyslot")
	}
	if o.OldSecret != nil {
		return errors.New("'old-secret' must not be given when activating keyslots")
	}
	slot := -1
	if o.Keyslot != nil {
		if err := checkSlot(*o.Keyslot); err != nil {
			return err
		}
		slot = int(*o.Keyslot)
	} else {
		for i := range h.Slots {
			if !h.Slots[i].Active {
				slot = i
				break
			}
		}
		if slot < 0 {
			return errors.New("Can't add a keyslot - all keyslots are in use")
		}
	}
	if !o.Force && h.Slots[slot].Active {
		return fmt.Errorf("Refusing to overwrite active keyslot %d - please erase it first", slot)
	}
	old, err := o.lookup(o.Secret)
	if err != nil {
		return err
	}
	mk, err := h.masterKey(old, io.Read)
	clear(old)
	if err != nil {
		return err
	}
	defer clear(mk)
	pass, err := o.lookup(*o.NewSecret)
	if err != nil {
		return err
	}
	defer clear(pass)

	// The slot is set up in a copy of the header and in a buffer that
	// stands for the area up to the end of its key material.
	nh := *h
	off := int64(nh.Slots[slot].KeyOffset) * SectorSize
	area := make([]byte, off+roundUp(h.SplitKeySize(), SectorSize))
	defer clear(area)
	if err := nh.setSlot(slot, pass, mk, iterTime, area); err != nil {
		return err
	}
	if err := io.Write(area[off:off+h.SplitKeySize()], off); err != nil {
		return fmt.Errorf("writing key slot %d material: %w", slot, err)
	}
	if err := io.Flush(); err != nil {
		return err
	}
	if err := h.storeHeader(&nh, io); err != nil {
		return err
	}
	return nil
}

// storeHeader writes nh over the header, flushes, and makes it h.
func (h *Header) storeHeader(nh *Header, io AmendIO) error {
	if err := io.Write(nh.Marshal(), 0); err != nil {
		return fmt.Errorf("writing LUKS header: %w", err)
	}
	if err := io.Flush(); err != nil {
		return err
	}
	*h = *nh
	return nil
}

// eraseKeySlots is qcrypto_block_luks_amend_erase_keyslots.
func (h *Header) eraseKeySlots(o AmendOptions, io AmendIO) error {
	switch {
	case o.NewSecret != nil:
		return errors.New("'new-secret' must not be given when erasing keyslots")
	case o.IterTime != nil:
		return errors.New("'iter-time' must not be given when erasing keyslots")
	}
	var old []byte
	if o.OldSecret != nil {
		var err error
		if old, err = o.lookup(*o.OldSecret); err != nil {
			return err
		}
		defer clear(old)
	}
	tmp := make([]byte, h.KeyBytes)
	defer clear(tmp)
	active := 0
	for i := range h.Slots {
		if h.Slots[i].Active {
			active++
		}
	}
	switch {
	case o.Keyslot != nil:
		if err := checkSlot(*o.Keyslot); err != nil {
			return err
		}
		slot := int(*o.Keyslot)
		if old != nil {
			ok, err := h.tryslot(slot, old, io.Read, tmp)
			if err != nil {
				return err
			}
			if !ok {
				return fmt.Errorf("Given keyslot %d doesn't contain the given old password for erase operation", slot)
			}
		}
		if !o.Force && !h.Slots[slot].Active {
			return fmt.Errorf("Given keyslot %d is already erased (inactive) ", slot)
		}
		if !o.Force && active == 1 {
			return fmt.Errorf("Attempt to erase the only active keyslot %d which will erase all the data in the image irreversibly - refusing operation", slot)
		}
		return h.eraseSlot(slot, io)
	case old != nil:
		var match []int
		for i := range h.Slots {
			ok, err := h.tryslot(i, old, io.Read, tmp)
			if err != nil {
				return err
			}
			if ok {
				match = append(match, i)
			}
		}
		if len(match) == 0 {
			return errors.New("No keyslots match given (old) password for erase operation")
		}
		if !o.Force && len(match) == active {
			return errors.New("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation")
		}
		for _, i := range match {
			if err := h.eraseSlot(i, io); err != nil {
				return err
			}
		}
		return nil
	}
	return errors.New("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given")
}

// eraseSlot is qcrypto_block_luks_erase_key: the slot is deactivated in
// the header (salt and iterations cleared) and the header flushed before
// its key material is overwritten with random bytes.
func (h *Header) eraseSlot(i int, io AmendIO) error {
	nh := *h
	s := &nh.Slots[i]
	s.Active, s.Iterations, s.Salt = false, 0, [SaltSize]byte{}
	herr := h.storeHeader(&nh, io)
	// The material is overwritten even if the header update failed, as
	// QEMU does: the slot must not stay recoverable.
	garbage := make([]byte, h.SplitKeySize())
	off := int64(h.Slots[i].KeyOffset) * SectorSize
	for range eraseIterations {
		if _, err := rand.Read(garbage); err != nil {
			return err
		}
		if err := io.Write(garbage, off); err != nil {
			return fmt.Errorf("erasing key slot %d material: %w", i, err)
		}
	}
	if herr != nil {
		return herr
	}
	return io.Flush()
}
