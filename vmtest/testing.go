package vmtest

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// vmFlag turns VM tests on for the test binaries of packages that import
// this one: go test ./vmtest -vm.
var vmFlag = flag.Bool("vm", false, "run tests that boot the ublk test VM (same as UBLKIMG_VM=1)")

// Enabled reports whether VM tests should run: the -vm flag or UBLKIMG_VM=1
// turns them on; they are off by default and with UBLKIMG_VM=0.
func Enabled() bool {
	switch strings.ToLower(os.Getenv("UBLKIMG_VM")) {
	case "1", "true", "yes", "on":
		return true
	case "0", "false", "no", "off":
		return false
	}
	return *vmFlag
}

// RequireTools skips t when VM tests are off (see Enabled) and otherwise
// fails it, naming what is missing, unless every host tool the harness
// needs is installed (scripts/deps.sh installs them). A missing tool is a
// failure, not a skip, so a machine that should run VM tests cannot pass by
// skipping them.
func RequireTools(t testing.TB) {
	t.Helper()
	if !Enabled() {
		t.Skip("VM tests are off: set UBLKIMG_VM=1 or pass -vm to run them")
	}
	var missing []string
	for _, tool := range []string{"qemu-system-x86_64", "xz", "ldd", "apt-get", "dpkg-deb"} {
		if _, err := lookTool(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if _, err := findBusybox(); err != nil {
		missing = append(missing, "busybox (static)")
	}
	if len(missing) > 0 {
		t.Fatalf("VM tests are on but the host lacks %s: run scripts/deps.sh", strings.Join(missing, ", "))
	}
}

// RunTest is Run for tests: it calls RequireTools, runs with t's context,
// streams the console into the test log when -v is given, keeps the whole
// console log as CacheDir()/logs/<test name>.log (named in the failure
// message), and fails t when Run fails. It returns the Result for further
// checks.
func RunTest(t testing.TB, opts RunOptions) *Result {
	t.Helper()
	RequireTools(t)
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	if opts.Console == nil && testing.Verbose() {
		lw := &lineWriter{logf: t.Logf}
		defer lw.Flush()
		opts.Console = lw
	}
	start := time.Now()
	res, err := Run(t.Context(), opts)
	if res != nil {
		t.Logf("vm: %s (%s): /init after %v (guest uptime %v), scenario after %v, total %v",
			res.Kernel, res.Accel, res.Boot.Round(time.Millisecond), res.GuestBoot.Round(time.Millisecond),
			res.Ready.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	}
	var logPath string
	if res != nil {
		logPath = saveLog(t.Name(), res.Log+"\n--- dmesg ---\n"+res.Dmesg)
	}
	if err != nil {
		if logPath != "" {
			t.Logf("vm: full console log: %s", logPath)
		}
		t.Fatal(err)
	}
	return res
}

// saveLog writes a run's console log to CacheDir()/logs and returns its
// path, or "" if it could not.
func saveLog(name, log string) string {
	cache, err := CacheDir()
	if err != nil {
		return ""
	}
	dir := filepath.Join(cache, "logs")
	if os.MkdirAll(dir, 0o755) != nil {
		return ""
	}
	p := filepath.Join(dir, strings.NewReplacer("/", "_", " ", "_").Replace(name)+".log")
	if os.WriteFile(p, []byte(log), 0o644) != nil {
		return ""
	}
	return p
}

// lineWriter turns console output into one log call per line.
type lineWriter struct {
	mu   sync.Mutex
	logf func(format string, args ...any)
	buf  bytes.Buffer
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	for {
		line, err := w.buf.ReadString('\n')
		if err != nil {
			w.buf.WriteString(line) // partial line: keep it
			return len(p), nil
		}
		w.logf("console: %s", strings.TrimRight(line, "\n"))
	}
}

// Flush logs a partial last line.
func (w *lineWriter) Flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.buf.Len() > 0 {
		w.logf("console: %s", w.buf.String())
		w.buf.Reset()
	}
}
