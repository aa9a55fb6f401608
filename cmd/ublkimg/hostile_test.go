package main

import (
	"bytes"
	bin "encoding/binary"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"ublkimg/drivers/qcow2"
)

// Hostile images whose cost must stay bounded: peak memory (the largest
// resident set, as /usr/bin/time -v reports it) is compared with
// qemu-img's for the same work.

// peak is one run of a command and its peak resident set.
type peak struct {
	result
	maxRSS int64 // KiB
}

// runPeak runs a command and measures its peak resident set with GNU
// time. The rusage of a child this process starts directly would not do:
// Go starts children with vfork semantics (CLONE_VM), and the kernel
// counts the parent's resident set, the test binary's, into the child's
// peak when it execs.
func runPeak(t *testing.T, name string, args ...string) peak {
	t.Helper()
	const gnuTime = "/usr/bin/time" // scripts/deps.sh installs it
	rss := filepath.Join(t.TempDir(), "maxrss")
	cmd := exec.Command(gnuTime, append([]string{"-f", "%M", "-o", rss, name}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %s %v: %v", gnuTime, name, args, err)
	}
	// GNU time writes "Command exited with non-zero status N" first
	// when the command fails; the peak is the last line.
	b, err := os.ReadFile(rss)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(b))
	kib, err := strconv.ParseInt(lines[len(lines)-1], 10, 64)
	if err != nil {
		t.Fatalf("%s: %q", gnuTime, b)
	}
	return peak{result{out.String(), errb.String(), code}, kib}
}

// compressibleText is n bytes of text made of a few thousand words.
func compressibleText(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	words := make([][]byte, 5000)
	for i := range words {
		w := make([]byte, 3+r.IntN(7))
		for j := range w {
			w[j] = 'a' + byte(r.IntN(16))
		}
		words[i] = append(w, ' ')
	}
	var b []byte
	for len(b) < n {
		b = append(b, words[r.IntN(len(words))]...)
	}
	return b[:n]
}

// declareZstdWindow rewrites, in place, the header of every zstd frame of
// the compressed clusters of the qcow2 image at path (as qemu-img writes
// them: single segment, content size) into a header that declares window
// descriptor wd and no content size: the frame gets 3 bytes shorter, its
// blocks and checksum stay as they are, so every reader decodes the same
// data. A streaming decoder allocates the declared window for such a frame.
func declareZstdWindow(t *testing.T, path string, wd byte) {
	t.Helper()
	f, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ParseHeader(f, int64(len(f)))
	if err != nil {
		t.Fatal(err)
	}
	g := h.Geometry()
	n := 0
	for i := range int(h.L1Size) {
		e, _ := qcow2.TableEntry(f[h.L1TableOffset:], i)
		l2 := e & qcow2.L1OffsetMask
		for j := 0; l2 != 0 && j < int(g.L2Entries()); j++ {
			e, _, err := g.L2EntryAt(f[l2:l2+g.ClusterSize()], j)
			if err != nil || g.ClusterType(e) != qcow2.ClusterCompressed {
				continue
			}
			off, _ := g.CompressedRange(e)
			fr := f[off:]
			if bin.LittleEndian.Uint32(fr) != 0xfd2fb528 || fr[4]&0xfb != 0xa0 {
				t.Fatalf("compressed cluster at %#x: not a single-segment frame with a 4-byte content size: % x", off, fr[:5])
			}
			// The blocks (RFC 8878 3.1.1.2) and checksum follow the
			// 9-byte header.
			end := 9
			for last := false; !last; {
				bh := uint32(fr[end]) | uint32(fr[end+1])<<8 | uint32(fr[end+2])<<16
				last = bh&1 != 0
				end += 3 + int(bh>>3)
				if bh>>1&3 == 1 { // RLE: one byte
					end += 1 - int(bh>>3)
				}
			}
			if fr[4]&0x04 != 0 {
				end += 4
			}
			// Magic, descriptor (no content size, not single segment,
			// checksum flag kept), window descriptor, the rest.
			fr[4] &= 0x04
			fr[5] = wd
			copy(fr[6:], fr[9:end])
			n++
		}
	}
	if n == 0 {
		t.Fatal("no compressed cluster")
	}
	if err := os.WriteFile(path, f, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestZstdWindowMemory: zstd frames that declare windows far larger than
// the cluster (64 MiB, 128 MiB, 1 GiB, 3.75 TiB) decode within the memory
// of a cluster: convert reads them with no more than twice qemu-img's
// peak. qemu-img reads windows up to 128 MiB (libzstd's default limit) and
// refuses larger ones with EIO; ublkimg decodes them too. (Before, each
// decoder allocated the window: 234 MB for this image with 64 MiB windows,
// where qemu-img takes 49 MB, and 128 MiB windows were refused.)
func TestZstdWindowMemory(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "data.raw")
	data := compressibleText(64 << 20)
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "base.qcow2")
	if r := qemuImg(t, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=2M", raw, base); r.code != 0 {
		t.Fatalf("qemu-img convert: %s", r.stderr)
	}
	orig, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	var qemuPeak int64
	for _, tc := range []struct {
		name      string
		wd        byte
		qemuReads bool
	}{
		{"64M", 16 << 3, true},
		{"128M", 17 << 3, true},
		{"1G", 20 << 3, false},
		{"3.75T", 0xff, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(dir, tc.name+".qcow2")
			if err := os.WriteFile(img, orig, 0o644); err != nil {
				t.Fatal(err)
			}
			declareZstdWindow(t, img, tc.wd)
			out := filepath.Join(dir, "out.raw")
			ours := runPeak(t, binary, "convert", "-O", "raw", img, out)
			if ours.code != 0 {
				t.Fatalf("ublkimg convert: %s", ours.stderr)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
				t.Fatal("ublkimg convert: wrong data")
			}
			theirs := runPeak(t, "qemu-img", "convert", "-O", "raw", img, out)
			if (theirs.code == 0) != tc.qemuReads {
				t.Fatalf("qemu-img convert: exit %d, %s", theirs.code, theirs.stderr)
			}
			if tc.qemuReads {
				if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
					t.Fatal("qemu-img convert: wrong data")
				}
				qemuPeak = max(qemuPeak, theirs.maxRSS)
			}
			os.Remove(img)
			t.Logf("convert, 64 MiB in 2 MiB zstd clusters declaring a %s window: peak RSS ublkimg %d KiB, qemu-img %d KiB (exit %d)",
				tc.name, ours.maxRSS, theirs.maxRSS, theirs.code)
			if qemuPeak == 0 {
				t.Fatal("no qemu-img peak to compare with")
			}
			if ours.maxRSS > 2*qemuPeak {
				t.Errorf("ublkimg's peak %d KiB is more than twice qemu-img's %d KiB", ours.maxRSS, qemuPeak)
			}
		})
	}
}
