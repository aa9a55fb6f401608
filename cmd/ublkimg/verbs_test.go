package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/internal/qemutest"
)

func TestInfo(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	sparse := filepath.Join(dir, "sparse.raw")
	writeImage(t, sparse, 1<<30)
	full := filepath.Join(dir, "full.raw")
	writeImage(t, full, 4<<20, [2]int64{0, 4 << 20})
	for _, img := range []string{sparse, full} {
		for _, args := range [][]string{
			{"info", img},
			{"info", "-f", "raw", img},
			{"info", "--output", "json", img},
			{"info", "--output=json", "--backing-chain", img},
			{"info", "--backing-chain", img},
			{"info", img, "--output=json"}, // options after the file, as getopt allows
		} {
			got, want := ublkimg(t, args...), qemuImg(t, args...)
			if got != want {
				t.Errorf("%v:\n%+v\nqemu-img:\n%+v", args, got, want)
			}
		}
	}
}

func TestCreate(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	img := filepath.Join(dir, "new.raw")
	for _, args := range [][]string{
		{"-f", "raw", img, "1G"},
		{img, "64M"},
		{"-f", "raw", img, "1.5k"},
		{"-q", "-f", "raw", img, "1M"},
		{"-f", "raw", "-o", "preallocation=falloc", img, "2M"},
		{"-f", "raw", "-o", "size=3M", img},
		{"-f", "raw", img, "1T"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			got := ublkimg(t, append([]string{"create"}, args...)...)
			var gotSize int64 = -1
			if st, err := os.Stat(img); err == nil {
				gotSize = st.Size()
				os.Remove(img)
			}
			want := qemuImg(t, append([]string{"create"}, args...)...)
			var wantSize int64 = -1
			if st, err := os.Stat(img); err == nil {
				wantSize = st.Size()
				os.Remove(img)
			}
			if got != want {
				t.Errorf("got %+v\nqemu-img %+v", got, want)
			}
			if gotSize != wantSize {
				t.Errorf("image size %d, qemu-img %d", gotSize, wantSize)
			}
		})
	}
}

// TestCreateOptionHelp checks -o help's layout. The option lists
// themselves differ from qemu-img's: ublkimg's raw lists the file
// protocol's options it implements (no extent_size_hint) in both forms.
func TestCreateOptionHelp(t *testing.T) {
	r := ublkimg(t, "create", "-f", "raw", "-o", "help")
	want := "Supported raw options:\n" +
		"  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n" +
		"  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n" +
		"  size=<size>            - Virtual disk size\n" +
		"\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n"
	if r.code != 0 || r.stdout != want {
		t.Errorf("create -o help: %+v\nwant:\n%s", r, want)
	}
	r = ublkimg(t, "convert", "-O", "raw", "-o", "?", "x.raw")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "Supported options:\n  nocow=") {
		t.Errorf("convert -o ?: %+v", r)
	}
}

func TestConvert(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	writeImage(t, src, 32<<20, [2]int64{0, 1 << 20}, [2]int64{5 << 20, 64 << 10}, [2]int64{(32 << 20) - 4096, 4096})
	out := filepath.Join(dir, "out.raw")
	ref := filepath.Join(dir, "ref.raw")
	for _, args := range [][]string{
		{"-O", "raw"},
		{"-f", "raw", "-O", "raw", "-p"},
		{"-S", "0"},
		{"-S", "64k", "-m", "2", "-W"},
		{"-t", "none", "-T", "none"},
		{"-q", "-p"},
		{"-m16"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			got := ublkimg(t, append(append([]string{"convert"}, args...), src, out)...)
			want := qemuImg(t, append(append([]string{"convert"}, args...), src, ref)...)
			if got != want {
				t.Errorf("got %+v\nqemu-img %+v", got, want)
			}
			if r := qemuImg(t, "compare", "-f", "raw", "-F", "raw", src, out); r.code != 0 {
				t.Errorf("qemu-img compare: %+v", r)
			}
			// The same sparseness as qemu-img's output (which also
			// allocates the first 4 KiB of every file it creates).
			a, b := blocks(t, out), blocks(t, ref)
			if a != b && b-a != 4096 {
				t.Errorf("%d bytes allocated, qemu-img %d", a, b)
			}
		})
	}
	// -S 0 allocates everything, the default leaves the holes.
	ublkimg(t, "convert", "-S", "0", src, out)
	if b := blocks(t, out); b != 32<<20 {
		t.Errorf("-S 0: %d bytes allocated, want %d", b, 32<<20)
	}
	ublkimg(t, "convert", src, out)
	if b := blocks(t, out); b != (1<<20)+(64<<10)+4096 {
		t.Errorf("-S 4k: %d bytes allocated, want %d", b, (1<<20)+(64<<10)+4096)
	}
}

