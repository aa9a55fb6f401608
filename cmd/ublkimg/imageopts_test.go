package main

import (
	"bufio"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

const imageOptsImages = `
qemu-img create -q -f qcow2 p.qcow2 1M
qemu-img create -q -f qcow2 -b p.qcow2 -F qcow2 t.qcow2
qemu-img create -q -f raw r.raw 1M
`

// TestImageOptsUnknown: --image-opts refuses options no node uses, as
// qemu-img 7.2 does, and takes the ones QEMU takes.
func TestImageOptsUnknown(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, imageOptsImages)
	work := fixtureCopies(t, src)
	const p, tp, r = "driver=qcow2,file.filename=p.qcow2", "driver=qcow2,file.filename=t.qcow2", "driver=raw,file.filename=r.raw"
	for i, args := range [][]string{
		{"info", "--image-opts", p + ",foo=1"},
		{"check", "--image-opts", p + ",foo=1"},
		{"check", "--image-opts", "file.filename=p.qcow2,foo=1"},
		{"check", "--image-opts", p + ",file.foo=1"},
		{"check", "--image-opts", p + ",file.locking=off"},
		{"check", "--image-opts", p + ",encrypt.foo=1"},
		{"check", "--image-opts", p + ",lazy-refcounts=on,cache-size=1M,force-share=on,read-only=on,discard=unmap,detect-zeroes=on,node-name=x"},
		{"check", "--image-opts", tp + ",backing.foo=1"},
		{"check", "--image-opts", tp + ",backing.lazy-refcounts=on"},
		{"info", "--image-opts", tp + ",backing.foo=1"},
		{"check", "--image-opts", p + ",backing.foo=1"},
		{"map", "--image-opts", r + ",foo=1"},
		{"map", "--image-opts", r + ",offset=512"},
		{"compare", "--image-opts", p + ",foo=1", r},
		{"compare", "--image-opts", p, r + ",foo=1"},
		{"convert", "-n", "--target-image-opts", "r.raw", p + ",foo=1"},
		// A protocol that needs no file name opens by its options.
		{"info", "--image-opts", "driver=null-co"},
		{"info", "--image-opts", "driver=null-co,size=1M"},
		// A format besides the options is refused, never preferred.
		{"info", "-f", "qcow2", "--image-opts", p},
		{"check", "-f", "raw", "--image-opts", p},
		{"map", "-f", "raw", "--image-opts", r},
		{"compare", "-F", "raw", "--image-opts", p, r},
		{"compare", "-f", "qcow2", "--image-opts", p, r},
		{"convert", "-f", "raw", "--image-opts", r, "out.raw"},
		{"resize", "-f", "raw", "--image-opts", r, "2M"},
		{"bench", "-c", "1", "-f", "raw", "--image-opts", r},
		{"dd", "-f", "raw", "--image-opts", "if=" + r, "of=out.raw"},
		{"measure", "-f", "raw", "--image-opts", r},
		{"commit", "-f", "qcow2", "--image-opts", tp},
		{"rebase", "-f", "qcow2", "--image-opts", "-u", "-b", "", tp},
		{"amend", "-f", "qcow2", "--image-opts", "-o", "lazy_refcounts=on", p},
		{"bitmap", "-f", "qcow2", "--image-opts", "--add", p, "b0"},
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(args, " "))
			ours, theirs := work(t, i)
			sameAsQemu(t, ours, theirs, args)
		})
	}
}

// optionImages are the images of TestImageOptsHonoured: a raw source with
// data, explicit zeros (allocated and written) and a hole; an empty qcow2
// target; a qcow2 chain whose top has a zero cluster, data and a cluster
// of written zeros over a full backing file; an empty raw image.
const optionImages = `
qemu-img create -q -f raw src.raw 1M
qemu-io -f raw -c 'write -P 0x55 0 64k' -c 'write -z 64k 64k' -c 'write -P 0 128k 64k' src.raw >/dev/null
qemu-img create -q -f qcow2 z.qcow2 1M
qemu-img create -q -f qcow2 b.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' b.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 t.qcow2
qemu-io -f qcow2 -c 'write -z 0 64k' -c 'write -P 0x22 64k 64k' -c 'write -P 0 128k 64k' t.qcow2 >/dev/null
qemu-img create -q -f raw r.raw 1M
`

