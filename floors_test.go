// The floor rule of docs/design.md: every package sits on one floor and
// imports only the packages its floor may use. This test reads the import
// lines of every Go file of the module (go/parser, no build) and fails on
// an import a package may not have, on a package no rule places, and on
// test support reached by code that is not a test.
package ublkimg

import (
	"fmt"
	"go/parser"
	"go/token"
	"io/fs"
	"maps"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

const module = "ublkimg"

// floor is one package (or, ending in "/*", every package under a path) and
// the module packages its non-test files may import, in the same notation.
// A "!" before an entry allows only a blank import of it: registration.
type floor struct {
	pkg   string
	may   []string
	tests bool // test support: only tests and the test harness import it
}

// floors is the table of docs/design.md, lowest floor first.
var floors = []floor{
	{pkg: "uring"},
	{pkg: "coroutine", may: []string{"uring"}},
	{pkg: "bdrv", may: []string{"coroutine"}},
	{pkg: "drivers/lukscrypto"},
	{pkg: "drivers/*", may: []string{"bdrv", "coroutine", "uring", "drivers/lukscrypto"}},
	{pkg: "img", may: []string{"bdrv", "coroutine"}},
	{pkg: "jobs", may: []string{"bdrv", "coroutine"}},
	{pkg: "ublk/internal/*", may: []string{"uring"}},
	{pkg: "ublk", may: []string{"bdrv", "coroutine", "uring", "ublk/internal/*"}},
	{pkg: "cmd/ublkimg", may: []string{"bdrv", "coroutine", "uring", "img", "jobs", "ublk", "!drivers/*"}},

	// Test support and the harness around it.
	{pkg: "bdrv/bdrvtest", may: []string{"bdrv", "coroutine"}, tests: true},
	{pkg: "internal/qemutest", tests: true},
	{pkg: "internal/fuzzlimit", tests: true},
	{pkg: "internal/promtest", tests: true},
	{pkg: "internal/cephtest", may: []string{"internal/qemutest"}, tests: true},
	{pkg: "vmtest", may: []string{"internal/qemutest"}, tests: true},
	{pkg: "vmtest/tcpfwd", tests: true},
	{pkg: "cmd/vmdemo", may: []string{"vmtest"}},
	{pkg: "bench/*", may: []string{"vmtest"}},
}

// imp is one import of one file.
type imp struct {
	file, path  string
	blank, test bool
}

// matches reports whether package pkg (module-relative) is pattern.
func matches(pattern, pkg string) bool {
	if dir, ok := strings.CutSuffix(pattern, "/*"); ok {
		return strings.HasPrefix(pkg, dir+"/")
	}
	return pattern == pkg
}

// floorOf finds pkg's rule: an exact entry before a "/*" one.
func floorOf(pkg string) *floor {
	for i := range floors {
		if floors[i].pkg == pkg {
			return &floors[i]
		}
	}
	for i := range floors {
		if matches(floors[i].pkg, pkg) {
			return &floors[i]
		}
	}
	return nil
}

// violations checks the imports of every package against floors.
func violations(pkgs map[string][]imp) []string {
	var bad []string
	for _, pkg := range slices.Sorted(maps.Keys(pkgs)) {
		f := floorOf(pkg)
		if f == nil {
			bad = append(bad, fmt.Sprintf("%s: on no floor: add it to floors and to docs/design.md", pkg))
			continue
		}
		for _, im := range pkgs[pkg] {
			dep, ok := strings.CutPrefix(im.path, module+"/")
			if !ok {
				continue
			}
			if d := floorOf(dep); d != nil && d.tests && !im.test && !f.tests && !strings.HasPrefix(pkg, "bench/") && pkg != "cmd/vmdemo" {
				bad = append(bad, fmt.Sprintf("%s: imports test support %s outside a test", im.file, dep))
				continue
			}
			if im.test {
				continue
			}
			if !allowed(f, dep, im.blank) {
				bad = append(bad, fmt.Sprintf("%s: %s may not import %s", im.file, pkg, dep))
			}
		}
	}
	return bad
}

// allowed reports whether f's package may import dep (blankly or not).
func allowed(f *floor, dep string, blank bool) bool {
	for _, m := range f.may {
		blankOnly := strings.HasPrefix(m, "!")
		if matches(strings.TrimPrefix(m, "!"), dep) && (blank || !blankOnly) {
			return true
		}
	}
	return false
}

// moduleImports reads the imports of every Go file under root, by package
// directory (module-relative; testdata and hidden directories skipped).
func moduleImports(t *testing.T, root string) map[string][]imp {
	t.Helper()
	pkgs := map[string][]imp{}
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		rel, err := filepath.Rel(root, filepath.Dir(path))
		if err != nil {
			return err
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		pkg := filepath.ToSlash(rel)
		if _, ok := pkgs[pkg]; !ok {
			pkgs[pkg] = nil
		}
		for _, s := range f.Imports {
			p, err := strconv.Unquote(s.Path.Value)
			if err != nil {
				return err
			}
			file, _ := filepath.Rel(root, path)
			pkgs[pkg] = append(pkgs[pkg], imp{file: file, path: p,
				blank: s.Name != nil && s.Name.Name == "_", test: strings.HasSuffix(path, "_test.go")})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	delete(pkgs, ".") // this test
	return pkgs
}

func TestFloors(t *testing.T) {
	pkgs := moduleImports(t, ".")
	for _, p := range []string{"uring", "bdrv", "drivers/qcow2", "img", "jobs", "ublk", "cmd/ublkimg"} {
		if _, ok := pkgs[p]; !ok {
			t.Fatalf("package %s not found: the walk is broken", p)
		}
	}
	for _, v := range violations(pkgs) {
		t.Error(v)
	}
}

// TestFloorsCatch checks that the rule catches what it is for: an import
// from a lower floor into a higher one, a verb naming a driver, a command
// importing a driver for more than registration, test support in
// production code, a package nobody placed.
func TestFloorsCatch(t *testing.T) {
	good := map[string][]imp{
		"uring":         nil,
		"coroutine":     {{file: "coroutine/co.go", path: "ublkimg/uring"}},
		"bdrv":          {{file: "bdrv/node.go", path: "ublkimg/coroutine"}, {file: "bdrv/x_test.go", path: "ublkimg/drivers/file", test: true}},
		"drivers/qcow2": {{file: "drivers/qcow2/a.go", path: "ublkimg/drivers/lukscrypto"}, {file: "drivers/qcow2/a.go", path: "golang.org/x/sys/unix"}},
		"drivers/rbd":   {{file: "drivers/rbd/rbd.go", path: "ublkimg/bdrv"}},
		"cmd/ublkimg":   {{file: "cmd/ublkimg/main.go", path: "ublkimg/drivers/qcow2", blank: true}, {file: "cmd/ublkimg/t_test.go", path: "ublkimg/internal/qemutest", test: true}},
		"cmd/vmdemo":    {{file: "cmd/vmdemo/main.go", path: "ublkimg/vmtest"}},
	}
	if v := violations(good); len(v) != 0 {
		t.Fatalf("a good graph is refused: %v", v)
	}
	for _, tc := range []struct {
		pkg  string
		imp  imp
		want string
	}{
		{"uring", imp{file: "uring/ring.go", path: "ublkimg/bdrv"}, "uring may not import bdrv"},
		{"coroutine", imp{file: "coroutine/co.go", path: "ublkimg/bdrv"}, "coroutine may not import bdrv"},
		{"bdrv", imp{file: "bdrv/node.go", path: "ublkimg/drivers/file"}, "bdrv may not import drivers/file"},
		{"img", imp{file: "img/amend.go", path: "ublkimg/drivers/qcow2"}, "img may not import drivers/qcow2"},
		{"img", imp{file: "img/amend.go", path: "ublkimg/ublk"}, "img may not import ublk"},
		{"drivers/qcow2", imp{file: "drivers/qcow2/a.go", path: "ublkimg/drivers/file"}, "drivers/qcow2 may not import drivers/file"},
		{"drivers/rbd", imp{file: "drivers/rbd/rbd.go", path: "ublkimg/img"}, "drivers/rbd may not import img"},
		{"ublk", imp{file: "ublk/q.go", path: "ublkimg/img"}, "ublk may not import img"},
		{"jobs", imp{file: "jobs/backup.go", path: "ublkimg/drivers/qcow2"}, "jobs may not import drivers/qcow2"},
		{"jobs", imp{file: "jobs/backup.go", path: "ublkimg/ublk"}, "jobs may not import ublk"},
		{"cmd/ublkimg", imp{file: "cmd/ublkimg/attach.go", path: "ublkimg/drivers/qcow2"}, "cmd/ublkimg may not import drivers/qcow2"},
		{"bdrv", imp{file: "bdrv/node.go", path: "ublkimg/internal/qemutest"}, "imports test support internal/qemutest outside a test"},
		{"newpkg", imp{file: "newpkg/a.go", path: "ublkimg/bdrv"}, "newpkg: on no floor"},
	} {
		pkgs := map[string][]imp{}
		for k, v := range good {
			pkgs[k] = slices.Clone(v)
		}
		pkgs[tc.pkg] = append(pkgs[tc.pkg], tc.imp)
		v := violations(pkgs)
		sort.Strings(v)
		if len(v) != 1 || !strings.Contains(v[0], tc.want) {
			t.Errorf("%s importing %s: %v, want one violation %q", tc.pkg, tc.imp.path, v, tc.want)
		}
	}
}