func blocks(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestCompare(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	a := filepath.Join(dir, "a.raw")
	writeImage(t, a, 4<<20, [2]int64{1 << 20, 1 << 20})
	same := filepath.Join(dir, "same.raw")
	exec.Command("cp", "--sparse=always", a, same).Run()
	b := filepath.Join(dir, "b.raw")
	exec.Command("cp", "--sparse=always", a, b).Run()
	f, _ := os.OpenFile(b, os.O_WRONLY, 0)
	f.WriteAt([]byte{'x'}, 1500000)
	f.Close()
	big := filepath.Join(dir, "big.raw")
	exec.Command("cp", "--sparse=always", a, big).Run()
	os.Truncate(big, 6<<20)
	for _, args := range [][]string{
		{a, same},
		{"-s", a, same},
		{a, b},
		{"-q", a, b},
		{a, big},
		{big, a},
		{"-s", a, big},
		{"-f", "raw", "-F", "raw", a, b},
		{"-p", a, same},
		{a, filepath.Join(dir, "missing.raw")},
		{a},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			got := ublkimg(t, append([]string{"compare"}, args...)...)
			want := qemuImg(t, append([]string{"compare"}, args...)...)
			if got.code != want.code || got.stdout != want.stdout {
				t.Errorf("got %+v\nqemu-img %+v", got, want)
			}
			if want.stderr != "" {
				if msg := oneErrorLine(t, got); msg != strings.ReplaceAll(qemuMessage(want.stderr), "Could not open '"+args[len(args)-1]+"': Could not open", "Could not open") {
					t.Errorf("error %q, qemu-img %q", msg, want.stderr)
				}
			}
		})
	}
}

var runCompleted = regexp.MustCompile(`(?m)^Run completed in \d+\.\d{3} seconds\.$`)

