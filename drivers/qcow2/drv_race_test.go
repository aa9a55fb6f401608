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
// `make test`: every function of this package's tests that reads
// raceEnabled must be a test named in the Makefile's NORACE_TESTS (which
// runs them without -race), and every name there such a test. No other
// package may switch on the race build tag, as NORACE_TESTS runs only
// this one.
func TestRaceReducedRunWithoutRace(t *testing.T) {
	const root = "../.."
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^NORACE_TESTS\s*:=\s*(\S*)\s*$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("no NORACE_TESTS := line in the Makefile")
	}
	listed := strings.Split(string(m[1]), "|")
	slices.Sort(listed)

	var reduced []string
	files, _ := filepath.Glob("*_test.go")
	fset := token.NewFileSet()
	for _, name := range files {
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			fn, ok := d.(*ast.FuncDecl)
			if !ok || fn.Body == nil || !readsRaceEnabled(fn.Body) {
				continue
			}
			if fn.Recv != nil || !strings.HasPrefix(fn.Name.Name, "Test") {
				t.Errorf("%s: %s reads raceEnabled: only Test functions may, so that NORACE_TESTS can name them", name, fn.Name.Name)
				continue
			}
			reduced = append(reduced, fn.Name.Name)
		}
	}
	slices.Sort(reduced)
	if !slices.Equal(reduced, listed) {
		t.Errorf("tests reading raceEnabled: %q; the Makefile's NORACE_TESTS: %q", reduced, listed)
	}

	here := filepath.Join(root, "drivers", "qcow2")
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case d.IsDir() && path != root && strings.HasPrefix(d.Name(), "."):
			return fs.SkipDir // .git, .cache
		case d.IsDir() || !strings.HasSuffix(path, ".go") || filepath.Dir(path) == here:
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if regexp.MustCompile(`(?m)^//go:build .*\brace\b`).Match(b) {
			t.Errorf("%s switches on the race build tag: make test runs only drivers/qcow2 without -race", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
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