// TestImageOptsHonoured: each common open option (read-only,
// auto-read-only, cache.direct, cache.no-flush, discard, detect-zeroes,
// force-share, node-name) and the file driver's (file.locking, file.aio,
// ...) is honoured or refused as qemu-img 7.2 does, on every verb that
// takes --image-opts: each case runs ublkimg and qemu-img on copies of the
// same images and compares the exit status, stdout, stderr (modulo the
// program name) and the images afterwards (qemu-img map of each, and
// qemu-img compare of ours against qemu-img's).
func TestImageOptsHonoured(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, optionImages)
	work := fixtureCopies(t, src)
	const (
		raw  = "driver=raw,file.filename=r.raw"
		zq   = "driver=qcow2,file.filename=z.qcow2"
		top  = "driver=qcow2,file.filename=t.qcow2"
		topR = top + ",read-only=on"
	)
	all := []string{"r.raw", "z.qcow2", "t.qcow2", "b.qcow2"}
	type tc struct {
		args   []string
		images []string // compared afterwards; nil: all
	}
	resize := func(opts string) tc { return tc{args: []string{"resize", "--image-opts", raw + opts, "2M"}} }
	var cases []tc
	// The options of every node, on a verb that writes: their values
	// are checked (QEMU's words), and the valid ones accepted.
	for _, o := range []string{
		",read-only=bad", ",read-only=ON", ",read-only=yes", ",read-only=off", ",auto-read-only=on", ",auto-read-only=x",
		",cache.direct=on", ",cache.direct=x", ",cache.no-flush=on", ",cache.no-flush=maybe",
		",cache.direct=on,cache.no-flush=on", ",cache.foo=on", ",cache=none",
		",discard=unmap", ",discard=on", ",discard=off", ",discard=ignore", ",discard=bad", ",discard=UNMAP",
		",detect-zeroes=on", ",detect-zeroes=off", ",detect-zeroes=bad", ",detect-zeroes=OFF",
		",detect-zeroes=unmap", ",detect-zeroes=unmap,discard=ignore", ",detect-zeroes=unmap,discard=unmap",
		",force-share=on", ",force-share=x", ",force-share=on,read-only=on",
		",node-name=n0", ",node-name=1x", ",node-name=", ",node-name=a,file.node-name=a", ",node-name=a-b.c_d",
		// The file node's options reach it with the "file." prefix,
		// and only with it.
		",locking=off", ",file.locking=off", ",file.locking=auto", ",file.locking=bad",
		",file.read-only=on", ",read-only=on,file.read-only=off", ",file.cache.direct=on", ",file.discard=bad",
		",file.detect-zeroes=unmap", ",file.force-share=on", ",file.node-name=n1",
		",file.aio=threads", ",file.aio=io_uring", ",file.aio=bad", ",file.aio=native",
		",file.aio=native,file.cache.direct=on", ",file.aio=native,cache.direct=on",
		",file.aio-max-batch=x", ",file.aio-max-batch=16", ",file.drop-cache=x", ",file.drop-cache=off",
		",file.x-check-cache-dropped=x", ",file.pr-manager=x", ",file.x=1",
	} {
		cases = append(cases, resize(o))
	}
	cases = append(cases,
		tc{args: []string{"resize", "--image-opts", "driver=file,filename=r.raw,read-only=on", "2M"}},
		tc{args: []string{"resize", "--image-opts", "driver=file,filename=r.raw,locking=x", "2M"}},
		tc{args: []string{"resize", "--image-opts", "driver=file,filename=r.raw,locking=off", "2M"}},
		tc{args: []string{"resize", "--image-opts", "driver=file,filename=r.raw,foo=1", "2M"}},
		tc{args: []string{"info", "--image-opts", raw + ",detect-zeroes=unmap"}},
		tc{args: []string{"info", "--image-opts", raw + ",force-share=on"}},
		tc{args: []string{"info", "--image-opts", raw + ",read-only=off"}},
		tc{args: []string{"info", "--image-opts", raw + ",read-only=off,file.read-only=on"}},
		tc{args: []string{"info", "--image-opts", top + ",read-only=off,file.read-only=on"}},
		tc{args: []string{"map", "--image-opts", top + ",cache.no-flush=on,backing.cache.direct=on"}},
		// raw's offset and size change what the image reads as: info
		// names the image by its options (json:{...}).
		tc{args: []string{"info", "--image-opts", raw + ",offset=512"}},
		tc{args: []string{"info", "--output=json", "--image-opts", raw + ",offset=512,size=1024"}},
	)
	// read-only=on: every verb that writes refuses the image, those that
	// read take it.
	for _, args := range [][]string{
		{"amend", "-o", "lazy_refcounts=on", "--image-opts", topR},
		{"bench", "-w", "-c", "1", "--image-opts", topR},
		{"bench", "-c", "1", "--image-opts", topR},
		{"bitmap", "--add", "--image-opts", topR, "bm"},
		{"check", "-r", "all", "--image-opts", topR},
		{"check", "-r", "all", "--image-opts", top + ",file.read-only=on"},
		{"check", "--image-opts", topR},
		{"commit", "--image-opts", topR},
		{"commit", "-b", "b.qcow2", "--image-opts", topR},
		{"compare", "--image-opts", topR, zq},
		{"convert", "-n", "--target-image-opts", "src.raw", zq + ",read-only=on"},
		{"dd", "--image-opts", "if=" + topR, "of=out.raw", "bs=64k", "count=1"},
		{"info", "--image-opts", topR},
		{"map", "--image-opts", topR},
		{"measure", "-O", "qcow2", "--image-opts", topR},
		{"rebase", "-u", "-b", "", "--image-opts", topR},
		{"rebase", "-b", "", "--image-opts", topR},
		{"resize", "--image-opts", topR, "2M"},
		{"snapshot", "-c", "s1", "--image-opts", topR},
		{"snapshot", "-l", "--image-opts", topR},
	} {
		cases = append(cases, tc{args: args})
	}
	// Options that change what is written: detect-zeroes turns writes
	// of zeros into zero clusters (unmap: deallocated ones), discard
	// decides what write-zeroes below the top may deallocate, and the
	// backing file takes its own with "backing.".
	for _, o := range []string{"", ",detect-zeroes=on", ",detect-zeroes=unmap,discard=unmap", ",discard=ignore"} {
		cases = append(cases,
			tc{[]string{"bench", "-w", "-c", "4", "-s", "64k", "--image-opts", zq + o}, []string{"z.qcow2"}},
			tc{[]string{"bench", "-w", "-c", "4", "-s", "64k", "--image-opts", raw + o}, []string{"r.raw"}},
			tc{[]string{"convert", "-n", "-S", "0", "--target-image-opts", "src.raw", zq + o}, []string{"z.qcow2"}},
			tc{[]string{"convert", "-n", "--target-image-opts", "src.raw", zq + o}, []string{"z.qcow2"}},
		)
	}
	for _, o := range []string{"", ",backing.detect-zeroes=on", ",backing.discard=ignore", ",backing.file.discard=ignore",
		",backing.discard=unmap,backing.detect-zeroes=unmap", ",backing.discard=ignore,backing.detect-zeroes=unmap",
		",discard=ignore,detect-zeroes=unmap", ",backing.read-only=on", ",backing.file.read-only=on", ",backing.read-only=off"} {
		cases = append(cases, tc{[]string{"commit", "--image-opts", top + o}, []string{"b.qcow2"}})
	}
	cases = append(cases,
		tc{[]string{"bench", "-w", "-c", "4", "-s", "64k", "--image-opts", raw + ",file.detect-zeroes=unmap"}, []string{"r.raw"}},
		tc{[]string{"rebase", "-b", "", "--image-opts", top + ",detect-zeroes=on"}, []string{"t.qcow2"}},
		// bitmap takes --image-opts and --object like the other verbs;
		// its -b source is a file name.
		tc{[]string{"bitmap", "--add", "--object", "secret,id=s0,data=x", "--image-opts", zq, "bm"}, []string{"z.qcow2"}},
		tc{[]string{"bitmap", "--add", "--image-opts", zq + ",foo=1", "bm"}, []string{"z.qcow2"}},
		tc{[]string{"bitmap", "--add", "--image-opts", "z.qcow2", "bm"}, nil},
		tc{[]string{"bitmap", "--add", "bm0", "--merge", "bm", "-b", zq, "--image-opts", zq, "bm0"}, nil},
	)
	seconds := regexp.MustCompile(`[0-9.]+ seconds`)
	for i, c := range cases {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(c.args, " "))
			ours, theirs := work(t, i)
			got, want := runIn(t, ours, binary, c.args...), runIn(t, theirs, "qemu-img", c.args...)
			got.stdout = seconds.ReplaceAllString(got.stdout, "N seconds")
			want.stdout = seconds.ReplaceAllString(want.stdout, "N seconds")
			if got.stdout != want.stdout || got.code != want.code {
				t.Errorf("exit %d, stdout:\n%s\nqemu-img: exit %d, stdout:\n%s", got.code, got.stdout, want.code, want.stdout)
			}
			if g, w := toolStderr(t, got, want); g != w {
				t.Errorf("stderr:\n%s\nqemu-img's, as ublkimg words it:\n%s", g, w)
			}
			images := c.images
			if images == nil {
				images = all
			}
			for _, name := range images {
				a := runIn(t, ours, "qemu-img", "map", "--output=json", "-U", name)
				b := runIn(t, theirs, "qemu-img", "map", "--output=json", "-U", name)
				if a != b {
					t.Errorf("%s afterwards: map\n%s%s\nqemu-img's:\n%s%s", name, a.stdout, a.stderr, b.stdout, b.stderr)
				}
				if r := runIn(t, ours, "qemu-img", "compare", "-U", name, filepath.Join(theirs, name)); r.code != 0 {
					t.Errorf("%s afterwards differs from qemu-img's: %s%s", name, r.stdout, r.stderr)
				}
			}
			if c.args[0] == "bitmap" {
				if a, b := bitmapState(t, filepath.Join(ours, "z.qcow2")), bitmapState(t, filepath.Join(theirs, "z.qcow2")); a != b {
					t.Errorf("bitmaps afterwards: %s\nqemu-img's: %s", a, b)
				}
			}
		})
	}
}

