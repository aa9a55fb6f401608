package qemutest

import (
	"os/exec"
	"testing"
)

// TestRequire: a tool in PATH passes; a missing one skips the test, or
// fails it under RequireEnv (run in a subtest whose outcome is inspected
// through a fake testing.TB).
func TestRequire(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Fatal(err)
	}
	const missing = "ublkimg-no-such-tool"
	for _, tc := range []struct {
		env        string
		tools      []string
		have       bool
		skip, fail bool
	}{
		{"", []string{sh}, true, false, false},
		{"1", []string{sh}, true, false, false},
		{"", []string{sh, missing}, false, true, false},
		{"1", []string{missing}, false, false, true},
	} {
		t.Setenv(RequireEnv, tc.env)
		r := &recorder{TB: t}
		r.run(func() { Require(r, tc.tools...) })
		if r.skipped != tc.skip || r.failed != tc.fail {
			t.Errorf("Require(%q) with %s=%q: skipped %v failed %v, want %v %v", tc.tools, RequireEnv, tc.env, r.skipped, r.failed, tc.skip, tc.fail)
		}
		r = &recorder{TB: t}
		var have bool
		r.run(func() { have = Have(r, tc.tools...) })
		if have != tc.have || r.skipped || r.failed != tc.fail {
			t.Errorf("Have(%q) with %s=%q = %v, skipped %v failed %v, want %v false %v", tc.tools, RequireEnv, tc.env, have, r.skipped, r.failed, tc.have, tc.fail)
		}
	}
}

// recorder is a testing.TB whose Skip and Fatal record the outcome and end
// the function run gave it, as the real ones end the test's goroutine.
type recorder struct {
	testing.TB
	skipped, failed bool
}

type stop struct{}

func (r *recorder) run(fn func()) {
	defer func() {
		if p := recover(); p != nil && p != (stop{}) {
			panic(p)
		}
	}()
	fn()
}

func (r *recorder) Helper()               {}
func (r *recorder) Skip(...any)           { r.skipped = true; panic(stop{}) }
func (r *recorder) Fatalf(string, ...any) { r.failed = true; panic(stop{}) }
