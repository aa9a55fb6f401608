package uapi

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// repoRoot is the repository, seen from this package's directory.
const repoRoot = "../../.."

// TestCitations: the ublk packages cite the kernel interface by section of
// docs/ublk-uapi.md, which is part of the repository: every section they
// cite exists there, and nothing points outside the repository for it.
func TestCitations(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(repoRoot, "docs", "ublk-uapi.md"))
	if err != nil {
		t.Fatal(err)
	}
	sections := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#{2,3} (\d+(?:\.\d+)?)\.? `).FindAllStringSubmatch(string(doc), -1) {
		sections[m[1]] = true
	}
	if len(sections) < 20 {
		t.Fatalf("docs/ublk-uapi.md has %d numbered sections", len(sections))
	}
	cite := regexp.MustCompile(`§+(\d+(?:\.\d+)?)(?:[-–](\d+(?:\.\d+)?))?`)
	cited := 0
	err = filepath.WalkDir(filepath.Join(repoRoot, "ublk"), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !(strings.HasSuffix(path, ".go") || strings.HasSuffix(path, ".md")) ||
			d.Name() == "citations_test.go" {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		text := string(data)
		for _, line := range strings.Split(text, "\n") {
			outside := strings.Contains(line, "shared/") ||
				strings.Contains(line, "ublk-uapi.md") && !strings.Contains(line, "docs/ublk-uapi.md") && !strings.Contains(line, `"ublk-uapi.md"`)
			if outside {
				t.Errorf("%s: cites something outside the repository: %q", path, strings.TrimSpace(line))
			}
		}
		for _, m := range cite.FindAllStringSubmatch(text, -1) {
			for _, n := range m[1:] {
				if n == "" {
					continue
				}
				cited++
				if !sections[n] {
					t.Errorf("%s cites §%s, which docs/ublk-uapi.md does not have", path, n)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if cited < 40 {
		t.Errorf("only %d citations found: is the pattern still right?", cited)
	}
}
