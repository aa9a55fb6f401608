package main

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
	"ublkimg/ublk"
)

func TestForegroundArgs(t *testing.T) {
	got := foregroundArgs([]string{"attach", "-f", "raw", "--id", "3", "a.img"}, "attach")
	want := []string{"attach", "--foreground", "-f", "raw", "--id", "3", "a.img"}
	if !slices.Equal(got, want) {
		t.Errorf("foregroundArgs = %q, want %q", got, want)
	}
}

func TestSdNotify(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	sdNotify("READY=1\nSTATUS=serving")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:n]); !strings.HasPrefix(got, "READY=1\n") {
		t.Errorf("notification %q", got)
	}
	t.Setenv("NOTIFY_SOCKET", "")
	sdNotify("READY=1") // no socket: nothing happens
}

func TestAttachUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ublkimg", "attach"}, "expecting exactly one image"},
		{[]string{"ublkimg", "attach", "-t", "bogus", "a.img"}, "invalid cache option"},
		{[]string{"ublkimg", "attach", "--discard", "maybe", "a.img"}, "invalid discard mode"},
		{[]string{"ublkimg", "attach", "--queues", "0", "a.img"}, "invalid queue count"},
		{[]string{"ublkimg", "attach", "a.img", "--queues", "0"}, "invalid queue count"},
		{[]string{"ublkimg", "attach", "a.img", "b.img"}, "expecting exactly one image"},
		{[]string{"ublkimg", "recover"}, "expecting a device"},
		{[]string{"ublkimg", "recover", "0", "a.img", "b.img"}, "expecting a device"},
		{[]string{"ublkimg", "recover", "sda"}, "not a ublk device"},
		{[]string{"ublkimg", "detach"}, "expecting exactly one device"},
		{[]string{"ublkimg", "detach", "sda"}, "not a ublk device"},
		{[]string{"ublkimg", "list", "--output", "yaml"}, "--output must be human or json"},
	} {
		var out, errOut strings.Builder
		if code := run(tc.args, &out, &errOut); code != 1 {
			t.Errorf("%q: exit %d, want 1", tc.args, code)
		}
		msg := errOut.String()
		if !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 {
			t.Errorf("%q: stderr %q, want one line with %q", tc.args, msg, tc.want)
		}
	}
}

// TestAttachOptionsCheckedFirst: every attach option the kernel would refuse,
// and a passphrase a foreground server would keep in its command line, fails
// at once with one line, before anything else happens: before the server
// sizes its runtime for the queues (--queues 99999 once died of thread
// exhaustion), before the image is looked at (none exists here), and
// before the control device is opened (the host has none: a check that came
// later would say the driver is missing).
func TestAttachOptionsCheckedFirst(t *testing.T) {
	img := filepath.Join(t.TempDir(), "missing.img")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "--foreground", "--queues", "99999", img}, "invalid queue count 99999 (1..4096)"},
		{[]string{"attach", "--queues", "99999", img}, "invalid queue count 99999 (1..4096)"},
		{[]string{"attach", "--queues", "4097", img}, "invalid queue count 4097 (1..4096)"},
		{[]string{"attach", "--foreground", "--depth", "4097", img}, "invalid queue depth 4097 (1..4096)"},
		{[]string{"attach", "--block-size", "1000", img}, "invalid block size 1000"},
		{[]string{"attach", "--foreground", "--block-size", "8192", img}, "invalid block size 8192"},
		{[]string{"attach", "--id", "1048576", img}, "invalid device id 1048576"},
		{[]string{"attach", "--poll-max", "2s", img}, "invalid poll time"},
		{[]string{"attach", "--foreground", "--object", "secret,id=sec0,data=hunter2", img},
			"--object secret,id=sec0,data=...: with --foreground the passphrase would stay readable in the server's command line (/proc/PID/cmdline) for as long as it runs; give it with file=PATH instead"},
		{[]string{"attach", "--object=secret,id=sec0,format=raw,data=hunter2", img, "--foreground"}, "give it with file=PATH instead"},
		{[]string{"recover", "--foreground", "--object", "secret,id=sec0,data=hunter2", "0"}, "give it with file=PATH instead"},
	} {
		start := time.Now()
		r := ublkimg(t, tc.args...)
		if r.code != 1 {
			t.Errorf("%q: exit %d, want 1 (stderr %q)", tc.args, r.code, r.stderr)
			continue
		}
		if msg := oneErrorLine(t, r); !strings.Contains(msg, tc.want) || strings.Contains(msg, "hunter2") {
			t.Errorf("%q: %q, want %q", tc.args, msg, tc.want)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%q: took %v", tc.args, d)
		}
	}
	// In the background the secret goes to the server through a pipe:
	// data= is fine there (the host has no ublk, so the attach fails
	// later, on the control device).
	r := ublkimg(t, "attach", "--object", "secret,id=sec0,data=hunter2", img)
	if msg := oneErrorLine(t, r); strings.Contains(msg, "file=PATH") {
		t.Errorf("background attach with data=: %q", msg)
	}
}

