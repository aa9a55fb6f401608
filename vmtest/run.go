package vmtest

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Defaults for RunOptions.
const (
	DefaultTimeout = 5 * time.Minute
	DefaultMemory  = 2048 // MiB
	DefaultCPUs    = 2
)

// DefaultModules are loaded when RunOptions.Modules is nil.
var DefaultModules = []string{"ublk_drv"}

// RunOptions describes one VM run.
type RunOptions struct {
	// Script is the scenario, a busybox sh script run from /tmp after
	// /init has loaded the modules. It reports with the helpers of
	// guest/lib.sh: result, check, metric.
	Script string
	// Files are added to the initramfs (see InitramfsOptions.Files).
	Files []File
	// Modules to load; nil means DefaultModules, an empty slice none.
	Modules []string
	// Timeout bounds the whole run, boot to power-off; 0 means
	// $UBLKIMG_VM_TIMEOUT (a time.ParseDuration string) or DefaultTimeout.
	Timeout time.Duration
	// Memory is the guest RAM in MiB; 0 means DefaultMemory. /tmp is a
	// tmpfs, so it bounds the images a scenario can create there.
	Memory int
	// CPUs is the number of vCPUs; 0 means DefaultCPUs.
	CPUs int
	// Accel is "kvm" or "tcg"; empty means $UBLKIMG_VM_ACCEL, else tcg
	// (software emulation). KVM is opt-in: on the project's machines
	// /dev/kvm exists but guests fail under it.
	Accel string
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
	// QemuArgs are appended to qemu's command line, for example to attach a
	// drive: "-drive", "file=disk.img,format=raw,if=virtio" (add the
	// virtio_blk module).
	QemuArgs []string
	// Kernel is the kernel to boot; nil means Kernel(ctx).
	Kernel *KernelFiles
	// Gzip compresses the initramfs (see InitramfsOptions.Gzip).
	Gzip bool
	// Console, when set, receives the serial console as it arrives.
	Console io.Writer
	// Logf, when set, receives the harness's progress messages.
	Logf func(format string, args ...any)
}

// CaseResult is one "@@ RESULT" line.
type CaseResult struct {
	Name   string
	Status string // PASS, FAIL or SKIP
	Detail string
}

// Result is what a run produced. Run returns it also when it fails, as far
// as the run got.
type Result struct {
	// Results are the scenario's cases in the order reported.
	Results []CaseResult
	// Metrics are the scenario's "@@ METRIC name value" lines.
	Metrics map[string]string
	// Log is the whole serial console.
	Log string
	// Dmesg is the kernel log the guest printed after the scenario.
	Dmesg string
	// ExitStatus is the scenario's exit status, -1 if it did not finish.
	ExitStatus int
	// Kernel is the booted kernel's release.
	Kernel string
	// Accel is the accelerator used: "kvm" or "tcg".
	Accel string
	// Boot is the host time from starting qemu to /init's first line.
	Boot time.Duration
	// GuestBoot is the guest's uptime when /init started.
	GuestBoot time.Duration
	// Ready is the host time from starting qemu to the scenario's start
	// (modules loaded).
	Ready time.Duration
	// Total is the host time from starting qemu to its exit.
	Total time.Duration
}

// Case returns the named case, or nil.
func (r *Result) Case(name string) *CaseResult {
	for i := range r.Results {
		if r.Results[i].Name == name {
			return &r.Results[i]
		}
	}
	return nil
}

