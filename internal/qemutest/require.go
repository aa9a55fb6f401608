package qemutest

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// RequireEnv names the environment variable that makes a missing oracle a
// test failure instead of a skip. `make test` (and so CI) sets it to 1: a
// test that could not run its oracle there must not pass by skipping.
const RequireEnv = "UBLKIMG_REQUIRE_ORACLES"

// required reports whether RequireEnv is set.
func required() bool { return os.Getenv(RequireEnv) == "1" }

// missingTools returns the tools not found in PATH.
func missingTools(tools []string) []string {
	var missing []string
	for _, name := range tools {
		if _, err := exec.LookPath(name); err != nil {
			missing = append(missing, name)
		}
	}
	return missing
}

// Unavailable ends t because an oracle it needs cannot run (why says what
// is missing): a skip, or a failure when RequireEnv is set.
func Unavailable(t testing.TB, why string) {
	t.Helper()
	if required() {
		t.Fatalf("%s, and %s=1 makes a missing oracle a failure", why, RequireEnv)
	}
	t.Skip(why)
}

// Require ends t (see Unavailable) unless every tool (qemu-img, qemu-io,
// ...) is in PATH.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	if missing := missingTools(tools); missing != nil {
		Unavailable(t, notInstalled(missing))
	}
}

func notInstalled(tools []string) string {
	return strings.Join(tools, ", ") + " not installed (scripts/deps.sh installs it)"
}

// Have reports whether every tool is in PATH, for a test or fuzz target
// that uses the oracle for an extra check or extra seeds and runs without
// it; when RequireEnv is set a missing tool fails t instead.
func Have(t testing.TB, tools ...string) bool {
	t.Helper()
	missing := missingTools(tools)
	if missing != nil && required() {
		Unavailable(t, notInstalled(missing))
	}
	return missing == nil
}