// TestSetMaxProcs: the runtime gets a P per queue thread plus two, but
// never more than the CPUs plus two, since the kernel clamps the queue count
// to the CPUs: a P per requested queue, up to 4096, would only make threads.
func TestSetMaxProcs(t *testing.T) {
	t.Setenv("GOMAXPROCS", "")
	old := runtime.GOMAXPROCS(1)
	defer runtime.GOMAXPROCS(old)
	setMaxProcs(ublk.MaxQueues)
	if got, want := runtime.GOMAXPROCS(0), runtime.NumCPU()+2; got != want {
		t.Errorf("GOMAXPROCS %d for %d queues, want %d", got, ublk.MaxQueues, want)
	}
}

// tempRecordDir points ublk.RecordDir into a new temporary directory for
// the test and returns that directory.
func tempRecordDir(t *testing.T) string {
	dir := t.TempDir()
	old := ublk.RecordDir
	ublk.RecordDir = filepath.Join(dir, "run")
	t.Cleanup(func() { ublk.RecordDir = old })
	return dir
}

// TestRecoverOptions: recover rebuilds the server's options from the
// device's record and refuses, in one line each, a device without record,
// one whose server runs, and an image other than the recorded one.
func TestRecoverOptions(t *testing.T) {
	dir := tempRecordDir(t)
	img := filepath.Join(dir, "a.qcow2")
	dead := ublk.Record{ID: 1, Device: "/dev/ublkb1", Image: img, Format: "qcow2", Queues: 2, Depth: 64,
		BlockSize: 4096, Cache: "directsync", Discard: "ignore", Recovery: true, PID: 1, PIDStart: 1}
	live := ublk.Record{ID: 2, Device: "/dev/ublkb2", Image: img, Format: "raw", Cache: "none", Discard: "unmap"}
	for _, r := range []ublk.Record{dead, live} {
		if err := ublk.WriteRecord(r); err != nil {
			t.Fatal(err)
		}
	}
	t.Chdir(dir)
	for _, tc := range []struct {
		id    int
		image string
		want  string // error substring, or "" for success
	}{
		{1, "", ""},
		{1, img, ""},
		{1, "a.qcow2", ""}, // relative to the working directory
		{1, "b.qcow2", "it served " + img + ", not " + filepath.Join(dir, "b.qcow2")},
		{2, "", "its server (process"},
		{3, "", "ublkimg has no record of it"},
	} {
		o, err := recoverOptions(tc.id, tc.image, false)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%d %q: %v", tc.id, tc.image, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%d %q: %v, want %q", tc.id, tc.image, err, tc.want)
		case tc.want != "":
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("%d %q: more than one line: %q", tc.id, tc.image, err)
			}
		default:
			want := attachOptions{image: img, format: "qcow2", cache: bdrv.CacheDirectsync, cacheSet: true, recover: true,
				cfg: ublk.Config{ID: 1, Queues: 2, Depth: 64, BlockSize: 4096, Discard: ublk.DiscardIgnore, Recovery: true}}
			if o.image != want.image || o.format != want.format || o.cache != want.cache || !o.recover ||
				o.cfg.ID != 1 || o.cfg.Queues != 2 || o.cfg.Depth != 64 || o.cfg.BlockSize != 4096 ||
				o.cfg.Discard != ublk.DiscardIgnore || !o.cfg.Recovery {
				t.Errorf("%d %q: options %+v, want %+v", tc.id, tc.image, *o, want)
			}
		}
	}
}