// LogTail returns the last n lines of the console log.
func (r *Result) LogTail(n int) string {
	lines := strings.Split(strings.TrimRight(r.Log, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// kernelTrouble matches kernel log lines that fail a run: panics, oopses,
// BUG and WARNING splats, lockups and hung tasks.
var kernelTrouble = regexp.MustCompile(`Kernel panic|Oops: |BUG:|WARNING:|general protection fault|` +
	`blocked for more than|soft lockup|hard LOCKUP|rcu_.*(stall|detected)|UBSAN:|KASAN:|kernel BUG at`)

// fatalGrace is how long a run goes on after the console showed kernel
// trouble, so the rest of the report reaches the log, before qemu is killed.
const fatalGrace = 5 * time.Second

// Run boots the kernel with an initramfs holding opts.Files and the modules,
// runs opts.Script in the guest and returns what it reported.
//
// Run returns an error when any case FAILed, when the kernel logged a
// panic, oops, BUG, WARNING, lockup or hung task, when the scenario exited
// non-zero or did not finish ("@@ DONE" missing), when qemu failed, and on
// timeout (qemu is killed). The error includes the tail of the console log;
// the Result, returned whenever the VM was started, holds all of it.
func Run(ctx context.Context, opts RunOptions) (*Result, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	timeout := opts.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
		if s := os.Getenv("UBLKIMG_VM_TIMEOUT"); s != "" {
			d, err := time.ParseDuration(s)
			if err != nil {
				return nil, fmt.Errorf("vm: UBLKIMG_VM_TIMEOUT: %w", err)
			}
			timeout = d
		}
	}
	accel, err := chooseAccel(opts.Accel)
	if err != nil {
		return nil, err
	}
	qemu, err := lookTool("qemu-system-x86_64")
	if err != nil {
		return nil, err
	}
	k := opts.Kernel
	if k == nil {
		if k, err = LoadKernel(ctx, KernelOptions{Logf: logf}); err != nil {
			return nil, err
		}
	}
	modules := opts.Modules
	if modules == nil {
		modules = DefaultModules
	}
	start := time.Now()
	base, err := BuildInitramfs(ctx, InitramfsOptions{Kernel: k, Modules: modules, Files: opts.Files, Gzip: opts.Gzip})
	if err != nil {
		return nil, err
	}
	logf("vm: initramfs %s ready in %v", filepath.Base(base), time.Since(start).Round(time.Millisecond))

	for attempt := 1; ; attempt++ {
		res, crashedBooting, err := runOnce(ctx, opts, k, qemu, accel, base, timeout, logf)
		if !crashedBooting || attempt == bootAttempts {
			return res, err
		}
		logf("vm: the guest kernel crashed before /init ran (%s): booting again, attempt %d of %d",
			strings.Join(troubleLines(res.Log), "; "), attempt+1, bootAttempts)
	}
}

// bootAttempts bounds how often Run boots again after the guest's kernel
// crashed before /init started. TCG with several vCPUs now and then
// trips over the kernel patching its own text at boot (an int3 oops in
// sched_clock_cpu, seen at 3.4 s into a boot on a loaded host): nothing of the
// scenario has run then, so booting again loses nothing, while any
// trouble once /init is running fails the run.
const bootAttempts = 3

// runOnce boots the VM once and runs the scenario, as Run describes;
// crashedBooting reports kernel trouble before the guest's /init said
// BOOT.
func runOnce(ctx context.Context, opts RunOptions, k *KernelFiles, qemu, accel, base string, timeout time.Duration,
	logf func(string, ...any)) (res *Result, crashedBooting bool, err error) {
	work, err := os.MkdirTemp("", "ublkimg-vm-")
	if err != nil {
		return nil, false, fmt.Errorf("vm: %w", err)
	}
	defer os.RemoveAll(work)
	initrd := filepath.Join(work, "initrd")
	if err := writeRunInitrd(initrd, base, opts.Script); err != nil {
		return nil, false, err
	}
	results := filepath.Join(work, "results")

	runCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(runCtx, qemu, qemuArgs(opts, accel, k.Vmlinuz, initrd, results)...)
	cmd.WaitDelay = 5 * time.Second
	// Kill qemu when the test process dies (go test -timeout, ^C).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, false, fmt.Errorf("vm: %w", err)
	}
	var fatal *time.Timer
	con := &console{out: opts.Console, onTrouble: func(line string) {
		logf("vm: kernel trouble on the console, stopping in %v: %s", fatalGrace, line)
		fatal = time.AfterFunc(fatalGrace, cancel)
	}}
	con.start = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, false, fmt.Errorf("vm: starting %s: %w", qemu, err)
	}
	con.read(stdout) // until EOF: qemu exited or was killed
	waitErr := cmd.Wait()
	if fatal != nil {
		fatal.Stop()
	}

	res = &Result{
		ExitStatus: -1,
		Kernel:     k.Release,
		Accel:      accel,
		Metrics:    map[string]string{},
		Log:        con.log.String(),
		Boot:       con.boot,
		Ready:      con.ready,
		Total:      time.Since(con.start),
	}
	var problems []string
	switch {
	case ctx.Err() != nil:
		problems = append(problems, fmt.Sprintf("cancelled: %v", ctx.Err()))
	case errors.Is(runCtx.Err(), context.DeadlineExceeded):
		problems = append(problems, fmt.Sprintf("timed out after %v; qemu killed", timeout))
	case con.trouble != "":
		// qemu was killed on purpose; the trouble is reported below.
	case waitErr != nil:
		problems = append(problems, fmt.Sprintf("qemu: %v: %s", waitErr, strings.TrimSpace(stderr.String())))
	}
	if stderr.Len() > 0 {
		res.Log += "\n[qemu stderr]\n" + stderr.String()
	}
	report, err := os.ReadFile(results)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return res, false, fmt.Errorf("vm: reading results: %w", err)
	}
	done := parseReport(report, res)
	problems = append(problems, res.problems(done)...)
	if len(problems) == 0 {
		return res, false, nil
	}
	return res, con.crashedBooting(), fmt.Errorf("vm: run failed (%s, %s):\n  %s\n--- console tail ---\n%s",
		k.Release, accel, strings.Join(dedup(problems), "\n  "), res.LogTail(40))
}

