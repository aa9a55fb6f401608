// Package cephtest gives tests a Ceph cluster to put RBD images in: the one
// named by UBLKIMG_CEPH_CONF (`make test` starts one for the whole run with
// scripts/ceph-cluster.sh run), or else one this test process starts on
// first use and stops when its tests end (the package's TestMain calls
// [Main]). A test that needs the cluster and cannot have it ends through
// qemutest.Unavailable: a skip, or a failure under `make test`.
package cephtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"ublkimg/internal/qemutest"
)

// ConfEnv names the environment variable holding the ceph.conf of a
// running cluster to use.
const ConfEnv = "UBLKIMG_CEPH_CONF"

// Pool is the pool the cluster script creates and initialises for RBD.
const Pool = "rbd"

var cluster struct {
	once sync.Once
	conf string // ceph.conf of the cluster in use
	dir  string // directory of the cluster this process started, if any
	err  error
	took time.Duration // how long this process's cluster took to come up
}

// Main runs the package's tests and stops the cluster they started, if
// any. Use it as the package's TestMain: func TestMain(m *testing.M) {
// cephtest.Main(m) }.
func Main(m *testing.M) {
	code := m.Run()
	if err := Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "cephtest:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// Conf returns the ceph.conf of a running cluster, starting one on first
// use when ConfEnv names none. It ends t when no cluster can be had.
func Conf(t testing.TB) string {
	t.Helper()
	qemutest.Require(t, "ceph-mon", "ceph-osd", "ceph", "rbd")
	cluster.once.Do(func() {
		if conf := os.Getenv(ConfEnv); conf != "" {
			cluster.conf = conf
			return
		}
		cluster.conf, cluster.err = start()
	})
	if cluster.err != nil {
		qemutest.Unavailable(t, "no Ceph cluster: "+cluster.err.Error())
	}
	return cluster.conf
}

// StartupTime is how long the cluster this process started took to come up
// (0 when it uses one it was given).
func StartupTime() time.Duration { return cluster.took }

// start brings up a cluster in a new temporary directory.
func start() (string, error) {
	script, err := clusterScript()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "ublkimg-ceph.")
	if err != nil {
		return "", err
	}
	t0 := time.Now()
	out, err := exec.Command(script, "start", dir).Output()
	cluster.took = time.Since(t0)
	// The directory is recorded first, so that Main stops what did start.
	cluster.dir = dir
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		return "", fmt.Errorf("%s start: %v: %s", script, err, bytes.TrimSpace(stderr))
	}
	return strings.TrimSpace(string(out)), nil
}

// Stop stops the cluster this process started, if any, and removes its
// directory: for a TestMain that cannot use Main.
func Stop() error {
	if cluster.dir == "" {
		return nil
	}
	script, err := clusterScript()
	if err != nil {
		return err
	}
	if out, err := exec.Command(script, "stop", cluster.dir).CombinedOutput(); err != nil {
		return fmt.Errorf("%s stop: %v: %s", script, err, out)
	}
	return os.RemoveAll(cluster.dir)
}

// clusterScript finds scripts/ceph-cluster.sh in the module's root, above
// the test's working directory (its package directory).
func clusterScript() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, "scripts", "ceph-cluster.sh"), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

var imageSeq atomic.Int64

// ImageName returns a name for a new image in Pool that no other test (of
// this or another process sharing the cluster) uses, and removes the image
// of that name, with its snapshots, when t ends.
func ImageName(t testing.TB) string {
	t.Helper()
	conf := Conf(t)
	name := fmt.Sprintf("t%d-%d-%s", os.Getpid(), imageSeq.Add(1), sanitize(t.Name()))
	t.Cleanup(func() { Remove(conf, name) })
	return name
}

// Remove deletes the image name in Pool, with its snapshots; a missing
// image is no error.
func Remove(conf, name string) {
	spec := Pool + "/" + name
	exec.Command("rbd", "-c", conf, "snap", "purge", spec).Run()
	exec.Command("rbd", "-c", conf, "rm", "--no-progress", spec).Run()
}

// sanitize keeps the letters and digits of a test name, so that it can be
// part of an image name (RBD names take no '/' or '@').
func sanitize(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			b[i] = '_'
		}
	}
	if len(b) > 60 {
		b = b[len(b)-60:]
	}
	return string(b)
}

// Spec returns the QEMU file name of image name in Pool on the cluster of
// conf: rbd:POOL/NAME:conf=CONF.
func Spec(conf, name string) string {
	return "rbd:" + Pool + "/" + name + ":conf=" + conf
}

// Rbd runs the rbd tool on the cluster and returns its output; a failure
// ends t.
func Rbd(t testing.TB, conf string, args ...string) string {
	t.Helper()
	out, err := exec.Command("rbd", append([]string{"-c", conf}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("rbd %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Private is a cluster of the test's own, for tests that disturb it (an
// OSD restart) or need cephx: started now and stopped when t ends.
type Private struct {
	Dir, Conf string
	// AdminKey is client.admin's cephx key (base64), with Cephx.
	AdminKey string
	script   string
}

// PrivateOptions configure a private cluster.
type PrivateOptions struct {
	// Cephx makes the cluster require cephx authentication.
	Cephx bool
}

// NewPrivate starts a private cluster; it ends t when it cannot.
func NewPrivate(t testing.TB, opts PrivateOptions) *Private {
	t.Helper()
	qemutest.Require(t, "ceph-mon", "ceph-osd", "ceph", "rbd")
	script, err := clusterScript()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := &Private{Dir: dir, script: script}
	t.Cleanup(func() {
		if out, err := exec.Command(script, "stop", dir).CombinedOutput(); err != nil {
			t.Errorf("%s stop: %v: %s", script, err, out)
		}
	})
	cmd := exec.Command(script, "start", dir)
	if opts.Cephx {
		cmd.Env = append(os.Environ(), "CEPH_AUTH=cephx")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		qemutest.Unavailable(t, fmt.Sprintf("no Ceph cluster: %s start: %v: %s", script, err, out))
	}
	p.Conf = filepath.Join(dir, "ceph.conf")
	if opts.Cephx {
		key, err := os.ReadFile(filepath.Join(dir, "admin.key"))
		if err != nil {
			t.Fatal(err)
		}
		p.AdminKey = strings.TrimSpace(string(key))
	}
	return p
}

// RestartOSD stops the cluster's OSD and starts it again.
func (p *Private) RestartOSD() error {
	if out, err := exec.Command(p.script, "restart-osd", p.Dir).CombinedOutput(); err != nil {
		return fmt.Errorf("%s restart-osd: %v: %s", p.script, err, out)
	}
	return nil
}
