package vmtest

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"ublkimg/internal/qemutest"
)

// cpioEntry is one entry read back by readCPIO.
type cpioEntry struct {
	name string
	mode uint32
	data string
}

// readCPIO parses a newc archive, checking the alignment rules.
func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	field := func(i int) int {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("offset %d: field %d: %v", off, i, err)
		}
		return int(v)
	}
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off%4 != 0 {
			t.Fatalf("header at unaligned offset %d", off)
		}
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("offset %d: bad magic %q", off, b[off:off+6])
		}
		mode, size, namesize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+namesize-1])
		dataOff := align(off + 110 + namesize)
		if name == "TRAILER!!!" {
			if end := align(dataOff); len(b)%512 != 0 || end > len(b) {
				t.Fatalf("archive of %d bytes is not padded to 512", len(b))
			}
			return out
		}
		out = append(out, cpioEntry{name, uint32(mode), string(b[dataOff : dataOff+size])})
		off = align(dataOff + size)
	}
}

func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	cw := newCPIOWriter(&buf)
	cw.File("/usr/bin/tool", 0o755, []byte("abcde"))
	cw.Symlink("/bin/ls", "/bin/busybox")
	cw.File("/usr/lib/x", 0o644, nil)
	if err := cw.Close(); err != nil {
		t.Fatal(err)
	}
	got := readCPIO(t, buf.Bytes())
	want := []cpioEntry{
		{"usr", cpioModeDir | 0o755, ""},
		{"usr/bin", cpioModeDir | 0o755, ""},
		{"usr/bin/tool", cpioModeFile | 0o755, "abcde"},
		{"bin", cpioModeDir | 0o755, ""},
		{"bin/ls", cpioModeSymlink | 0o777, "/bin/busybox"},
		{"usr/lib", cpioModeDir | 0o755, ""},
		{"usr/lib/x", cpioModeFile | 0o644, ""},
	}
	if !slices.Equal(got, want) {
		t.Errorf("archive holds\n%v\nwant\n%v", got, want)
	}
}

func TestParseReport(t *testing.T) {
	report := "garbage@@ BOOT 2.53 6.12.107+deb12-amd64\r\n" +
		"@@ READY 3.1\r\n" +
		"@@ RESULT a PASS \r\n" +
		"@@ RESULT b FAIL exit 1: no such file\r\n" +
		"@@ METRIC iops 1234\r\n" +
		"@@ DMESG BEGIN\r\n[    0.000000] Linux version\r\n@@ RESULT fake PASS\r\n@@ DMESG END\r\n" +
		"@@ DONE 3\r\n"
	var res Result
	res.Metrics = map[string]string{}
	if !parseReport([]byte(report), &res) {
		t.Fatal("DONE not seen")
	}
	want := []CaseResult{{"a", "PASS", ""}, {"b", "FAIL", "exit 1: no such file"}}
	if !slices.Equal(res.Results, want) {
		t.Errorf("results %v, want %v", res.Results, want)
	}
	if res.ExitStatus != 3 || res.GuestBoot != 2530*time.Millisecond || res.Metrics["iops"] != "1234" {
		t.Errorf("exit %d, guest boot %v, metrics %v", res.ExitStatus, res.GuestBoot, res.Metrics)
	}
	if res.Dmesg != "[    0.000000] Linux version\n@@ RESULT fake PASS\n" {
		t.Errorf("dmesg %q", res.Dmesg)
	}
	if parseReport([]byte("@@ RESULT a PASS\n"), &Result{Metrics: map[string]string{}}) {
		t.Error("DONE seen in a report without it")
	}
}

func TestTroubleLines(t *testing.T) {
	log := "[    1.0] loop: module loaded\n" +
		"[    2.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\n" +
		"[    3.0] INFO: task kworker/0:1:42 blocked for more than 30 seconds.\n" +
		"[    4.0] WARNING: CPU: 1 PID: 7 at drivers/block/ublk_drv.c:100 ublk_foo+0x1/0x2\n" +
		"@@ RESULT BUG: PASS\n"
	got := troubleLines(log)
	if len(got) != 3 {
		t.Errorf("trouble lines %q, want the BUG, hung task and WARNING lines", got)
	}
}

func TestParseSoftdep(t *testing.T) {
	pre, post := parseSoftdep("pre: crypto-crc32c crc16 post: foo")
	if !slices.Equal(pre, []string{"crypto-crc32c", "crc16"}) || !slices.Equal(post, []string{"foo"}) {
		t.Errorf("pre %q post %q", pre, post)
	}
}

func TestNewestKernel(t *testing.T) {
	names := []string{
		"linux-image-6.12.9+deb12-amd64-unsigned",
		"linux-image-6.12.117+deb12-amd64-unsigned",
		"linux-image-6.12.117+deb12-rt-amd64-unsigned",
		"linux-image-6.12.111+deb12-amd64-unsigned",
		"linux-image-6.12.200+deb12-cloud-amd64-unsigned",
	}
	if got := newestKernel(names); got != "linux-image-6.12.117+deb12-amd64-unsigned" {
		t.Errorf("newest %q", got)
	}
	if !fallbackKernelPackage.MatchString(DefaultKernelPackage) {
		t.Errorf("DefaultKernelPackage %q does not match the fallback pattern", DefaultKernelPackage)
	}
}

func TestSharedLibraries(t *testing.T) {
	sh, err := lookTool("dash")
	if err != nil {
		qemutest.Unavailable(t, "no dash on this host (scripts/deps.sh installs it)")
	}
	libs, err := sharedLibraries(t.Context(), sh)
	if err != nil {
		t.Fatal(err)
	}
	var interp, libc bool
	for _, l := range libs {
		interp = interp || strings.Contains(l, "ld-linux")
		libc = libc || strings.Contains(l, "libc.so")
	}
	if !interp || !libc {
		t.Errorf("libraries of %s: %q, want the ELF interpreter and libc", sh, libs)
	}
	// Not ELF: nothing to add.
	p := t.TempDir() + "/script"
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if libs, err := sharedLibraries(t.Context(), p); err != nil || libs != nil {
		t.Errorf("script: %q, %v", libs, err)
	}
}

func TestLineWriter(t *testing.T) {
	var got []string
	w := &lineWriter{logf: func(format string, args ...any) { got = append(got, fmt.Sprintf(format, args...)) }}
	fmt.Fprint(w, "a\nb")
	fmt.Fprint(w, "c\nd")
	w.Flush()
	if want := []string{"console: a", "console: bc", "console: d"}; !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestCrashedBooting: only kernel trouble before /init's BOOT line makes
// Run boot again; trouble once the scenario runs fails the run.
func TestCrashedBooting(t *testing.T) {
	const oops = "[    3.440568] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
	for _, tc := range []struct {
		name  string
		lines []string
		want  bool
	}{
		{"oops at boot", []string{"[    0.1] Linux version 6.12", oops}, true},
		{"oops in the scenario", []string{"@@ BOOT 2.18 6.12", "@@ READY 2.60", oops}, false},
		{"clean boot", []string{"[    0.1] Linux version 6.12", "@@ BOOT 2.18 6.12"}, false},
		{"no output", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &console{start: time.Now(), onTrouble: func(string) {}}
			c.read(strings.NewReader(strings.Join(tc.lines, "\n") + "\n"))
			if got := c.crashedBooting(); got != tc.want {
				t.Errorf("crashedBooting() = %v, want %v", got, tc.want)
			}
		})
	}
}