// TestOpenUnlocked: an image locked by another open (here another open file
// description in this process, as a dead server's ring holds it until the
// kernel tears it down) is waited for only when the record of a dead
// server names it, and for at most lockWait.
func TestOpenUnlocked(t *testing.T) {
	dir := tempRecordDir(t)
	img := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	openRaw := func() (*bdrv.Node, error) {
		var n *bdrv.Node
		err := runCo(func(co *coroutine.Co) (err error) {
			n, err = bdrv.Open(co, bdrv.Spec{Filename: img, Format: "raw"})
			return err
		})
		return n, err
	}
	closeNode := func(n *bdrv.Node) { runCo(func(co *coroutine.Co) error { return n.Close(co) }) }
	for _, tc := range []struct {
		name     string
		dead     bool   // a record of a dead server names the image
		release  int    // the holder closes right after this many opens; 0: never
		attempts int    // opens openUnlocked makes; -1: as many as lockWait allows
		want     string // error substring, "" for success
	}{
		{"live holder", false, 0, 1, `Failed to get "write" lock`},
		{"dead server, released", true, 2, 3, ""},
		{"dead server, still held", true, 0, -1, "still held 2s after its server of /dev/ublkb1, process 1, died"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.RemoveAll(ublk.RecordDir)
			if tc.dead {
				rec := ublk.Record{ID: 1, Device: "/dev/ublkb1", Image: img, PID: 1, PIDStart: 1}
				if err := ublk.WriteRecord(rec); err != nil {
					t.Fatal(err)
				}
			}
			holder, err := openRaw()
			if err != nil {
				t.Fatal(err)
			}
			attempts := 0
			open := func() (*bdrv.Node, error) {
				n, err := openRaw()
				attempts++
				if attempts == tc.release {
					closeNode(holder)
					holder = nil
				}
				return n, err
			}
			start := time.Now()
			n, err := openUnlocked(img, open)
			took := time.Since(start)
			if holder != nil {
				closeNode(holder)
			}
			if n != nil {
				closeNode(n)
			}
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("%v (after %v)", err, took)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("%v, want %q", err, tc.want)
			case tc.want != "" && !errors.Is(err, bdrv.ErrLocked):
				t.Errorf("%v does not match bdrv.ErrLocked", err)
			case tc.attempts > 0 && attempts != tc.attempts:
				t.Errorf("%d opens, want %d", attempts, tc.attempts)
			case tc.attempts < 0 && took < lockWait:
				t.Errorf("gave up after %v, before lockWait (%v)", took, lockWait)
			}
		})
	}
}

// TestRecoveryOptions: an image served with recovery keeps the user's
// cache mode, and an allocating qcow2 write is in the image file once it
// completes, without a flush (a copy of the open file, as a server killed
// then would leave it, reads it back in qemu-img), even if the user's
// options turned x-crash-safe-metadata off.
func TestRecoveryOptions(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	if r := qemuImg(t, "create", "-q", "-f", "qcow2", p, "1M"); r.code != 0 {
		t.Fatal(r.stderr)
	}
	o := &attachOptions{image: p, cache: bdrv.CacheWriteback, cacheSet: true,
		options: recoveryOptions(bdrv.Options{"x-crash-safe-metadata": "off"})}
	node, cache, err := openImage(o)
	if err != nil {
		t.Fatal(err)
	}
	if cache != bdrv.CacheWriteback || node.Cache != bdrv.CacheWriteback {
		t.Errorf("cache mode %v (node %v), want the user's writeback", cache, node.Cache)
	}
	data := bytes.Repeat([]byte{0x5a}, 64<<10)
	killed := filepath.Join(dir, "killed.qcow2")
	err = coroutine.Run(func(co *coroutine.Co) error {
		werr := node.Pwritev(co, 128<<10, bdrv.IOVec{data}, 0)
		if werr == nil {
			var b []byte
			if b, werr = os.ReadFile(p); werr == nil {
				werr = os.WriteFile(killed, b, 0o644)
			}
		}
		return errors.Join(werr, node.Close(co))
	})
	if err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(dir, "killed.raw")
	if r := qemuImg(t, "convert", "-U", "-O", "raw", killed, raw); r.code != 0 {
		t.Fatal(r.stderr)
	}
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[128<<10:192<<10], data) {
		t.Error("the acknowledged write is not in the image file")
	}
}