// qemuArgs is the qemu command line of a run.
func qemuArgs(opts RunOptions, accel, vmlinuz, initrd, results string) []string {
	cpu := "max" // everything TCG emulates
	if accel == "kvm" {
		cpu = "host"
	}
	cmdline := []string{
		"console=ttyS0", "quiet", "rdinit=/init",
		// An oops panics, a panic reboots, and -no-reboot turns that into
		// qemu's exit: a broken kernel ends the run at once.
		"oops=panic", "panic=-1",
		// The default 120 s would outlast most timeouts.
		"sysctl.kernel.hung_task_timeout_secs=30",
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-machine", "q35", "-accel", accel, "-cpu", cpu,
		"-m", strconv.Itoa(cmp.Or(opts.Memory, DefaultMemory)),
		"-smp", strconv.Itoa(cmp.Or(opts.CPUs, DefaultCPUs)),
		"-kernel", vmlinuz, "-initrd", initrd,
		"-append", strings.Join(append(cmdline, opts.KernelArgs...), " "),
		"-serial", "stdio", // ttyS0: the console
		"-serial", "file:" + results, // ttyS1: the results channel
	}
	return append(args, opts.QemuArgs...)
}

// problems lists what is wrong with a finished run's report: failed cases,
// kernel trouble on the console or in dmesg, a missing DONE, a non-zero
// exit.
func (r *Result) problems(done bool) []string {
	var p []string
	p = append(p, troubleLines(r.Log)...)
	p = append(p, troubleLines(r.Dmesg)...)
	for _, c := range r.Results {
		if c.Status != "PASS" && c.Status != "SKIP" {
			p = append(p, fmt.Sprintf("case %s: %s %s", c.Name, c.Status, c.Detail))
		}
	}
	switch {
	case !done:
		p = append(p, "the guest did not finish (no @@ DONE)")
	case r.ExitStatus != 0:
		p = append(p, fmt.Sprintf("scenario exited with status %d", r.ExitStatus))
	}
	return p
}

// writeRunInitrd writes the run's initrd: the cached base archive followed
// by a small archive holding /scenario.sh.
func writeRunInitrd(dst, base, script string) error {
	in, err := os.Open(base)
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	_, err = io.Copy(out, in) // copy_file_range: cheap even for 100 MB
	if err == nil {
		cw := newCPIOWriter(out)
		cw.File("/scenario.sh", 0o755, []byte(script))
		err = cw.Close()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("vm: writing initrd: %w", err)
	}
	return nil
}

