package qcow2_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestRaceReducedRunWithoutRace keeps the cases the race detector drops in
// `make test`: every test function of the module that reads raceEnabled
// must be named in the Makefile's NORACE_TESTS and live in a package of
// NORACE_PKGS (unit-norace runs them there without -race), every name in
// NORACE_TESTS must be a test of those packages, and only those packages
// may switch on the race build tag.
func TestRaceReducedRunWithoutRace(t *testing.T) {
	const root = "../.."
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	listed := makeList(t, mk, "NORACE_TESTS", "|")
	var pkgs []string
	for _, p := range makeList(t, mk, "NORACE_PKGS", " ") {
		pkgs = append(pkgs, filepath.Clean(filepath.Join(root, p)))
	}

	tests := map[string]string{} // test name -> package directory
	fset := token.NewFileSet()
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case d.IsDir() && path != root && strings.HasPrefix(d.Name(), "."):
			return fs.SkipDir // .git, .cache
		case d.IsDir() || !strings.HasSuffix(path, ".go"):
			return nil
		}
		dir := filepath.Dir(path)
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if regexp.MustCompile(`(?m)^//go:build .*\brace\b`).Match(b) && !slices.Contains(pkgs, dir) {
			t.Errorf("%s switches on the race build tag, but its package is not in NORACE_PKGS", path)
		}
		if !strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, b, 0)
		if err != nil {
			return err
		}
		for _, d := range f.Decls {
			fn, ok := d.(*ast.FuncDecl)
			if !ok || fn.Body == nil {
				continue
			}
			isTest := fn.Recv == nil && strings.HasPrefix(fn.Name.Name, "Test")
			if isTest && slices.Contains(pkgs, dir) {
				tests[fn.Name.Name] = dir
			}
			if !readsRaceEnabled(fn.Body) {
				continue
			}
			switch {
			case !isTest:
				t.Errorf("%s: %s reads raceEnabled: only Test functions may, so that NORACE_TESTS can name them", path, fn.Name.Name)
			case !slices.Contains(listed, fn.Name.Name):
				t.Errorf("%s: %s reads raceEnabled but is not in the Makefile's NORACE_TESTS", path, fn.Name.Name)
			case !slices.Contains(pkgs, dir):
				t.Errorf("%s: %s reads raceEnabled but its package is not in the Makefile's NORACE_PKGS", path, fn.Name.Name)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range listed {
		if _, ok := tests[name]; !ok {
			t.Errorf("NORACE_TESTS names %s, which is no test of NORACE_PKGS", name)
		}
	}
}

// makeList returns the items of the Makefile variable name (NAME := ...),
// split at sep.
func makeList(t *testing.T, mk []byte, name, sep string) []string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + name + `\s*:=\s*(.*?)\s*$`).FindSubmatch(mk)
	if m == nil {
		t.Fatalf("no %s := line in the Makefile", name)
	}
	var out []string
	for _, s := range strings.Split(string(m[1]), sep) {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// readsRaceEnabled reports whether the body mentions raceEnabled.
func readsRaceEnabled(body *ast.BlockStmt) bool {
	found := false
	ast.Inspect(body, func(n ast.Node) bool {
		if id, ok := n.(*ast.Ident); ok && id.Name == "raceEnabled" {
			found = true
		}
		return !found
	})
	return found
}