func TestWithoutObjects(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"attach", "--object", "secret,id=s,data=pw", "img"}, []string{"attach", "img"}},
		{[]string{"attach", "--object=secret,id=s,data=pw", "-f", "qcow2", "img"}, []string{"attach", "-f", "qcow2", "img"}},
		{[]string{"attach", "img", "--object", "a", "--object", "b"}, []string{"attach", "img"}},
		{[]string{"attach", "--", "--object"}, []string{"attach", "--", "--object"}},
	} {
		if got := withoutObjects(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("withoutObjects(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestAttachImageOptions: the open options of an --image-opts string reach
// the served image and the device, from the command line on (the server's
// open, without the kernel): read-only=on makes a read-only device without
// --read-only; discard decides the device's discard handling, --discard
// being its default; cache.direct and cache.no-flush make the cache mode
// with -t; detect-zeroes reaches the image; the record names a cache mode
// recover can give back as -t.
func TestAttachImageOptions(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	raw := "driver=raw,file.filename=" + img
	type want struct {
		readOnly     bool
		discard      ublk.DiscardMode
		cache        bdrv.CacheMode
		fileCache    bdrv.CacheMode
		record       string
		detectZeroes bdrv.DetectZeroes
		err          string
	}
	for _, tc := range []struct {
		args []string
		want want
	}{
		{[]string{img}, want{discard: ublk.DiscardUnmap, cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none"}},
		{[]string{"--image-opts", raw + ",read-only=on"}, want{readOnly: true, cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none"}},
		{[]string{"--image-opts", raw + ",file.read-only=on"}, want{err: "Block node is read-only"}},
		{[]string{"--read-only", "--image-opts", raw + ",read-only=off"}, want{readOnly: true, cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none"}},
		{[]string{"--discard", "ignore", img}, want{discard: ublk.DiscardIgnore, cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none"}},
		{[]string{"--image-opts", raw + ",discard=ignore"}, want{discard: ublk.DiscardIgnore, cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none"}},
		{[]string{"--discard", "ignore", "--image-opts", raw + ",discard=on"}, want{cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none"}},
		{[]string{"--image-opts", raw + ",cache.direct=off"}, want{record: "writeback"}},
		{[]string{"--image-opts", raw + ",file.cache.direct=off"}, want{cache: bdrv.CacheNone, record: "none"}},
		{[]string{"-t", "writeback", "--image-opts", raw + ",cache.no-flush=on"}, want{cache: bdrv.CacheUnsafe, fileCache: bdrv.CacheUnsafe, record: "unsafe"}},
		{[]string{"-t", "writethrough", "--image-opts", raw + ",cache.direct=on"}, want{cache: bdrv.CacheDirectsync, fileCache: bdrv.CacheNone, record: "directsync"}},
		{[]string{"--image-opts", raw + ",cache.no-flush=on"}, want{cache: bdrv.CacheNone | bdrv.CacheUnsafe, fileCache: bdrv.CacheNone | bdrv.CacheUnsafe, record: "none"}},
		{[]string{"--image-opts", raw + ",detect-zeroes=on"}, want{cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none", detectZeroes: bdrv.DetectZeroesOn}},
		{[]string{"--image-opts", raw + ",detect-zeroes=unmap"}, want{cache: bdrv.CacheNone, fileCache: bdrv.CacheNone, record: "none", detectZeroes: bdrv.DetectZeroesUnmap}},
		{[]string{"--discard", "ignore", "--image-opts", raw + ",detect-zeroes=unmap"},
			want{err: "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"}},
		{[]string{"--image-opts", raw + ",read-only=bad"}, want{err: "Parameter 'read-only' expects 'on' or 'off'"}},
		{[]string{"--image-opts", raw + ",locking=off"}, want{err: "Block format 'raw' does not support the option 'locking'"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			o, node, cache, err := attachServed(t, tc.args...)
			if err != nil || tc.want.err != "" {
				if tc.want.err == "" || err == nil || !strings.HasSuffix(err.Error(), tc.want.err) {
					t.Fatalf("error %v, want %q", err, tc.want.err)
				}
				return
			}
			got := want{readOnly: o.cfg.ReadOnly, discard: o.cfg.Discard, cache: cache, fileCache: node.File.Cache,
				record: recordedCache(cache, o.cache), detectZeroes: node.DetectZeroes}
			if got != tc.want {
				t.Errorf("got %+v\nwant %+v", got, tc.want)
			}
			if node.ReadOnly != tc.want.readOnly && !slices.Contains(tc.args, "--read-only") {
				t.Errorf("image read-only %v", node.ReadOnly)
			}
		})
	}
}

// attachServed runs the attach command line args up to the server's open
// of the image: the options, the image opened as the server opens it, and
// the device configuration fitted to it.
func attachServed(t *testing.T, args ...string) (o *attachOptions, node *bdrv.Node, cache bdrv.CacheMode, err error) {
	t.Helper()
	app := newApp(io.Discard, io.Discard)
	app.Command("attach").Action = func(c *cli.Context) error {
		if o, err = parseAttach(c); err != nil {
			return err
		}
		if node, cache, err = openImage(o); err != nil {
			return err
		}
		o.cfg = deviceConfig(o.cfg, node)
		return nil
	}
	argv, nerr := normalize(app, append([]string{"ublkimg", "attach"}, args...))
	if nerr != nil {
		t.Fatal(nerr)
	}
	if rerr := app.Run(argv); rerr != nil && err == nil {
		t.Fatal(rerr)
	}
	if node != nil {
		t.Cleanup(func() { coroutine.Run(func(co *coroutine.Co) error { return node.Close(co) }) })
	}
	return o, node, cache, err
}

// TestAttachUserCopy: --user-copy forces user copy on, --no-user-copy
// turns ublk's automatic choice for a raw image in tmpfs off, and without
// either the choice is ublk's. Both at once, or a value given to the
// boolean flag (getopt's rule), is refused rather than half-honoured.
func TestAttachUserCopy(t *testing.T) {
	img := filepath.Join(t.TempDir(), "a.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args       []string
		on, refuse bool
	}{
		{[]string{img}, false, false},
		{[]string{"--user-copy", img}, true, false},
		{[]string{img, "--no-user-copy"}, false, true},
		{[]string{"--no-user", img}, false, true},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			o, _, _, err := attachServed(t, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if o.cfg.UserCopy != tc.on || o.cfg.NoUserCopy != tc.refuse {
				t.Errorf("UserCopy %v NoUserCopy %v, want %v %v", o.cfg.UserCopy, o.cfg.NoUserCopy, tc.on, tc.refuse)
			}
		})
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "--user-copy", "--no-user-copy", img}, "--user-copy and --no-user-copy exclude each other"},
		{[]string{"attach", "--user-copy=false", img}, "option '--user-copy' doesn't allow an argument"},
	} {
		var out, errOut strings.Builder
		if code := run(append([]string{"ublkimg"}, tc.args...), &out, &errOut); code != 1 {
			t.Errorf("%q: exit %d, want 1", tc.args, code)
		}
		if msg := errOut.String(); !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 {
			t.Errorf("%q: stderr %q, want one line with %q", tc.args, msg, tc.want)
		}
	}
}