// TestImageOptsOpenFlags: cache.direct and read-only reach the node they
// are given to, and the nodes that inherit them, as in qemu-img 7.2: both
// tools run under strace, and each image file must be opened (last) with
// the same access mode and O_DIRECT flag. -t sets the default that the
// options override.
func TestImageOptsOpenFlags(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	if _, err := exec.LookPath("strace"); err != nil {
		t.Fatal("strace not installed (scripts/deps.sh installs it): it shows the flags each image is opened with")
	}
	src := makeImages(t, optionImages)
	work := fixtureCopies(t, src)
	const raw, top = "driver=raw,file.filename=r.raw", "driver=qcow2,file.filename=t.qcow2"
	for i, args := range [][]string{
		{"bench", "-c", "1", "--image-opts", raw},
		{"bench", "-c", "1", "--image-opts", raw + ",cache.direct=on"},
		{"bench", "-c", "1", "-t", "none", "--image-opts", raw + ",cache.direct=off"},
		{"bench", "-c", "1", "-t", "none", "--image-opts", raw + ",file.cache.direct=off"},
		{"bench", "-c", "1", "-t", "writeback", "--image-opts", raw + ",file.cache.direct=on"},
		{"bench", "-c", "1", "--image-opts", top + ",cache.direct=on"},
		{"bench", "-c", "1", "--image-opts", top + ",cache.direct=on,backing.cache.direct=off"},
		{"bench", "-c", "1", "-t", "none", "--image-opts", top + ",backing.file.cache.direct=off"},
		{"bench", "-c", "1", "-t", "directsync", "--image-opts", top + ",file.cache.direct=off,cache.no-flush=on"},
		{"bench", "-w", "-c", "1", "--image-opts", top + ",cache.direct=on"},
		{"info", "--image-opts", raw + ",read-only=off"},
		{"info", "--image-opts", top + ",read-only=on,file.read-only=off"},
		{"map", "--image-opts", top + ",backing.read-only=off"},
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(args, " "))
			ours, theirs := work(t, i)
			got, gotCode := openFlags(t, ours, binary, args)
			want, wantCode := openFlags(t, theirs, "qemu-img", args)
			if got != want || gotCode != wantCode {
				t.Errorf("exit %d, opens:\n%s\nqemu-img: exit %d, opens:\n%s", gotCode, got, wantCode, want)
			}
		})
	}
}