func TestBench(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	img := filepath.Join(dir, "bench.raw")
	writeImage(t, img, 16<<20, [2]int64{0, 16 << 20})
	for _, args := range [][]string{
		{"-c", "1000"},
		{"-c1000", "-d8", "-s", "512", "-S", "4k", "-o", "1M"},
		{"-c", "3000", "-d", "32", "-t", "none", "-n"},
		{"-c", "3000", "-d", "32", "-t", "none", "-i", "io_uring"},
		{"-wc", "2000", "--pattern=7", "-f", "raw"},
		{"-w", "-c", "2000", "-d", "16", "--flush-interval=64", "-f", "raw"},
		{"-w", "-c", "2000", "-d", "16", "--flush-interval", "64", "--no-drain", "-f", "raw"},
		{"-c", "0x100", "-q", "-U"},
		{"-c", "100", "-o", "16M"},                   // EIO past the end
		{"-c", "100", "--flush-interval", "64"},      // write tests only
		{"-c", "100", "-w", "--flush-interval", "8"}, // below depth
		{"-c", "abc"},                   // bad count
		{"-c", "1", "-s", "2G"},         // bad buffer size
		{"-c", "1", "-t", "bogus"},      // bad cache mode
		{"-c", "1", "-n"},               // native needs O_DIRECT
		{"-c", "1", "--pattern", "256"}, // bad pattern
		{"-c", "1", "-o", "1x"},         // bad offset
		{"-c", "1", "-f", "bogus"},      // unknown format
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			got := ublkimg(t, append(append([]string{"bench"}, args...), img)...)
			want := qemuImg(t, append(append([]string{"bench"}, args...), img)...)
			if got.code != want.code {
				t.Errorf("exit %d, qemu-img %d (%s)", got.code, want.code, want.stderr)
			}
			if g, w := runCompleted.ReplaceAllString(got.stdout, "TIME"), runCompleted.ReplaceAllString(want.stdout, "TIME"); g != w {
				t.Errorf("stdout:\n%s\nqemu-img:\n%s", got.stdout, want.stdout)
			}
			if want.code != 0 {
				if msg := oneErrorLine(t, got); msg != qemuMessage(want.stderr) {
					t.Errorf("error %q, qemu-img %q", msg, qemuMessage(want.stderr))
				}
			}
		})
	}
	// Options may follow the file name, as getopt allows.
	if r := ublkimg(t, "bench", img, "-c", "10", "-d", "2"); r.code != 0 || !strings.HasPrefix(r.stdout, "Sending 10 read requests, 4096 bytes each, 2 in parallel") {
		t.Errorf("options after the file: %+v", r)
	}
}

// TestErrors checks every error path for one line on stderr, the exit
// status, and the message.
func TestErrors(t *testing.T) {
	dir := sharedDir(t)
	img := filepath.Join(dir, "a.raw")
	writeImage(t, img, 1<<20, [2]int64{0, 4096})
	missing := filepath.Join(dir, "missing.raw")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"info", missing}, 1, "Could not open '" + missing + "': No such file or directory"},
		{[]string{"info", "-f", "bogus", img}, 1, "Could not open '" + img + "': Unknown driver 'bogus'"},
		{[]string{"info"}, 1, "Expecting one image file name"},
		{[]string{"info", "--output", "xml", img}, 1, "--output must be used with human or json as argument."},
		{[]string{"info", "-Z", img}, 1, "unrecognized option '-Z'"},
		{[]string{"info", "--bogus", img}, 1, "unrecognized option '--bogus'"},
		{[]string{"bench", img, "-c"}, 1, "missing argument for option '-c'"},
		{[]string{"convert", missing, filepath.Join(dir, "out.raw")}, 1, "Could not open '" + missing + "': No such file or directory"},
		{[]string{"convert", "-O", "bogus", img, filepath.Join(dir, "out.raw")}, 1, "Unknown file format 'bogus'"},
		{[]string{"convert", "-c", img, filepath.Join(dir, "out.raw")}, 1, "Compression not supported for this file format"},
		{[]string{"convert", img}, 1, "Must specify image file name"},
		{[]string{"compare", missing, img}, 2, "Could not open '" + missing + "': No such file or directory"},
		{[]string{"compare", "-f", "bogus", img, img}, 2, "Could not open '" + img + "': Unknown driver 'bogus'"},
		{[]string{"compare", "-T", "bogus", img, img}, 2, "Invalid source cache option: bogus"},
		{[]string{"create", "-f", "raw", filepath.Join(dir, "x.raw"), "1Q"}, 1,
			"Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."},
		{[]string{"create", "-f", "raw", filepath.Join(dir, "x.raw"), "9E"}, 1, "Invalid image size specified. Must be between 0 and 9223372036854775807."},
		{[]string{"create", "-f", "bogus", filepath.Join(dir, "x.raw"), "1M"}, 1, filepath.Join(dir, "x.raw") + ": Unknown file format 'bogus'"},
		{[]string{"create", filepath.Join(dir, "x.raw")}, 1, filepath.Join(dir, "x.raw") + ": Image creation needs a size parameter"},
		{[]string{"create", "-f", "raw", "-o", "bogus=1", filepath.Join(dir, "x.raw"), "1M"}, 1, filepath.Join(dir, "x.raw") + ": Invalid parameter 'bogus'"},
		{[]string{"create", filepath.Join(dir, "x.raw"), "1M", "extra"}, 1, "Unexpected argument: extra"},
		{[]string{"bench", "-c", "1", "-f", "qcow3", img}, 1, "Could not open '" + img + "': Unknown driver 'qcow3'"},
		{[]string{"bogus", img}, 1, "Command not found: bogus"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			r := ublkimg(t, tc.args...)
			if r.code != tc.code {
				t.Errorf("exit %d, want %d", r.code, tc.code)
			}
			if msg := oneErrorLine(t, r); msg != tc.want {
				t.Errorf("message %q\nwant    %q", msg, tc.want)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "out.raw")); err == nil {
		t.Errorf("a failed convert left its output behind")
	}
}

