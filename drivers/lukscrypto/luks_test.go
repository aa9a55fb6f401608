package lukscrypto

import (
	"bytes"
	"crypto/aes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/xts"

	"ublkimg/internal/qemutest"
)

const testPass = "correct horse"

func run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// qemuLUKS creates a raw LUKS volume of size bytes with qemu-img (extra are
// more -o options), fills it with random data through qemu-img convert and
// returns the volume's path and the plaintext.
func qemuLUKS(t testing.TB, dir string, size int, extra string) (string, []byte) {
	t.Helper()
	vol := filepath.Join(dir, "v.luks")
	plain := make([]byte, size)
	rand.Read(plain)
	src := filepath.Join(dir, "plain.raw")
	if err := os.WriteFile(src, plain, 0o644); err != nil {
		t.Fatal(err)
	}
	opts := "key-secret=s0,iter-time=10"
	if extra != "" {
		opts += "," + extra
	}
	qemuCreate(t, "-f", "luks", "--object", "secret,id=s0,data="+testPass, "-o", opts, vol, "1M")
	run(t, "qemu-img", "convert", "-n", "--object", "secret,id=s0,data="+testPass, "-f", "raw", src,
		"--target-image-opts", "driver=luks,file.filename="+vol+",key-secret=s0")
	return vol, plain
}

// qemuCreate runs qemu-img create, retrying QEMU's occasional failure to
// time its PBKDF2 benchmark on a loaded machine.
func qemuCreate(t testing.TB, args ...string) {
	t.Helper()
	args = append([]string{"create", "-q"}, args...)
	var err error
	out := qemutest.RetryPBKDF2Timing(func() string {
		var b []byte
		b, err = exec.Command("qemu-img", args...).CombinedOutput()
		return string(b)
	})
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func readerOf(b []byte) ReadAtFunc {
	return func(p []byte, off int64) error {
		if off < 0 || off+int64(len(p)) > int64(len(b)) {
			return errors.New("read beyond the file")
		}
		copy(p, b[off:])
		return nil
	}
}

// TestUnlockQemuVolumes unlocks volumes qemu-img created with each cipher
// suite and checks the payload decrypts to what was written, and that a
// wrong passphrase gives QEMU's message.
func TestUnlockQemuVolumes(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	cases := []struct {
		opts  string
		suite Suite
	}{
		{"", Suite{"aes-256", "xts", "plain64", "", "sha256"}},
		{"cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256", Suite{"aes-256", "cbc", "essiv", "sha256", "sha256"}},
		{"cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha1", Suite{"aes-128", "cbc", "plain", "", "sha1"}},
	}
	for _, tc := range cases {
		t.Run(strings.NewReplacer(",", "_", "=", "_").Replace(tc.opts), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			vol, plain := qemuLUKS(t, dir, 64<<10, tc.opts)
			file, err := os.ReadFile(vol)
			if err != nil {
				t.Fatal(err)
			}
			h, err := ParseHeader(file, int64(len(file)))
			if err != nil {
				t.Fatal(err)
			}
			if got := h.Suite(); got != tc.suite {
				t.Errorf("suite %+v, want %+v", got, tc.suite)
			}
			if _, err := h.Unlock([]byte("wrong"), readerOf(file)); !errors.Is(err, ErrInvalidPassword) || err.Error() != "Invalid password, cannot unlock any keyslot" {
				t.Errorf("wrong passphrase: %v", err)
			}
			v, err := h.Unlock([]byte(testPass), readerOf(file))
			if err != nil {
				t.Fatal(err)
			}
			payload := file[h.AreaSize() : h.AreaSize()+int64(len(plain))]
			v.Cipher.Decrypt(payload, 0) // raw LUKS: IV of the guest sector
			if !bytes.Equal(payload, plain) {
				t.Fatal("decrypted payload differs from the data qemu-img wrote")
			}
			// And back: our encryption of the plaintext is qemu-img's ciphertext.
			again := bytes.Clone(plain)
			v.Cipher.Encrypt(again, 0)
			orig, _ := os.ReadFile(vol)
			if !bytes.Equal(again, orig[h.AreaSize():h.AreaSize()+int64(len(plain))]) {
				t.Fatal("re-encrypted payload differs from qemu-img's")
			}
		})
	}
}