// openFlags runs name with args in dir under strace and returns, for each
// image file it opened, the access mode and O_DIRECT of its last open.
func openFlags(t *testing.T, dir, name string, args []string) (string, int) {
	t.Helper()
	log := filepath.Join(dir, "strace.log")
	r := runIn(t, dir, "strace", append([]string{"-f", "-qq", "-e", "trace=openat", "-o", log, name}, args...)...)
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	open := regexp.MustCompile(`openat\(AT_FDCWD, "([^"]+\.(?:raw|qcow2))", ([A-Z_|]+)`)
	last := map[string]string{}
	for _, m := range open.FindAllStringSubmatch(string(data), -1) {
		mode := "O_RDONLY"
		if strings.Contains(m[2], "O_RDWR") {
			mode = "O_RDWR"
		}
		if strings.Contains(m[2], "O_DIRECT") {
			mode += "|O_DIRECT"
		}
		last[filepath.Base(m[1])] = mode
	}
	var out []string
	for _, f := range slices.Sorted(maps.Keys(last)) {
		out = append(out, f+" "+last[f])
	}
	return strings.Join(out, "\n"), r.code
}

// TestImageOptsFileLocking: file.locking=off reaches the file node, which
// then takes no lock and sees none (a top-level "locking" is refused, as
// no format has it), while force-share shares the image: each case runs
// both tools while qemu-io holds the image open for writing.
func TestImageOptsFileLocking(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, optionImages)
	work := fixtureCopies(t, src)
	const zq = "driver=qcow2,file.filename=z.qcow2"
	for i, args := range [][]string{
		{"info", "--image-opts", zq},
		{"info", "--image-opts", zq + ",file.locking=off"},
		{"info", "--image-opts", zq + ",file.locking=on"},
		{"info", "--image-opts", zq + ",locking=off"},
		{"info", "-U", "--image-opts", zq},
		{"info", "--image-opts", zq + ",force-share=on"},
		{"map", "--image-opts", zq + ",file.locking=off"},
		{"compare", "--image-opts", zq + ",file.locking=off", "driver=raw,file.filename=r.raw"},
		{"compare", "--image-opts", "driver=raw,file.filename=r.raw", zq},
		{"resize", "--image-opts", zq, "2M"},
		{"resize", "--image-opts", zq + ",file.locking=off", "2M"},
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(args, " "))
			ours, theirs := work(t, i)
			holdImage(t, ours, "qcow2", "z.qcow2")
			holdImage(t, theirs, "qcow2", "z.qcow2")
			sameAsQemu(t, ours, theirs, args)
			if a, b := runIn(t, ours, "qemu-img", "info", "-U", "z.qcow2"), runIn(t, theirs, "qemu-img", "info", "-U", "z.qcow2"); a != b {
				t.Errorf("z.qcow2 afterwards:\n%s\nqemu-img's:\n%s", a.stdout, b.stdout)
			}
		})
	}
}