// TestPermissionErrors runs as an unprivileged user (root ignores file
// modes): writing into a read-only image or directory fails with one line.
func TestPermissionErrors(t *testing.T) {
	cred := nobody(t)
	dir := sharedDir(t)
	img := filepath.Join(dir, "ro.raw")
	writeImage(t, img, 1<<20, [2]int64{0, 4096})
	os.Chmod(img, 0o444)
	rodir := filepath.Join(dir, "rodir")
	os.Mkdir(rodir, 0o555)
	os.Chmod(rodir, 0o555)
	out := filepath.Join(rodir, "out.raw")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bench", "-w", "-c", "1", "-f", "raw", img}, "Could not open '" + img + "': Permission denied"},
		{[]string{"convert", "-O", "raw", img, out}, out + ": error while converting raw: Could not create '" + out + "': Permission denied"},
		{[]string{"create", "-f", "raw", out, "1M"}, out + ": Could not create '" + out + "': Permission denied"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			r := runAs(t, cred, binary, tc.args...)
			if r.code != 1 {
				t.Errorf("exit %d, want 1", r.code)
			}
			if msg := oneErrorLine(t, r); msg != tc.want {
				t.Errorf("message %q\nwant    %q", msg, tc.want)
			}
			if qemutest.Have(t, "qemu-img") {
				q := runAs(t, cred, "qemu-img", tc.args...)
				if q.code != r.code || strings.ReplaceAll(qemuMessage(q.stderr), "Could not open '"+img+"': Could not open", "Could not open") != tc.want {
					t.Errorf("qemu-img: %+v", q)
				}
			}
		})
	}
}

// TestConvertNoSpace converts into a full tmpfs: one line naming ENOSPC,
// exit 1, and no partial output left.
func TestConvertNoSpace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	writeImage(t, src, 4<<20, [2]int64{0, 4 << 20})
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v: %s", err, out)
	}
	defer exec.Command("umount", mnt).Run()
	out := filepath.Join(mnt, "out.raw")
	for _, args := range [][]string{
		{"convert", "-O", "raw", src, out},
		{"convert", "-p", "-m", "1", src, out},
		{"convert", "-S", "0", "-t", "writeback", src, out},
	} {
		r := ublkimg(t, args...)
		msg := oneErrorLine(t, r)
		if r.code != 1 || !regexp.MustCompile(`^error while writing at byte \d+: No space left on device$`).MatchString(msg) {
			t.Errorf("%v: exit %d, %q", args, r.code, msg)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("%v: partial output left behind", args)
		}
	}
}

func TestHelp(t *testing.T) {
	for _, verb := range []string{"create", "info", "convert", "compare", "bench"} {
		r := ublkimg(t, verb, "--help")
		if r.code != 0 || !strings.Contains(r.stdout, "ublkimg "+verb) || r.stderr != "" {
			t.Errorf("%s --help: %+v", verb, r)
		}
	}
}
