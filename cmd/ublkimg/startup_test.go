package main

import (
	"bytes"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// initAllocBudget bounds the heap allocations of ublkimg's package
// initialisation (GODEBUG=inittrace=1), a measure of the work every
// process does before main that does not depend on the machine's speed.
// Now about 1200, of which 762 build blackfriday's table of HTML entities
// (urfave/cli's man page support); with client_golang linked it was 2900.
const initAllocBudget = 1500

// heavyInit are packages whose initialisation does real work: client_golang
// registers its default Go and process collectors, protobuf builds its
// registries.
var heavyInit = []string{"github.com/prometheus/", "google.golang.org/protobuf/"}

// TestStartupInit: the package initialisation every ublkimg process pays
// for before main stays small. attach runs two processes (the command and
// the server it starts) and detach one, so each millisecond of it counts
// two or three times in how fast a device comes and goes (bench/attachtime;
// under the test VM's emulation, client_golang's alone took about as long
// as a whole Go program's start).
func TestStartupInit(t *testing.T) {
	cmd := exec.Command(binary, "--help")
	cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("ublkimg --help: %v\n%s", err, stderr.String())
	}
	total, pkgs := 0, 0
	for line := range strings.Lines(stderr.String()) {
		// init PKG @T ms, C ms clock, B bytes, A allocs
		f := strings.Fields(line)
		if len(f) != 11 || f[0] != "init" || f[10] != "allocs" {
			continue
		}
		pkgs++
		allocs, err := strconv.Atoi(f[9])
		if err != nil {
			t.Fatalf("inittrace line %q: %v", line, err)
		}
		total += allocs
		for _, p := range heavyInit {
			if strings.HasPrefix(f[1], p) {
				t.Errorf("%s is initialised at every start (%s bytes, %d allocs): keep it out of the binary", f[1], f[7], allocs)
			}
		}
	}
	if pkgs == 0 {
		t.Fatalf("no inittrace lines in:\n%s", stderr.String())
	}
	if total > initAllocBudget {
		t.Errorf("package initialisation allocates %d times (%d packages), budget %d:\n%s", total, pkgs, initAllocBudget, stderr.String())
	}
}
