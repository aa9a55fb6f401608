package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"ublkimg/internal/cephtest"
)

// binary is the ublkimg built once for all tests, in a directory that the
// unprivileged user of the permission tests can reach.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ublkimg-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	binary = filepath.Join(dir, "ublkimg")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if err := cephtest.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		code = 1
	}
	os.Exit(code)
}

// result is one run of a command.
type result struct {
	stdout, stderr string
	code           int
}

// runAs runs a command, as the given user when cred is not nil.
func runAs(t *testing.T, cred *syscall.Credential, name string, args ...string) result {
	t.Helper()
	return runAsIn(t, cred, "", name, args...)
}

// runAsIn runs a command in dir, as the given user when cred is not nil.
func runAsIn(t *testing.T, cred *syscall.Credential, dir, name string, args ...string) result {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	return runCmd(t, cmd)
}

// runCmd runs cmd, collecting its output and exit status.
func runCmd(t *testing.T, cmd *exec.Cmd) result {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%v: %v", cmd.Args, err)
	}
	return result{out.String(), errb.String(), code}
}

func ublkimg(t *testing.T, args ...string) result {
	t.Helper()
	return runAs(t, nil, binary, args...)
}

func qemuImg(t *testing.T, args ...string) result {
	t.Helper()
	return runAs(t, nil, "qemu-img", args...)
}

// isQemuHint reports whether l is a hint that qemu-img prints on the line
// after an error (error_append_hint), and ublkimg after the same error.
func isQemuHint(l string) bool { return strings.HasPrefix(l, "Is another process using the image [") }

// joinHint joins a hint in lines to the line before it, with a space, as
// qemuMessage joins qemu-img's lines.
func joinHint(lines []string) []string {
	if n := len(lines); n > 1 && isQemuHint(lines[n-1]) {
		return append(lines[:n-2:n-2], lines[n-2]+" "+lines[n-1])
	}
	return lines
}

// oneErrorLine checks the error rule: exactly one line on stderr,
// "ublkimg: ...", never a panic, and returns the message. qemu-img's hint
// line may follow the error; it is returned joined to the message.
func oneErrorLine(t *testing.T, r result) string {
	t.Helper()
	if strings.Contains(r.stderr, "goroutine ") || strings.Contains(r.stderr, "panic") {
		t.Fatalf("stack trace on stderr:\n%s", r.stderr)
	}
	l := joinHint(strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n"))
	if len(l) != 1 || !strings.HasPrefix(l[0], "ublkimg: ") || !strings.HasSuffix(r.stderr, "\n") {
		t.Fatalf("stderr is not one \"ublkimg: \" line:\n%s", r.stderr)
	}
	return strings.TrimPrefix(l[0], "ublkimg: ")
}

// qemuMessage is qemu-img's error message in ublkimg's form: its
// "qemu-img: " lines joined into one, without the "Try 'qemu-img --help'"
// hint.
func qemuMessage(stderr string) string {
	var parts []string
	for _, l := range strings.Split(strings.TrimSuffix(stderr, "\n"), "\n") {
		if strings.HasPrefix(l, "Try 'qemu-img --help'") || strings.HasPrefix(l, "WARNING: ") || strings.HasPrefix(l, "         ") {
			continue
		}
		parts = append(parts, strings.TrimPrefix(l, "qemu-img: "))
	}
	return strings.Join(parts, " ")
}

// writeImage creates a raw image of size bytes with random data in the
// given [offset, length] extents and holes elsewhere.
func writeImage(t *testing.T, path string, size int64, extents ...[2]int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, e := range extents {
		b := make([]byte, e[1])
		rand.Read(b)
		if _, err := f.WriteAt(b, e[0]); err != nil {
			t.Fatal(err)
		}
	}
}

// nobody is the unprivileged user of the permission tests: root bypasses
// file permissions, so "read-only file" errors only show without it.
func nobody(t *testing.T) *syscall.Credential {
	t.Helper()
	if os.Geteuid() != 0 {
		return nil // already unprivileged
	}
	return &syscall.Credential{Uid: 65534, Gid: 65534}
}

// sharedDir is a temporary directory the unprivileged user can enter.
func sharedDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	return dir
}