// TestCreateQemuReads creates volumes with Create, writes a payload
// encrypted with the returned cipher and has qemu-img convert decrypt it
// and qemu-img info describe it.
func TestCreateQemuReads(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	cases := []CreateOptions{
		{},
		{CipherAlg: "aes-128"},
		{CipherMode: "cbc", IVGenAlg: "essiv"},
		{CipherMode: "cbc", IVGenAlg: "plain", HashAlg: "sha512"},
	}
	for _, o := range cases {
		t.Run(o.CipherAlg+o.CipherMode+o.IVGenAlg+o.HashAlg, func(t *testing.T) {
			t.Parallel()
			o.IterTime = 10 * time.Millisecond
			v, area, err := Create([]byte(testPass), o)
			if err != nil {
				t.Fatal(err)
			}
			if int64(len(area)) != v.Header.AreaSize() {
				t.Fatalf("area %d bytes, header says %d", len(area), v.Header.AreaSize())
			}
			// The layout matches qemu-img's for the default suite.
			if o.CipherAlg == "" && o.CipherMode == "" && (v.Header.PayloadOffset != 4040 || v.Header.Slots[1].KeyOffset != 512) {
				t.Errorf("payload offset %d, slot 1 at %d; qemu-img uses 4040 and 512", v.Header.PayloadOffset, v.Header.Slots[1].KeyOffset)
			}
			plain := make([]byte, 32<<10)
			rand.Read(plain)
			enc := bytes.Clone(plain)
			v.Cipher.Encrypt(enc, 0)
			dir := t.TempDir()
			vol := filepath.Join(dir, "v.luks")
			if err := os.WriteFile(vol, append(area, enc...), 0o644); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, "out.raw")
			run(t, "qemu-img", "convert", "--object", "secret,id=s0,data="+testPass, "--image-opts",
				"driver=luks,file.filename="+vol+",key-secret=s0", "-O", "raw", out)
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("qemu-img decrypts our volume differently")
			}
			info := string(run(t, "qemu-img", "info", vol))
			s := v.Header.Suite()
			for _, want := range []string{"cipher alg: " + s.CipherAlg, "cipher mode: " + s.CipherMode, "ivgen alg: " + s.IVGenAlg, "hash alg: " + s.HashAlg, "uuid: " + v.Header.UUID} {
				if !strings.Contains(info, want) {
					t.Errorf("qemu-img info lacks %q:\n%s", want, info)
				}
			}
			// Our own parser reads back what we wrote.
			h, err := ParseHeader(area, int64(len(area)))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.Unlock([]byte(testPass), readerOf(area)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestCreateRefuses checks that unsupported options are refused by name.
func TestCreateRefuses(t *testing.T) {
	cases := []struct {
		o    CreateOptions
		want string
	}{
		{CreateOptions{CipherAlg: "twofish-256"}, "Cipher algorithm 'twofish-256' is not supported"},
		{CreateOptions{CipherAlg: "des"}, "Algorithm 'des' not supported"},
		{CreateOptions{CipherAlg: "sm4"}, "Parameter 'cipher-alg' does not accept value 'sm4'"},
		{CreateOptions{CipherMode: "ecb"}, "Cipher mode 'ecb-plain64' is not supported"},
		{CreateOptions{HashAlg: "whirlpool"}, "Hash algorithm 'whirlpool' is not supported"},
		{CreateOptions{IVGenAlg: "benbi"}, "Parameter 'ivgen-alg' does not accept value 'benbi'"},
		{CreateOptions{IVGenAlg: "essiv"}, "Cipher mode 'xts-essiv:sha256' is not supported"},
	}
	for _, tc := range cases {
		if _, _, err := Create([]byte("x"), tc.o); err == nil || err.Error() != tc.want {
			t.Errorf("%+v: %v, want %q", tc.o, err, tc.want)
		}
	}
}

// TestHostileHeader corrupts one field of a valid header at a time.
func TestHostileHeader(t *testing.T) {
	_, area, err := Create([]byte(testPass), CreateOptions{IterTime: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	slot := func(i, field int) int { return 208 + 48*i + field }
	cases := []struct {
		name  string
		mut   func(b []byte)
		limit int64
		want  string
	}{
		{"magic", func(b []byte) { b[0] = 'X' }, 0, "Volume is not in LUKS format"},
		{"version", func(b []byte) { be.PutUint16(b[6:], 2) }, 0, "LUKS version 2 is not supported"},
		{"cipher", func(b []byte) { copy(b[8:], "serpent\x00") }, 0, "Cipher name 'serpent' is not supported"},
		{"mode", func(b []byte) { copy(b[40:], "ecb\x00") }, 0, "Cipher mode 'ecb' is not supported"},
		{"hash", func(b []byte) { copy(b[72:], "ripemd160\x00") }, 0, "Hash algorithm 'ripemd160' is not supported"},
		{"key bytes", func(b []byte) { be.PutUint32(b[108:], 1<<31) }, 0, "LUKS key size 2147483648 bytes is not supported"},
		{"xts odd key", func(b []byte) { be.PutUint32(b[108:], 33) }, 0, "Algorithm 'aes' with key size 33 bytes not supported"},
		{"digest iters", func(b []byte) { be.PutUint32(b[164:], 0xffffffff) }, 0, "LUKS master key digest iterations 4294967295 out of range (1..16777216)"},
		{"payload beyond area", nil, 1 << 20, "LUKS payload offset 4040 sectors exceeds the header area (1048576 bytes)"},
		{"slot state", func(b []byte) { be.PutUint32(b[slot(3, 0):], 7) }, 0, "Keyslot 3 state (active/disable) is corrupted"},
		{"stripes", func(b []byte) { be.PutUint32(b[slot(0, 44):], 1<<30) }, 0, "Keyslot 0 is corrupted (stripes 1073741824 != 4000)"},
		{"slot in header", func(b []byte) { be.PutUint32(b[slot(2, 40):], 1) }, 0, "Keyslot 2 is overlapping with the LUKS header"},
		{"slot in payload", func(b []byte) { be.PutUint32(b[slot(7, 40):], 0xfffffff0) }, 0, "Keyslot 7 is overlapping with the encrypted payload"},
		{"slots overlap", func(b []byte) { be.PutUint32(b[slot(5, 40):], be.Uint32(b[slot(4, 40):])+1) }, 0, "Keyslots 4 and 5 are overlapping in the header"},
		{"slot iters", func(b []byte) { be.PutUint32(b[slot(0, 4):], 0) }, 0, "Keyslot 0 iterations 0 out of range (1..16777216)"},
		{"truncated", func(b []byte) {}, -1, "LUKS header is truncated (591 bytes)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(area[:HeaderSize])
			if tc.mut != nil {
				tc.mut(b)
			}
			if tc.limit < 0 {
				b, tc.limit = b[:HeaderSize-1], 0
			}
			_, err := ParseHeader(b, tc.limit)
			if err == nil || err.Error() != tc.want {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

// TestQCowCipher checks the legacy AES cipher against an image qemu-img
// wrote with encrypt.format=aes: the first data cluster decrypts (IV of the
// guest sector) to the pattern qemu-io wrote.
func TestQCowCipher(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	// A passphrase longer than 16 bytes: only the first 16 count.
	pass := "0123456789abcdefIGNORED"
	qemuCreate(t, "-f", "qcow2", "--object", "secret,id=s0,data="+pass, "-o", "encrypt.format=aes,encrypt.key-secret=s0", img, "1M")
	run(t, "qemu-io", "--object", "secret,id=s0,data="+pass, "--image-opts", "driver=qcow2,file.filename="+img+",encrypt.key-secret=s0",
		"-c", "write -P 0xa5 65536 65536")
	file, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// Fresh image: header, refcount table, refcount block, L1, then the L2
	// table and the data cluster.
	data := bytes.Clone(file[5*65536 : 6*65536])
	NewQCowCipher([]byte("0123456789abcdef")).Decrypt(data, 65536/SectorSize)
	if !bytes.Equal(data, bytes.Repeat([]byte{0xa5}, 65536)) {
		t.Fatal("legacy AES cluster does not decrypt to the written pattern")
	}
}

// TestXTSMatchesXCrypto checks the sector XTS against x/crypto/xts for
// every AES key size, both directions, several sector numbers.
func TestXTSMatchesXCrypto(t *testing.T) {
	for _, n := range []int{32, 48, 64} {
		key := make([]byte, n)
		rand.Read(key)
		ours, err := newXTS(key)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		for _, sector := range []uint64{0, 1, 0xffffffff, 1 << 40, ^uint64(0)} {
			plain := make([]byte, SectorSize)
			rand.Read(plain)
			want := make([]byte, SectorSize)
			ref.Encrypt(want, plain, sector)
			got := bytes.Clone(plain)
			ours.crypt(got, sector, true)
			if !bytes.Equal(got, want) {
				t.Fatalf("key %d bytes, sector %#x: encryption differs from x/crypto/xts", n, sector)
			}
			ours.crypt(got, sector, false)
			if !bytes.Equal(got, plain) {
				t.Fatalf("key %d bytes, sector %#x: decryption does not invert encryption", n, sector)
			}
			// Two sectors at once through the CBC-based decryption.
			two := make([]byte, 2*SectorSize)
			ref.Encrypt(two, plain, sector)
			ref.Encrypt(two[SectorSize:], plain, sector+1)
			ours.decryptSectors(two, sector, false)
			if !bytes.Equal(two[:SectorSize], plain) || !bytes.Equal(two[SectorSize:], plain) {
				t.Fatalf("key %d bytes, sector %#x: decryptSectors differs from x/crypto/xts", n, sector)
			}
		}
	}
}

func BenchmarkSectorCipher(b *testing.B) {
	for _, mode := range []string{"xts", "cbc"} {
		b.Run(mode, func(b *testing.B) {
			v, _, err := Create([]byte("x"), CreateOptions{CipherMode: mode, IterTime: time.Millisecond})
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				v.Cipher.Decrypt(buf, 0)
			}
		})
	}
}
