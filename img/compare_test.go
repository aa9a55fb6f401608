package img

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

func TestCompareMatchesQemuImg(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	base := image{size: 8 << 20, extents: [][2]int64{{1 << 20, 1 << 20}}}
	a, content := base.make(t, dir, "a.raw")
	same := filepath.Join(dir, "same.raw")
	if err := os.WriteFile(same, content, 0o644); err != nil {
		t.Fatal(err)
	}
	// b differs from a in one byte inside the data extent.
	diff := append([]byte(nil), content...)
	diff[(1<<20)+70000] ^= 0xff
	b := filepath.Join(dir, "b.raw")
	os.WriteFile(b, diff, 0o644)
	// c has data where a has a hole.
	c, _ := image{size: 8 << 20, extents: [][2]int64{{1 << 20, 1 << 20}, {5 << 20, 512}}}.make(t, dir, "c.raw")
	// big is a with 4 MiB more zeros; bigger is a with data past a's end.
	big := filepath.Join(dir, "big.raw")
	os.WriteFile(big, append(append([]byte(nil), content...), make([]byte, 4<<20)...), 0o644)
	bigger := filepath.Join(dir, "bigger.raw")
	tail := make([]byte, 4<<20)
	tail[(3<<20)+1234] = 1
	os.WriteFile(bigger, append(append([]byte(nil), content...), tail...), 0o644)
	// dense is a written out in full (allocated zeros).
	dense := filepath.Join(dir, "dense.raw")
	f, _ := os.Create(dense)
	f.Write(content)
	f.Close()
	empty, _ := image{size: 8 << 20}.make(t, dir, "empty.raw")
	emptyDense := filepath.Join(dir, "empty-dense.raw")
	os.WriteFile(emptyDense, make([]byte, 8<<20), 0o644)

	for _, tc := range []struct {
		name   string
		a, b   string
		strict bool
	}{
		{"identical", a, same, false},
		{"identical strict", a, same, true},
		{"content differs", a, b, false},
		{"data in a hole", a, c, false},
		{"data in a hole reversed", c, a, false},
		{"size mismatch zeros", a, big, false},
		{"size mismatch zeros reversed", big, a, false},
		{"size mismatch data", a, bigger, false},
		{"size mismatch strict", a, big, true},
		{"allocated zeros", a, dense, false},
		{"allocated zeros strict", a, dense, true},
		{"empty vs dense zeros", empty, emptyDense, false},
		{"empty vs dense zeros strict", empty, emptyDense, true},
		{"empty vs a strict", empty, a, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			var code int
			err := runCo(t, func(co *coroutine.Co) error {
				var err error
				code, err = Compare(co, CompareOptions{Filename1: tc.a, Filename2: tc.b, Strict: tc.strict}, &out)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			args := []string{"compare"}
			if tc.strict {
				args = append(args, "-s")
			}
			want, _, wantCode := qemuImg(t, append(args, tc.a, tc.b)...)
			if code != wantCode || out.String() != want {
				t.Errorf("exit %d, output:\n%s\nqemu-img: exit %d, output:\n%s", code, out.String(), wantCode, want)
			}
		})
	}
}

func TestCompareOpenError(t *testing.T) {
	dir := t.TempDir()
	a, _ := image{size: 4096}.make(t, dir, "a.raw")
	missing := filepath.Join(dir, "missing.raw")
	for _, tc := range [][2]string{{missing, a}, {a, missing}} {
		var code int
		err := runCo(t, func(co *coroutine.Co) error {
			var err error
			code, err = Compare(co, CompareOptions{Filename1: tc[0], Filename2: tc[1]}, nil)
			return err
		})
		want := "Could not open '" + missing + "': No such file or directory"
		if code != CompareOpenError || err == nil || err.Error() != want {
			t.Errorf("Compare(%s, %s) = %d, %v; want 2, %s", tc[0], tc[1], code, err, want)
		}
	}
}

func TestCompareProgress(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	a, _ := image{size: 64 << 20, extents: [][2]int64{{0, 8 << 20}, {30 << 20, 1 << 20}}}.make(t, dir, "a.raw")
	var out bytes.Buffer
	err := runCo(t, func(co *coroutine.Co) error {
		_, err := Compare(co, CompareOptions{Filename1: a, Filename2: a, Progress: &out}, &out)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	want, _, _ := qemuImg(t, "compare", "-p", a, a)
	if out.String() != want {
		t.Errorf("progress output %q\nqemu-img        %q", out.String(), want)
	}
}