// holdImage keeps image (in dir) open for writing in a qemu-io process,
// which takes QEMU's locks, until the test ends.
func holdImage(t *testing.T, dir, format, image string) {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", format, image)
	cmd.Dir = dir
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		cmd.Wait()
	})
	// The answer to a command shows the image is open, and locked.
	if _, err := in.Write([]byte("length\n")); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(out)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("qemu-io %s: %v", image, err)
		}
		if strings.Contains(line, "MiB") {
			go io.Copy(io.Discard, r)
			return
		}
	}
}

// TestImageOptsAutoReadOnly runs as an unprivileged user on images it may
// not write. auto-read-only=on opens such a file read-only where the
// image's users only read it: a read-write raw image (read-only=off) for a
// verb that reads, or the file below a read-only qcow2 image
// (file.read-only=off). A writer fails as without the option, as in
// qemu-img 7.2 (its file node opens read-write once a writer needs it, and
// fails then); so does a read-write qcow2 image, which writes its file.
func TestImageOptsAutoReadOnly(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	cred := nobody(t)
	dir := sharedDir(t)
	for _, c := range []string{"qemu-img create -q -f raw r.raw 1M", "qemu-img create -q -f qcow2 z.qcow2 1M", "chmod 444 r.raw z.qcow2"} {
		sh := exec.Command("bash", "-c", c)
		sh.Dir = dir
		if out, err := sh.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", c, err, out)
		}
	}
	const raw, zq = "driver=raw,file.filename=r.raw", "driver=qcow2,file.filename=z.qcow2"
	for _, args := range [][]string{
		{"resize", "--image-opts", raw, "2M"},
		{"resize", "--image-opts", raw + ",auto-read-only=on", "2M"},
		{"resize", "--image-opts", raw + ",auto-read-only=on,read-only=on", "2M"},
		{"bench", "-w", "-c", "1", "--image-opts", zq + ",auto-read-only=on"},
		{"info", "--image-opts", zq + ",auto-read-only=on"},
		{"info", "--image-opts", zq + ",read-only=off"},
		{"info", "--image-opts", zq + ",read-only=off,auto-read-only=on"},
		{"map", "--image-opts", raw + ",auto-read-only=on"},
		{"map", "--image-opts", raw + ",read-only=off,auto-read-only=on"},
		{"map", "--image-opts", raw + ",read-only=off"},
		{"info", "--image-opts", raw + ",read-only=off,auto-read-only=on"},
		{"bench", "-w", "-c", "1", "--image-opts", raw + ",read-only=off,auto-read-only=on"},
		{"map", "--image-opts", raw + ",file.read-only=off,file.auto-read-only=on"},
		{"map", "--image-opts", "driver=file,filename=r.raw,read-only=off,auto-read-only=on"},
		{"resize", "--image-opts", "driver=file,filename=r.raw,auto-read-only=on", "2M"},
		{"map", "--image-opts", zq + ",read-only=off,auto-read-only=on"},
		{"map", "--image-opts", zq + ",file.read-only=off,file.auto-read-only=on"},
		{"check", "--image-opts", zq + ",file.read-only=off,file.auto-read-only=on"},
		{"check", "--image-opts", zq + ",file.read-only=off"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			got, want := runAsIn(t, cred, dir, binary, args...), runAsIn(t, cred, dir, "qemu-img", args...)
			if got.stdout != want.stdout || got.code != want.code {
				t.Errorf("exit %d, stdout:\n%s\nqemu-img: exit %d, stdout:\n%s", got.code, got.stdout, want.code, want.stdout)
			}
			if g, w := toolStderr(t, got, want); g != w {
				t.Errorf("stderr:\n%s\nqemu-img's, as ublkimg words it:\n%s", g, w)
			}
		})
	}
}
