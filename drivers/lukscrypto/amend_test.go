package lukscrypto

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"time"
)

// fileIO is a header area in memory that records its writes and flushes,
// so that a crash after any write can be replayed: crashAt(k) is the area
// as it would be on disk had only the first k writes reached it.
type fileIO struct {
	orig   []byte
	area   []byte
	writes []write
	epoch  int // flushes so far
}

type write struct {
	off   int64
	data  []byte
	epoch int
}

func newFileIO(area []byte) *fileIO {
	return &fileIO{orig: bytes.Clone(area), area: bytes.Clone(area)}
}

func (f *fileIO) io() AmendIO {
	return AmendIO{
		Read: readerOf(f.area),
		Write: func(p []byte, off int64) error {
			if off < 0 || off+int64(len(p)) > int64(len(f.area)) {
				return errors.New("write beyond the area")
			}
			copy(f.area[off:], p)
			f.writes = append(f.writes, write{off, bytes.Clone(p), f.epoch})
			return nil
		},
		Flush: func() error { f.epoch++; return nil },
	}
}

func (f *fileIO) crashAt(k int) []byte {
	b := bytes.Clone(f.orig)
	for _, w := range f.writes[:k] {
		copy(b[w.off:], w.data)
	}
	return b
}

// opens reports whether passphrase unlocks the header area b.
func opens(t *testing.T, b []byte, pass string) bool {
	t.Helper()
	h, err := ParseHeader(b, int64(len(b)))
	if err != nil {
		t.Fatalf("header after crash: %v", err)
	}
	_, err = h.Unlock([]byte(pass), readerOf(b))
	if err != nil && !errors.Is(err, ErrInvalidPassword) {
		t.Fatal(err)
	}
	return err == nil
}

// TestAmendCrash: adding a key slot writes its material in an earlier
// flush epoch than the header that activates it, and erasing one
// deactivates it in the header in an earlier epoch than the first
// overwrite of its material; a crash after any write leaves a header whose
// passphrases each open the volume or are refused, never a slot that is
// active with broken material.
func TestAmendCrash(t *testing.T) {
	const it = int64(1)
	secrets := map[string]string{"a": "pass-a", "b": "pass-b"}
	lookup := func(id string) ([]byte, error) {
		if p, ok := secrets[id]; ok {
			return []byte(p), nil
		}
		return nil, fmt.Errorf("No secret with id '%s'", id)
	}
	_, area, err := Create([]byte("pass-a"), CreateOptions{IterTime: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader(area, int64(len(area)))
	if err != nil {
		t.Fatal(err)
	}

	// Add "b" in slot 2.
	f := newFileIO(area)
	active, slot := "active", int64(2)
	if err := h.Amend(AmendOptions{State: &active, Keyslot: &slot, NewSecret: new("b"), IterTime: new(it), Secret: "a", Lookup: lookup}, f.io()); err != nil {
		t.Fatal(err)
	}
	if len(f.writes) != 2 || f.writes[0].off != int64(h.Slots[2].KeyOffset)*SectorSize || f.writes[1].off != 0 || f.writes[0].epoch >= f.writes[1].epoch || f.epoch <= f.writes[1].epoch {
		t.Fatalf("add: writes (offset, epoch) %v, want the material, a flush, the header, a flush", summary(f.writes))
	}
	f.checkCrashes(t, "add", "pass-a", "pass-b", 2)
	added := bytes.Clone(f.area)

	// Erase "a" by its passphrase.
	f = newFileIO(added)
	inactive := "inactive"
	if err := h.Amend(AmendOptions{State: &inactive, OldSecret: new("a"), Lookup: lookup}, f.io()); err != nil {
		t.Fatal(err)
	}
	if len(f.writes) != 1+eraseIterations || f.writes[0].off != 0 || f.writes[0].epoch >= f.writes[1].epoch || h.Slots[0].Active {
		t.Fatalf("erase: writes (offset, epoch) %v, want the header, a flush, then the material", summary(f.writes))
	}
	f.checkCrashes(t, "erase", "pass-b", "pass-a", 0)
	if bytes.Contains(f.area, f.orig[int64(h.Slots[0].KeyOffset)*SectorSize:][:h.SplitKeySize()]) {
		t.Error("erase: the slot's key material is still in the area")
	}
}

// checkCrashes replays a crash after every write: kept always opens the
// volume, changed only after exactly `after` writes (the new passphrase
// once its header is written; the erased one before any write).
func (f *fileIO) checkCrashes(t *testing.T, what, kept, changed string, after int) {
	t.Helper()
	for k := range len(f.writes) + 1 {
		b := f.crashAt(k)
		if !opens(t, b, kept) {
			t.Errorf("%s, crash after %d writes: %q no longer opens", what, k, kept)
		}
		if got, want := opens(t, b, changed), k == after; got != want {
			t.Errorf("%s, crash after %d writes: %q opens %v, want %v", what, k, changed, got, want)
		}
	}
}

func summary(ws []write) string {
	var s []string
	for _, w := range ws {
		s = append(s, fmt.Sprintf("(%d, %d)", w.off, w.epoch))
	}
	return fmt.Sprint(s)
}
