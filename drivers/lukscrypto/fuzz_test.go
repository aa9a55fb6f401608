package lukscrypto

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"ublkimg/internal/fuzzlimit"
	"ublkimg/internal/qemutest"
)

// FuzzParseHeader feeds hostile headers to ParseHeader and, when one parses
// with cheap iteration counts, to Unlock, reading key material from the
// input itself. Parsing must never panic, and a parsed header must survive
// Marshal and ParseHeader unchanged. Seeds are a header qemu-img created and
// one from Create.
func FuzzParseHeader(f *testing.F) {
	if qemutest.Have(f, "qemu-img") {
		vol := filepath.Join(f.TempDir(), "seed.luks")
		qemuCreate(f, "-f", "luks", "--object", "secret,id=s0,data=x", "-o", "key-secret=s0,iter-time=1", vol, "1M")
		b, err := os.ReadFile(vol)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:4096], int64(len(b)))
	}
	_, area, err := Create([]byte("x"), CreateOptions{IterTime: time.Millisecond, CipherMode: "cbc", IVGenAlg: "essiv"})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(area[:4096], int64(0))
	f.Fuzz(func(t *testing.T, b []byte, limit int64) {
		fuzzlimit.Guard(t, fuzzlimit.Limits{Alloc: 64 << 20})
		h, err := ParseHeader(b, limit)
		if err != nil {
			return
		}
		again, err := ParseHeader(h.Marshal(), limit)
		if err != nil {
			t.Fatalf("re-parsing a marshalled header: %v", err)
		}
		if !bytes.Equal(again.Marshal(), h.Marshal()) {
			t.Fatal("header changes through Marshal and ParseHeader")
		}
		if h.MKDigestIter > 16 {
			return
		}
		for _, s := range h.Slots {
			if s.Active && s.Iterations > 16 {
				return
			}
		}
		v, err := h.Unlock([]byte("x"), readerOf(b))
		if err == nil {
			v.Cipher.Decrypt(make([]byte, SectorSize), 1)
		}
	})
}