// console collects the serial console and watches it for the protocol's
// BOOT and READY lines and for kernel trouble.
type console struct {
	start     time.Time
	out       io.Writer
	log       bytes.Buffer
	boot      time.Duration
	ready     time.Duration
	trouble   string
	onTrouble func(line string)
}

// crashedBooting reports kernel trouble before the guest's /init said
// BOOT: the kernel or the emulator failed before any of the run ran.
func (c *console) crashedBooting() bool { return c.trouble != "" && c.boot == 0 }

func (c *console) read(r io.Reader) {
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		if len(line) > 0 {
			c.log.WriteString(strings.TrimRight(line, "\r\n") + "\n")
			if c.out != nil {
				c.out.Write([]byte(strings.TrimRight(line, "\r\n") + "\n"))
			}
			c.scan(strings.TrimRight(line, "\r\n"))
		}
		if err != nil {
			return
		}
	}
}

func (c *console) scan(line string) {
	switch {
	case strings.HasPrefix(line, "@@ BOOT") && c.boot == 0:
		c.boot = time.Since(c.start)
	case strings.HasPrefix(line, "@@ READY") && c.ready == 0:
		c.ready = time.Since(c.start)
	case strings.HasPrefix(line, "@@ "):
	case c.trouble == "" && kernelTrouble.MatchString(line):
		c.trouble = line
		if c.onTrouble != nil {
			c.onTrouble(line)
		}
	}
}

// parseReport reads the results channel into res and reports whether the
// guest got to "@@ DONE". Lines it does not know are ignored.
func parseReport(report []byte, res *Result) (done bool) {
	var dmesg strings.Builder
	inDmesg := false
	for line := range strings.Lines(string(report)) {
		line = strings.TrimRight(line, "\r\n")
		if inDmesg {
			if line == "@@ DMESG END" {
				inDmesg = false
			} else {
				dmesg.WriteString(line + "\n")
			}
			continue
		}
		// Anything before "@@ " is noise (a partial write, a tty reset).
		i := strings.Index(line, "@@ ")
		if i < 0 {
			continue
		}
		f := strings.SplitN(line[i+3:], " ", 4)
		switch f[0] {
		case "BOOT":
			if len(f) > 1 {
				if d, err := time.ParseDuration(f[1] + "s"); err == nil {
					res.GuestBoot = d
				}
			}
		case "RESULT":
			if len(f) >= 3 {
				c := CaseResult{Name: f[1], Status: f[2]}
				if len(f) == 4 {
					c.Detail = f[3]
				}
				res.Results = append(res.Results, c)
			}
		case "METRIC":
			if len(f) >= 3 {
				res.Metrics[f[1]] = strings.Join(f[2:], " ")
			}
		case "DMESG":
			inDmesg = len(f) > 1 && f[1] == "BEGIN"
		case "DONE":
			done = true
			if len(f) > 1 {
				if n, err := strconv.Atoi(f[1]); err == nil {
					res.ExitStatus = n
				}
			}
		}
	}
	res.Dmesg = dmesg.String()
	return done
}

// troubleLines returns the kernel trouble lines of a log, each once.
func troubleLines(log string) []string {
	var out []string
	for line := range strings.Lines(log) {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "@@ ") && kernelTrouble.MatchString(line) {
			out = append(out, "kernel: "+line)
		}
	}
	return out
}

func dedup(s []string) []string {
	seen := map[string]bool{}
	out := s[:0]
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

// chooseAccel resolves RunOptions.Accel.
func chooseAccel(accel string) (string, error) {
	if accel == "" {
		accel = os.Getenv("UBLKIMG_VM_ACCEL")
	}
	switch accel {
	case "kvm", "tcg":
		return accel, nil
	case "":
		return "tcg", nil
	}
	return "", fmt.Errorf("vm: accelerator %q: want kvm or tcg", accel)
}
