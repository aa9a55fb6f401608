package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/coroutine"
	"ublkimg/internal/qemutest"
)

// TestSnapshotVerb creates, lists, applies and deletes snapshots like
// qemu-img snapshot, and compares the list (snapshot -l and info, human and
// JSON) and the error messages with qemu-img's.
func TestSnapshotVerb(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	path := filepath.Join(dir, "a.qcow2")
	if _, e, code := qemuImg(t, "create", "-q", "-f", "qcow2", path, "16M"); code != 0 {
		t.Fatal(e)
	}
	do := func(op SnapshotOp, name string) (string, error) {
		var out bytes.Buffer
		err := runCo(t, func(co *coroutine.Co) error {
			return Snapshot(co, SnapshotOptions{Filename: path, Op: op, Name: name}, &out)
		})
		return out.String(), err
	}
	for _, n := range []string{"one", "two", "one"} {
		if _, err := do(SnapshotCreateOp, n); err != nil {
			t.Fatal(err)
		}
	}
	if _, e, code := qemuImg(t, "snapshot", "-c", "three", path); code != 0 {
		t.Fatal(e)
	}
	if _, err := do(SnapshotApplyOp, "2"); err != nil {
		t.Fatal(err)
	}
	if _, err := do(SnapshotDeleteOp, "one"); err != nil { // the first "one"
		t.Fatal(err)
	}
	got, err := do(SnapshotListOp, "")
	want, _, _ := qemuImg(t, "snapshot", "-l", path)
	if err != nil || got != want {
		t.Fatalf("snapshot -l: %v\n%s\nqemu-img:\n%s", err, got, want)
	}
	if !bytes.Contains([]byte(got), []byte("\n3         one ")) || bytes.Contains([]byte(got), []byte("\n1 ")) {
		t.Fatalf("unexpected list:\n%s", got)
	}
	var infos []*ImageInfo
	if err := runCo(t, func(co *coroutine.Co) error {
		infos, err = Info(co, InfoOptions{Filename: path})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var human, js bytes.Buffer
	WriteInfoHuman(&human, infos)
	WriteInfoJSON(&js, infos, false)
	// Only the snapshot parts: the rest of info is tested elsewhere.
	section := func(s, from, to string) string {
		i := strings.Index(s, from)
		if i < 0 {
			return ""
		}
		j := strings.Index(s[i:], to)
		if j < 0 {
			return s[i:]
		}
		return s[i : i+j]
	}
	if want, _, _ := qemuImg(t, "info", path); section(human.String(), "Snapshot list:", "Format specific") != section(want, "Snapshot list:", "Format specific") || !strings.Contains(want, "Snapshot list:") {
		t.Errorf("info:\n%s\nqemu-img:\n%s", human.String(), want)
	}
	if want, _, _ := qemuImg(t, "info", "--output=json", path); section(js.String(), `"snapshots"`, "],") != section(want, `"snapshots"`, "],") || !strings.Contains(want, `"snapshots"`) {
		t.Errorf("info json:\n%s\nqemu-img:\n%s", js.String(), want)
	}
	if _, e, code := qemuImg(t, "check", path); code != 0 {
		t.Fatalf("check: %s", e)
	}
	for _, tc := range []struct {
		op   SnapshotOp
		name string
	}{{SnapshotApplyOp, "nope"}, {SnapshotDeleteOp, "nope"}, {SnapshotDeleteOp, "2"}} {
		_, err := do(tc.op, tc.name)
		_, e, _ := qemuImg(t, "snapshot", "-"+string(tc.op), tc.name, path)
		if err == nil || "qemu-img: "+err.Error()+"\n" != e {
			t.Errorf("snapshot -%c %s: %v, qemu-img: %s", tc.op, tc.name, err, e)
		}
	}
	df := filepath.Join(dir, "d.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "d.raw"), df, "1M")
	path = df
	_, err = do(SnapshotCreateOp, "x")
	_, e, _ := qemuImg(t, "snapshot", "-c", "x", df)
	if err == nil || "qemu-img: "+err.Error()+"\n" != e {
		t.Errorf("data file: %v, qemu-img: %s", err, e)
	}
}
