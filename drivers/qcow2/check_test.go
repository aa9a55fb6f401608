package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/file"
	"ublkimg/internal/qemutest"
)

// The checker is tested against qemu-img check 7.2 as the oracle: images of
// every shape are made by qemu-img and qemu-io, damaged in the ways real
// images get damaged, then checked and repaired by both; messages, every
// count of qemu-img's report (its --output=json document, parsed) and exit
// status must be the same, and the repaired images must check clean and read
// the same as the ones qemu-img repaired. img renders the report
// and compares the rendering with qemu-img's, byte for byte.

// ckShape is an image made by qemu-img create and qemu-io.
type ckShape struct {
	name  string
	size  string
	opts  string   // qemu-img create -o
	io    []string // qemu-io commands
	snaps int      // internal snapshots, each followed by a write
	// snapWrite is the length of the write after each snapshot (64k).
	snapWrite string
	// bitmaps adds persistent bitmaps with qemu-img bitmap --add.
	bitmaps  bool
	dataFile bool
	luks     bool
	// killed leaves the image as a lazy-refcounts writer killed mid-way
	// does: dirty bit set, refcounts stale.
	killed bool
	// full shapes get every damage; the others the common ones and those
	// of their features (see ckSelected).
	full bool
}

func ckShapes() []ckShape {
	std := []string{"write -P 1 0 192k", "write -c -P 2 1M 128k", "write -z 2M 64k",
		"write -P 3 3M 4k", "discard 3M 64k", "write -P 4 5M 64k"}
	plain := []string{"write -P 1 0 192k", "write -z 2M 64k", "write -P 4 5M 64k"}
	return []ckShape{
		{name: "v3 64k", full: true, size: "64M", opts: "cluster_size=64k", io: std},
		{name: "v2 4k", full: true, size: "16M", opts: "compat=0.10,cluster_size=4k", io: std, snaps: 2},
		{name: "512 refcount_bits=1", full: true, size: "8M", opts: "cluster_size=512,refcount_bits=1", io: plain},
		{name: "1k refcount_bits=2", size: "8M", opts: "cluster_size=1k,refcount_bits=2", io: std},
		{name: "4k refcount_bits=4", size: "8M", opts: "cluster_size=4k,refcount_bits=4", io: std},
		{name: "8k refcount_bits=8 snapshots", size: "16M", opts: "cluster_size=8k,refcount_bits=8", io: std, snaps: 3},
		{name: "32k refcount_bits=32", size: "16M", opts: "cluster_size=32k,refcount_bits=32", io: std, snaps: 1},
		{name: "2M refcount_bits=64", size: "16M", opts: "cluster_size=2M,refcount_bits=64",
			io: []string{"write -P 1 0 192k", "write -c -P 2 2M 2M", "write -z 4M 2M", "write -P 4 6M 64k"}},
		{name: "extended L2", full: true, size: "16M", opts: "cluster_size=32k,extended_l2=on", snaps: 1,
			io: append([]string{"write -P 5 40k 3k", "write -z 70k 2k"}, std...)},
		{name: "bitmaps", size: "16M", opts: "cluster_size=16k", io: std, bitmaps: true},
		{name: "data file", size: "16M", opts: "cluster_size=64k", io: plain, dataFile: true},
		{name: "luks", size: "8M", opts: "cluster_size=16k", io: plain, luks: true},
		{name: "preallocation=metadata", size: "4M", opts: "preallocation=metadata,cluster_size=16k",
			io: []string{"write -P 1 64k 4k"}},
		{name: "lazy refcounts killed", size: "16M", opts: "lazy_refcounts=on,cluster_size=16k", io: std, killed: true},
	}
}

// ckImage is a built image and how to name it to qemu-img.
type ckImage struct {
	shape ckShape
	path  string
}

// qemuArgs returns the arguments that make qemu-img open path like this
// image (secrets and --image-opts for LUKS).
func (im ckImage) qemuArgs(path string) []string {
	if im.shape.luks {
		return []string{"--object", lukssecret, "--image-opts",
			"driver=qcow2,file.filename=" + path + ",encrypt.key-secret=sec0"}
	}
	return []string{path}
}

// ckBuild makes the image of a shape in a temporary directory of t and
// returns it; tests damage copies of it (ckFresh).
func ckBuild(t *testing.T, sh ckShape) ckImage {
	t.Helper()
	p, err := ckMake(t.TempDir(), sh)
	if err != nil {
		t.Fatalf("building %s: %v", sh.name, err)
	}
	return ckImage{sh, p}
}

// ckFresh returns a copy of the image in a temporary directory of t.
func ckFresh(t *testing.T, im ckImage) ckImage {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	ckCopy(t, im.path, p)
	return ckImage{im.shape, p}
}

func ckMake(dir string, sh ckShape) (string, error) {
	p := filepath.Join(dir, "img.qcow2")
	opts := sh.opts
	var create []string
	if sh.dataFile {
		opts += ",data_file=" + filepath.Join(dir, "data.raw")
	}
	if sh.luks {
		create = []string{"--object", lukssecret}
		opts += ",encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
	}
	run := func(name string, args ...string) error {
		var err error
		out := qemutest.RetryPBKDF2Timing(func() string {
			var b []byte
			b, err = exec.Command(name, args...).CombinedOutput()
			return string(b)
		})
		if err != nil {
			return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := run("qemu-img", append(append([]string{"create", "-q", "-f", "qcow2"}, create...), "-o", opts, p, sh.size)...); err != nil {
		return "", err
	}
	io := func(cmds ...string) error {
		a := []string{"-f", "qcow2"}
		if sh.luks {
			a = []string{"--object", lukssecret, "--image-opts"}
		}
		for _, c := range cmds {
			a = append(a, "-c", c)
		}
		if sh.luks {
			return run("qemu-io", append(a, "driver=qcow2,file.filename="+p+",encrypt.key-secret=sec0")...)
		}
		return run("qemu-io", append(a, p)...)
	}
	if sh.killed {
		// qemu-io dies by SIGKILL: the error is expected.
		a := []string{"-f", "qcow2"}
		for _, c := range append(sh.io, "sigraise 9") {
			a = append(a, "-c", c)
		}
		_ = exec.Command("qemu-io", append(a, p)...).Run()
		return p, nil
	}
	if err := io(sh.io...); err != nil {
		return "", err
	}
	for i := range sh.snaps {
		if err := run("qemu-img", "snapshot", "-c", fmt.Sprintf("snap%d", i), p); err != nil {
			return "", err
		}
		n := sh.snapWrite
		if n == "" {
			n = "64k"
		}
		if err := io(fmt.Sprintf("write -P %d %dk %s", 10+i, 64*i, n)); err != nil {
			return "", err
		}
	}
	if sh.bitmaps {
		if err := run("qemu-img", "bitmap", "--add", p, "b0"); err != nil {
			return "", err
		}
		if err := run("qemu-img", "bitmap", "--add", "-g", "128k", "--disable", p, "b1"); err != nil {
			return "", err
		}
		if err := io(sh.io[0]); err != nil { // dirties the enabled bitmap
			return "", err
		}
	}
	return p, nil
}

// ckCopy copies a file, leaving holes where it has zeros (images with
// 2 MiB clusters are mostly zeros).
func ckCopy(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	const chunk = 64 << 10
	var zero [chunk]byte
	for off := 0; off < len(b); off += chunk {
		c := b[off:min(off+chunk, len(b))]
		if bytes.Equal(c, zero[:len(c)]) {
			continue
		}
		if _, err := f.WriteAt(c, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(int64(len(b))); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// ckResult is Check's result with the lines it reported: Messages of the
// last pass and, after a repair, RepairMessages of the repairing one.
type ckResult struct {
	*CheckResult
	Messages, RepairMessages []string
}

// ckCheck runs Check on the image at path through a file node.
func ckCheck(t testing.TB, path string, fix FixMode) (*ckResult, error) {
	t.Helper()
	var r ckResult
	ev := CheckEvents{
		Message: func(l string) { r.Messages = append(r.Messages, l) },
		Recheck: func(*CheckResult) { r.RepairMessages, r.Messages = r.Messages, nil },
	}
	var cerr error
	err := coroutine.Run(func(co *coroutine.Co) error {
		n, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "file", ReadOnly: fix == 0})
		if err != nil {
			return err
		}
		r.CheckResult, cerr = Check(co, n, fix, ev)
		return n.Close(co)
	})
	if err != nil {
		t.Fatalf("check %s: %v", path, err)
	}
	if r.CheckResult == nil {
		return nil, cerr
	}
	return &r, cerr
}

// ckOutput is what a qemu-img check --output=json run printed: the report
// (nil when it printed none), the stderr lines and the exit status.
type ckOutput struct {
	rep    *ckReport
	stderr []string // without the "qemu-img: " prefix
	rc     int
}

// ckReport is qemu-img check's JSON document (QAPI ImageCheck) parsed;
// members qemu-img leaves out, as it does those that are zero, are zero.
// How the document is written is img's business and tested there.
type ckReport struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int    `json:"check-errors"`
	ImageEndOffset     int64  `json:"image-end-offset"`
	Corruptions        int    `json:"corruptions"`
	Leaks              int    `json:"leaks"`
	CorruptionsFixed   int    `json:"corruptions-fixed"`
	LeaksFixed         int    `json:"leaks-fixed"`
	TotalClusters      int64  `json:"total-clusters"`
	AllocatedClusters  int64  `json:"allocated-clusters"`
	FragmentedClusters int64  `json:"fragmented-clusters"`
	CompressedClusters int64  `json:"compressed-clusters"`
}

// ckReportOf is the report qemu-img would print for r.
func ckReportOf(r *CheckResult, filename string) *ckReport {
	return &ckReport{Filename: filename, Format: "qcow2", CheckErrors: r.CheckErrors,
		ImageEndOffset: r.ImageEndOffset, Corruptions: r.Corruptions, Leaks: r.Leaks,
		CorruptionsFixed: r.CorruptionsFixed, LeaksFixed: r.LeaksFixed,
		TotalClusters: r.TotalClusters, AllocatedClusters: r.AllocatedClusters,
		FragmentedClusters: r.FragmentedClusters, CompressedClusters: r.CompressedClusters}
}

func (o ckOutput) String() string {
	rep := "(none)"
	if o.rep != nil {
		rep = fmt.Sprintf("%+v", *o.rep)
	}
	return fmt.Sprintf("exit %d\n--- stderr:\n%s\n--- report: %s", o.rc, strings.Join(o.stderr, "\n"), rep)
}

func ckLines(s string) []string {
	s = strings.TrimSuffix(s, "\n")
	if s == "" {
		return nil
	}
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		lines[i] = strings.TrimPrefix(l, "qemu-img: ")
	}
	return lines
}

// ckQemu runs qemu-img check --output=json with args and parses its report.
// It runs right after our own Check closed the image, with no retry: a
// lock our close left behind fails it.
func ckQemu(t testing.TB, args ...string) ckOutput {
	t.Helper()
	cmd := exec.Command("qemu-img", append([]string{"check", "--output=json"}, args...)...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	rc := 0
	if ee, ok := err.(*exec.ExitError); ok {
		rc = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	o := ckOutput{stderr: ckLines(se.String()), rc: rc}
	if so.Len() > 0 {
		o.rep = new(ckReport)
		dec := json.NewDecoder(&so)
		dec.DisallowUnknownFields()
		if err := dec.Decode(o.rep); err != nil {
			t.Fatalf("qemu-img check %v: %v\n%s", args, err, so.String())
		}
	}
	return o
}

// ckOurs is what qemu-img check --output=json would print for Check's
// outcome.
func ckOurs(r *ckResult, err error, filename string) ckOutput {
	var o ckOutput
	var fe *CheckFailedError
	if err != nil && !errors.As(err, &fe) {
		return ckOutput{stderr: []string{fmt.Sprintf("Could not open '%s': %v", filename, err)}, rc: 1}
	}
	if r != nil {
		o.stderr = append(append(o.stderr, r.RepairMessages...), r.Messages...)
	}
	if err == nil {
		o.rep = ckReportOf(r.CheckResult, filename)
		o.rc = r.ExitCode()
		if r.CheckErrors != 0 {
			o.stderr = append(o.stderr, "Check failed")
		}
	} else {
		o.stderr = append(o.stderr, fe.Error())
		o.rc = 1
	}
	return o
}

func ckFixArgs(fix FixMode) []string {
	switch fix {
	case FixLeaks:
		return []string{"-r", "leaks"}
	case FixAll:
		return []string{"-r", "all"}
	}
	return nil
}

func ckFixName(fix FixMode) string {
	switch fix {
	case FixLeaks:
		return "-r leaks"
	case FixAll:
		return "-r all"
	}
	return "check"
}

// ckCompare checks and, with fix, repairs copies of the image at src with
// qemu-img and with Check, and compares everything qemu-img prints. After a
// repair both images must check the same, and they must read the same.
// It returns the image Check repaired if qemu-img finds no corruption in it.
func ckCompare(t *testing.T, im ckImage, src string, fix FixMode) (repaired string) {
	t.Helper()
	dir := t.TempDir()
	qp, op := filepath.Join(dir, "qemu.qcow2"), filepath.Join(dir, "ours.qcow2")
	ckCopy(t, src, qp)
	ckCopy(t, src, op)
	args := ckFixArgs(fix)
	qo := ckQemu(t, append(args, im.qemuArgs(qp)...)...)
	name := qp
	if im.shape.luks {
		name = im.qemuArgs(qp)[3]
	}
	r, err := ckCheck(t, op, fix)
	oo := ckOurs(r, err, name)
	if im.shape.bitmaps && qo.rc == 1 {
		// QEMU stores the bitmaps when it closes the image, allocating
		// with whatever refcounts the failed repair left: what it prints
		// and does then is the driver's business, not the checker's.
		for i, l := range qo.stderr {
			if strings.HasPrefix(l, "Check failed") {
				qo.stderr = qo.stderr[:i+1]
				break
			}
		}
	}
	if len(qo.stderr) > 0 && strings.HasPrefix(qo.stderr[0], "Could not open") {
		// QEMU's open validates the bitmaps (qcow2_load_dirty_bitmaps);
		// that is the driver's open, Check only has to fail too.
		if oo.rc != 1 {
			t.Errorf("%s: qemu-img cannot open the image, Check did not fail\nqemu-img: %v\n\nours: %v", ckFixName(fix), qo, oo)
		}
		return ""
	}
	if os.Getenv("CKDEBUG") != "" {
		t.Logf("%s:\nqemu-img: %v\n\nours: %v", ckFixName(fix), qo, oo)
	}
	if !ckSame(qo, oo) {
		t.Errorf("%s: output differs\nqemu-img: %v\n\nours: %v", ckFixName(fix), qo, oo)
	}
	if fix == 0 || im.shape.bitmaps && qo.rc == 1 {
		return ""
	}
	// qemu-img check must find our repaired image as our own second pass
	// did (which printed what qemu-img's second pass printed); without a
	// second pass, as it finds the image qemu-img repaired.
	o2 := ckQemu(t, im.qemuArgs(op)...)
	want := ckOutput{}
	if r != nil && r.Repaired {
		want = ckOutput{rep: ckReportOf(r.CheckResult, ""), stderr: r.Messages, rc: r.ExitCode()}
		want.rep.LeaksFixed, want.rep.CorruptionsFixed = 0, 0
		if want.rc == 1 {
			want.stderr = append(want.stderr, "Check failed")
		}
	} else {
		want = ckQemu(t, im.qemuArgs(qp)...)
	}
	// Our second pass's report must be qemu-img's; otherwise the images
	// were repaired by different programs, and qemu-img's may hold more
	// (QEMU stores bitmaps when it closes the image).
	same := want.rc == o2.rc && slicesEqual(want.stderr, o2.stderr)
	if r != nil && r.Repaired {
		if o2.rep != nil {
			want.rep.Filename = o2.rep.Filename // named after the file checked
		}
		same = ckSame(want, o2)
	}
	if !same {
		t.Errorf("%s: after repair, qemu-img check finds\n%v\n\nwant\n%v", ckFixName(fix), o2, want)
	}
	if o2.rc == 0 || o2.rc == 3 {
		repaired = op
		ckSameContent(t, im, qp, op)
		if fb := ckFeatures(t, qp); fb != ckFeatures(t, op) {
			t.Errorf("%s: feature bits %#x after qemu-img's repair, %#x after ours", ckFixName(fix), fb, ckFeatures(t, op))
		}
	}
	return repaired
}

// ckFeatures returns the incompatible and autoclear feature bits of an
// image (zero for version 2).
func ckFeatures(t *testing.T, path string) [2]uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [104]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		t.Fatal(err)
	}
	if be.Uint32(b[4:]) < 3 {
		return [2]uint64{}
	}
	return [2]uint64{be.Uint64(b[72:]), be.Uint64(b[88:])}
}

// ckSame compares outputs.
func ckSame(a, b ckOutput) bool {
	return a.rc == b.rc && (a.rep == nil) == (b.rep == nil) && (a.rep == nil || *a.rep == *b.rep) &&
		slicesEqual(a.stderr, b.stderr)
}

func slicesEqual(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// ckSameContent compares the guest data of two images with qemu-img compare.
func ckSameContent(t *testing.T, im ckImage, a, b string) {
	t.Helper()
	var args []string
	if im.shape.luks {
		args = []string{"compare", "--object", lukssecret, "--image-opts",
			"driver=qcow2,file.filename=" + a + ",encrypt.key-secret=sec0",
			"driver=qcow2,file.filename=" + b + ",encrypt.key-secret=sec0"}
	} else {
		args = []string{"compare", "-f", "qcow2", "-F", "qcow2", a, b}
	}
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Errorf("repaired images differ: %v\n%s", err, out)
	}
}

// ---------------------------------------------------------------------------
// Damage

// ckLayout is an image file in memory, to be damaged and written back.
type ckLayout struct {
	t    *testing.T
	path string
	data []byte
	h    *Header
	g    Geometry
	cs   uint64
	// l2s caches the allocated active L2 entries as first found.
	l2s []ckEntry
}

func ckLoad(t *testing.T, path string) *ckLayout {
	t.Helper()
	img := readTestImage(t, path)
	return &ckLayout{t: t, path: path, data: img.data, h: img.h, g: img.h.Geometry(), cs: img.h.ClusterSize()}
}

func (l *ckLayout) save() {
	l.t.Helper()
	if err := os.WriteFile(l.path, l.data, 0o644); err != nil {
		l.t.Fatal(err)
	}
}

func (l *ckLayout) u64(off uint64) uint64      { return be.Uint64(l.data[off:]) }
func (l *ckLayout) put64(off, v uint64)        { be.PutUint64(l.data[off:], v) }
func (l *ckLayout) put32(off uint64, v uint32) { be.PutUint32(l.data[off:], v) }

// refblock returns the file offset of the refcount block covering a host
// cluster, 0 if none.
func (l *ckLayout) refblock(cluster uint64) uint64 {
	ti := l.g.RefTableIndex(cluster * l.cs)
	if ti >= uint64(l.h.RefcountTableClusters)*l.cs/8 {
		return 0
	}
	return l.u64(l.h.RefcountTableOffset+ti*8) & RefTableOffsetMask
}

func (l *ckLayout) refcount(cluster uint64) uint64 {
	rb := l.refblock(cluster)
	if rb == 0 || rb+l.cs > uint64(len(l.data)) {
		return 0
	}
	v, err := l.g.Refcount(l.data[rb:rb+l.cs], l.g.RefblockIndex(cluster*l.cs))
	if err != nil {
		l.t.Fatal(err)
	}
	return v
}

func (l *ckLayout) setRefcount(cluster, v uint64) bool {
	rb := l.refblock(cluster)
	if rb == 0 || rb+l.cs > uint64(len(l.data)) || v > l.g.RefcountMax() {
		return false
	}
	if err := l.g.SetRefcount(l.data[rb:rb+l.cs], l.g.RefblockIndex(cluster*l.cs), v); err != nil {
		l.t.Fatal(err)
	}
	return true
}

// ckEntry is a table entry and where it is in the file.
type ckEntry struct {
	at    uint64 // file offset of the entry
	e, bm uint64
	typ   ClusterType
}

// l1 returns the non-zero entries of the active L1 table.
func (l *ckLayout) l1() []ckEntry {
	var out []ckEntry
	for i := range uint64(l.h.L1Size) {
		at := l.h.L1TableOffset + i*8
		if e := l.u64(at); e != 0 {
			out = append(out, ckEntry{at: at, e: e})
		}
	}
	return out
}

// l2 returns the allocated entries of the active L2 tables, as they were
// before any damage.
func (l *ckLayout) l2() []ckEntry {
	if l.l2s != nil {
		return l.l2s
	}
	out := []ckEntry{}
	defer func() { l.l2s = out }()
	esz := l.g.L2EntrySize()
	for _, e1 := range l.l1() {
		l2 := e1.e & L1OffsetMask
		for j := range l.g.L2Entries() {
			at := l2 + j*esz
			e := l.u64(at)
			var bm uint64
			if l.g.ExtendedL2 {
				bm = l.u64(at + 8)
			}
			if e == 0 {
				continue
			}
			if t := l.g.ClusterType(e); t != ClusterUnallocated {
				out = append(out, ckEntry{at: at, e: e, bm: bm, typ: t})
			}
		}
	}
	return out
}

// l2Where returns the first active L2 entry of a type that satisfies ok.
func (l *ckLayout) l2Where(typ ClusterType, ok func(ckEntry) bool) (ckEntry, bool) {
	for _, e := range l.l2() {
		if e.typ == typ && (ok == nil || ok(e)) {
			return e, true
		}
	}
	return ckEntry{}, false
}

func (l *ckLayout) endCluster() uint64 { return (uint64(len(l.data)) + l.cs - 1) / l.cs }

// ckDamage breaks an image; apply returns false when the shape has nothing
// to break that way.
type ckDamage struct {
	name string
	// modes are the repair modes to compare (check only is always run).
	modes []FixMode
	apply func(l *ckLayout) bool
}

var (
	ckAll      = []FixMode{FixAll}
	ckLeaksAll = []FixMode{FixLeaks, FixAll}
)

func ckNormal(l *ckLayout) (ckEntry, bool) {
	if l.h.HasDataFile() {
		return ckEntry{}, false
	}
	return l.l2Where(ClusterNormal, func(e ckEntry) bool { return e.e&OflagCopied != 0 })
}

func ckDamages() []ckDamage {
	return []ckDamage{
		{"clean", ckLeaksAll, func(*ckLayout) bool { return true }},
		{"leaked cluster", ckLeaksAll, func(l *ckLayout) bool {
			// A cluster appended to the file, counted but unused.
			end := l.endCluster()
			l.data = append(l.data, make([]byte, end*l.cs+l.cs-uint64(len(l.data)))...)
			return l.setRefcount(end, 1)
		}},
		{"refcount bumped", ckLeaksAll, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			return ok && l.setRefcount(HostOffset(e.e)/l.cs, l.refcount(HostOffset(e.e)/l.cs)+1)
		}},
		{"refcount zero", ckLeaksAll, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			return ok && l.setRefcount(HostOffset(e.e)/l.cs, 0)
		}},
		{"L2 table refcount zero", ckAll, func(l *ckLayout) bool {
			e1 := l.l1()
			return len(e1) > 0 && l.setRefcount((e1[0].e&L1OffsetMask)/l.cs, 0)
		}},
		{"COPIED cleared", ckLeaksAll, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			if ok {
				l.put64(e.at, e.e&^OflagCopied)
			}
			return ok
		}},
		{"COPIED set on shared cluster", ckAll, func(l *ckLayout) bool {
			e, ok := l.l2Where(ClusterNormal, func(e ckEntry) bool {
				return e.e&OflagCopied == 0 && l.refcount(HostOffset(e.e)/l.cs) > 1
			})
			if ok {
				l.put64(e.at, e.e|OflagCopied)
			}
			return ok
		}},
		{"L1 COPIED cleared", ckAll, func(l *ckLayout) bool {
			e1 := l.l1()
			if len(e1) == 0 || e1[0].e&OflagCopied == 0 {
				return false
			}
			l.put64(e1[0].at, e1[0].e&^OflagCopied)
			return true
		}},
		{"COPIED on compressed", ckAll, func(l *ckLayout) bool {
			e, ok := l.l2Where(ClusterCompressed, nil)
			if ok {
				l.put64(e.at, e.e|OflagCopied)
			}
			return ok
		}},
		{"L2 entry past EOF", ckAll, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			if ok {
				l.put64(e.at, e.e&^L2OffsetMask|(l.endCluster()+16)*l.cs)
			}
			return ok
		}},
		{"L2 entry at 32 PiB", nil, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			if ok {
				l.put64(e.at, e.e&^L2OffsetMask|1<<55)
			}
			return ok
		}},
		{"refcount table entry zeroed", ckLeaksAll, func(l *ckLayout) bool {
			l.put64(l.h.RefcountTableOffset, 0)
			return true
		}},
		{"L2 reserved bit", ckAll, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			if ok {
				l.put64(e.at, e.e|2)
			}
			return ok
		}},
		{"L1 reserved bit", ckAll, func(l *ckLayout) bool {
			e1 := l.l1()
			if len(e1) > 0 {
				l.put64(e1[0].at, e1[0].e|2)
			}
			return len(e1) > 0
		}},
		{"unaligned data cluster", ckAll, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			if ok && l.cs > 512 {
				l.put64(e.at, e.e+512)
			}
			return ok && l.cs > 512
		}},
		{"unaligned preallocated cluster", ckAll, func(l *ckLayout) bool {
			e, ok := ckNormal(l)
			if !ok || l.cs == 512 || l.g.ExtendedL2 || l.h.Version < 3 {
				return false
			}
			l.put64(e.at, (e.e+512)|OflagZero)
			return true
		}},
	}
}

// setFeature sets bits in the incompatible (0), compatible (1) or
// autoclear (2) feature bitmap of a version 3 image.
func (l *ckLayout) setFeature(which int, bits uint64) bool {
	if l.h.Version < 3 {
		return false
	}
	at := uint64(72 + 8*which)
	l.put64(at, l.u64(at)|bits)
	return true
}

// appendClusters adds n clusters at the end of the file with refcount 1 and
// returns the offset of the first; false if no refcount block covers them.
func (l *ckLayout) appendClusters(n uint64) (uint64, bool) {
	first := l.endCluster()
	l.data = append(l.data, make([]byte, (first+n)*l.cs-uint64(len(l.data)))...)
	for c := first; c < first+n; c++ {
		if !l.setRefcount(c, 1) {
			return 0, false
		}
	}
	return first * l.cs, true
}

// snapshotEntries returns the raw entries of the snapshot table.
func (l *ckLayout) snapshotEntries() [][]byte {
	var out [][]byte
	off := l.h.SnapshotsOffset
	for range l.h.NbSnapshots {
		off = (off + 7) &^ 7
		n, err := SnapshotEntrySize(l.data[off:])
		if err != nil {
			l.t.Fatal(err)
		}
		out = append(out, append([]byte(nil), l.data[off:off+uint64(n)]...))
		off += uint64(n)
	}
	return out
}

// moveSnapshotTable writes entries as the snapshot table in new clusters at
// the end of the file, frees the old table's clusters and points the header
// at the new one, keeping the refcounts right.
func (l *ckLayout) moveSnapshotTable(entries [][]byte, count uint32) bool {
	var tab []byte
	for _, e := range entries {
		for len(tab)%8 != 0 {
			tab = append(tab, 0)
		}
		tab = append(tab, e...)
	}
	oldOff := l.h.SnapshotsOffset
	oldEnd := oldOff
	for _, e := range l.snapshotEntries() {
		oldEnd = (oldEnd+7)&^7 + uint64(len(e))
	}
	off, ok := l.appendClusters((uint64(len(tab)) + l.cs - 1) / l.cs)
	if !ok {
		return false
	}
	copy(l.data[off:], tab)
	for c := oldOff / l.cs; c*l.cs < oldEnd; c++ {
		l.setRefcount(c, 0)
	}
	l.put32(60, count)
	l.put64(64, off)
	return true
}

// firstBitmapTable returns the file offset of the first bitmap's table.
func (l *ckLayout) firstBitmapTable() (uint64, bool) {
	if l.h.Bitmaps == nil {
		return 0, false
	}
	return l.u64(l.h.Bitmaps.DirectoryOffset), true
}

// l2Unallocated returns the first unallocated entry of the first L2 table.
func (l *ckLayout) l2Unallocated() (ckEntry, bool) {
	e1 := l.l1()
	if len(e1) == 0 {
		return ckEntry{}, false
	}
	l2 := e1[0].e & L1OffsetMask
	for j := range l.g.L2Entries() {
		at := l2 + j*l.g.L2EntrySize()
		if l.u64(at) == 0 {
			return ckEntry{at: at}, true
		}
	}
	return ckEntry{}, false
}

// ckSpecialDamages are the damages of iotests 036, 060, 108, 112, 138 and
// 261 and those specific to a feature (data file, bitmaps, subclusters).
func ckSpecialDamages() []ckDamage {
	// badRefblock points the second refcount table entry at off.
	badRefblock := func(off func(l *ckLayout) uint64, counted bool) func(l *ckLayout) bool {
		return func(l *ckLayout) bool {
			o := off(l)
			l.put64(l.h.RefcountTableOffset+8, o)
			if counted {
				return l.setRefcount(o/l.cs, 1)
			}
			return true
		}
	}
	beyondEOF := func(l *ckLayout) uint64 { return (l.endCluster() + 4) * l.cs }
	return []ckDamage{
		{"dirty bit", ckLeaksAll, func(l *ckLayout) bool { return l.setFeature(0, IncompatDirty) }},
		{"corrupt bit", ckLeaksAll, func(l *ckLayout) bool { return l.setFeature(0, IncompatCorrupt) }},
		{"unknown autoclear bit", ckLeaksAll, func(l *ckLayout) bool { return l.setFeature(2, 1<<9) }},
		{"refblock outside image", ckAll, badRefblock(beyondEOF, true)},
		{"refblock outside image unallocated", ckAll, badRefblock(beyondEOF, false)},
		{"refblock at signed overflow", ckAll, badRefblock(func(*ckLayout) uint64 { return 0x7fffffffffe00000 }, false)},
		{"refblock at unsigned overflow", ckAll, badRefblock(func(*ckLayout) uint64 { return 0xffffffffffe00000 }, false)},
		{"refblock far beyond EOF", ckAll, badRefblock(func(*ckLayout) uint64 { return 1 << 50 }, false)},
		{"refblock unaligned", ckAll, func(l *ckLayout) bool {
			l.put64(l.h.RefcountTableOffset, l.u64(l.h.RefcountTableOffset)+512)
			return l.cs > 512
		}},
		{"refcount table reserved bit", ckAll, func(l *ckLayout) bool {
			l.put64(l.h.RefcountTableOffset, l.u64(l.h.RefcountTableOffset)|1)
			return true
		}},
		{"refblock used twice", ckAll, func(l *ckLayout) bool {
			l.put64(l.h.RefcountTableOffset+8, l.u64(l.h.RefcountTableOffset))
			return true
		}},
		{"no refcount table", ckAll, func(l *ckLayout) bool {
			l.put64(48, 0)
			l.put32(56, 0)
			return true
		}},
		{"L2 table past EOF", ckAll, func(l *ckLayout) bool {
			e1 := l.l1()
			if len(e1) > 0 {
				l.put64(e1[0].at, e1[0].e&^L1OffsetMask|(l.endCluster()+8)*l.cs)
			}
			return len(e1) > 0
		}},
		{"cluster mapped twice", ckLeaksAll, func(l *ckLayout) bool {
			var n []ckEntry
			for _, e := range l.l2() {
				if e.typ == ClusterNormal {
					n = append(n, e)
				}
			}
			if len(n) < 2 || l.h.HasDataFile() {
				return false
			}
			l.put64(n[1].at, n[1].e&^L2OffsetMask|HostOffset(n[0].e))
			return true
		}},
		{"snapshot L1 unaligned", ckAll, func(l *ckLayout) bool {
			if l.h.NbSnapshots == 0 || l.cs == 512 {
				return false
			}
			l.put64(l.h.SnapshotsOffset, l.u64(l.h.SnapshotsOffset)+512)
			return true
		}},
		{"snapshot L1 too large", ckAll, func(l *ckLayout) bool {
			if l.h.NbSnapshots == 0 {
				return false
			}
			l.put32(l.h.SnapshotsOffset+8, 0x400001)
			return true
		}},
		{"snapshot extra data too large", ckAll, func(l *ckLayout) bool {
			es := l.snapshotEntries()
			if len(es) == 0 {
				return false
			}
			e := es[len(es)-1]
			grown := append(append(append([]byte(nil), e[:SnapshotHeaderSize+24]...), make([]byte, 2000)...), e[SnapshotHeaderSize+24:]...)
			be.PutUint32(grown[36:], uint32(be.Uint32(e[36:])+2000))
			es[len(es)-1] = grown
			return l.moveSnapshotTable(es, uint32(len(es)))
		}},
		{"snapshot entry incomplete", ckAll, func(l *ckLayout) bool {
			es := l.snapshotEntries()
			if len(es) == 0 || l.h.Version < 3 {
				return false
			}
			e := es[0]
			short := append(append([]byte(nil), e[:SnapshotHeaderSize+8]...), e[SnapshotHeaderSize+be.Uint32(e[36:]):]...)
			be.PutUint32(short[36:], 8)
			es[0] = short
			return l.moveSnapshotTable(es, uint32(len(es)))
		}},
		{"too many snapshots", nil, func(l *ckLayout) bool {
			l.put32(60, MaxSnapshots+1)
			return true
		}},
		{"snapshot table unaligned", nil, func(l *ckLayout) bool {
			if l.h.NbSnapshots == 0 {
				return false
			}
			l.put64(64, l.h.SnapshotsOffset+8)
			return true
		}},
		{"snapshot in data file image", ckAll, func(l *ckLayout) bool {
			if !l.h.HasDataFile() {
				return false
			}
			var e [SnapshotHeaderSize + 24 + 2]byte
			be.PutUint16(e[12:], 1)
			be.PutUint16(e[14:], 1)
			be.PutUint32(e[36:], 24)
			e[len(e)-2], e[len(e)-1] = '1', 's'
			return l.moveSnapshotTable([][]byte{e[:]}, 1)
		}},
		{"compressed entry with data file", ckAll, func(l *ckLayout) bool {
			e, ok := l.l2Where(ClusterNormal, nil)
			if !ok || !l.h.HasDataFile() {
				return false
			}
			l.put64(e.at, e.e&^OflagCopied|OflagCompressed)
			return true
		}},
		{"bitmap table reserved bit", ckAll, func(l *ckLayout) bool {
			t, ok := l.firstBitmapTable()
			if ok {
				l.put64(t, l.u64(t)|2)
			}
			return ok
		}},
		{"bitmap directory broken", ckAll, func(l *ckLayout) bool {
			if l.h.Bitmaps == nil {
				return false
			}
			l.data[l.h.Bitmaps.DirectoryOffset+16] = 2 // type
			return true
		}},
		{"subclusters allocated and zero", ckAll, func(l *ckLayout) bool {
			e, ok := l.l2Where(ClusterNormal, func(e ckEntry) bool { return e.bm&1 != 0 })
			if ok && l.g.ExtendedL2 {
				l.put64(e.at+8, e.bm|1<<32)
			}
			return ok && l.g.ExtendedL2
		}},
		{"subclusters of unallocated cluster", ckAll, func(l *ckLayout) bool {
			e, ok := l.l2Unallocated()
			if ok && l.g.ExtendedL2 {
				l.put64(e.at+8, 3)
			}
			return ok && l.g.ExtendedL2
		}},
		{"compressed cluster with subcluster bitmap", ckAll, func(l *ckLayout) bool {
			e, ok := l.l2Where(ClusterCompressed, nil)
			if ok && l.g.ExtendedL2 {
				l.put64(e.at+8, 1)
			}
			return ok && l.g.ExtendedL2
		}},
	}
}

// ckSelected reports whether the matrix runs a damage on a shape, to keep
// the test short: the common damages everywhere, the others on the full
// shapes, and the feature-specific ones wherever the feature is (they skip
// themselves elsewhere).
func ckSelected(sh ckShape, d ckDamage) bool {
	if sh.killed {
		return d.name == "clean"
	}
	if sh.luks { // every qemu-img run derives the LUKS key: keep it short
		return d.name == "clean" || d.name == "refcount zero" || d.name == "refcount bumped"
	}
	switch d.name {
	case "clean", "leaked cluster", "refcount bumped", "refcount zero", "COPIED cleared",
		"L2 entry past EOF", "refcount table entry zeroed", "dirty bit",
		"COPIED set on shared cluster", "snapshot in data file image", "compressed entry with data file",
		"bitmap table reserved bit", "bitmap directory broken", "subclusters allocated and zero",
		"subclusters of unallocated cluster", "compressed cluster with subcluster bitmap":
		return true
	}
	return sh.full
}

// ckRun compares check, and each repair mode of the damage, on one shape.
func ckRun(t *testing.T, pristine ckImage, d ckDamage) {
	t.Helper()
	im := ckFresh(t, pristine)
	l := ckLoad(t, im.path)
	if !d.apply(l) {
		t.Skipf("no %s in %s", d.name, im.shape.name)
	}
	l.save()
	ckCompare(t, im, im.path, 0)
	if d.name == "unknown autoclear bit" && l.h.NbSnapshots > 0 {
		// qemu-img check -r clears the bit by rewriting the header at open,
		// before it has read the snapshot table, and so writes 0 snapshots:
		// QEMU 7.2 loses them. Check keeps them.
		return
	}
	for _, fix := range d.modes {
		if p := ckCompare(t, im, im.path, fix); p != "" && ckKeepsData[d.name] {
			ckSameContent(t, im, pristine.path, p)
		}
	}
}

// ckKeepsData names the damages that leave the guest data alone: a repair
// must give back exactly the data of the undamaged image.
var ckKeepsData = map[string]bool{
	"clean": true, "leaked cluster": true, "refcount bumped": true, "refcount zero": true,
	"L2 table refcount zero": true, "COPIED cleared": true, "COPIED set on shared cluster": true,
	"L1 COPIED cleared": true, "COPIED on compressed": true, "refcount table entry zeroed": true,
	"dirty bit": true, "corrupt bit": true, "unknown autoclear bit": true,
	"refblock outside image": true, "refblock outside image unallocated": true,
	"refblock at signed overflow": true, "refblock at unsigned overflow": true,
	"refblock far beyond EOF": true, "refcount table reserved bit": true, "refblock used twice": true,
	"no refcount table": true, "snapshot entry incomplete": true, "snapshot extra data too large": true,
}

// TestCheckMatrix checks every shape with every damage against qemu-img.
func TestCheckMatrix(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, sh := range ckShapes() {
		t.Run(sh.name, func(t *testing.T) {
			t.Parallel()
			im := ckBuild(t, sh)
			for _, d := range append(ckDamages(), ckSpecialDamages()...) {
				if !ckSelected(sh, d) {
					continue
				}
				t.Run(d.name, func(t *testing.T) { ckRun(t, im, d) })
			}
		})
	}
}

// TestCheckRepairGrowsRefcountTable repairs an image whose refcount table
// is full (every cluster it can describe is in use) and whose snapshot
// table must be rewritten: the new table needs a cluster no refcount table
// entry can describe, so the repair grows the refcount table, as qemu-img
// check -r all does (it used to fail with ENOSPC).
func TestCheckRepairGrowsRefcountTable(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	const cs = 512
	// 64-bit refcounts: 64 per block, and a one-cluster table of 64
	// blocks describes 4096 clusters. Layout: header, refcount table, 64
	// refcount blocks, L1 table, snapshot table, then 62 L2 tables and
	// 3966 data clusters, which fill the file to 4096 clusters.
	const rt, rb, l1, snap, l2s, nL2, nData = 1, 2, 66, 67, 68, 62, 3966
	h := &Header{Version: 3, ClusterBits: 9, Size: 64 * 64 * cs, L1Size: 64, L1TableOffset: l1 * cs,
		RefcountTableOffset: rt * cs, RefcountTableClusters: 1, RefcountOrder: 6,
		NbSnapshots: 1, SnapshotsOffset: snap * cs}
	hdr, err := h.Marshal(cs)
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, 4096*cs)
	copy(img, hdr)
	g := h.Geometry()
	for c := range uint64(4096) {
		if c%64 == 0 {
			be.PutUint64(img[rt*cs+c/64*8:], (rb+c/64)*cs)
		}
		if err := g.SetRefcount(img[(rb+c/64)*cs:][:cs], c%64, 1); err != nil {
			t.Fatal(err)
		}
	}
	data := uint64(l2s + nL2)
	for i := range uint64(nData) {
		l2 := l2s + i/64
		if i%64 == 0 {
			be.PutUint64(img[l1*cs+i/64*8:], l2*cs|OflagCopied)
		}
		be.PutUint64(img[l2*cs+i%64*8:], (data+i)*cs|OflagCopied)
		img[(data+i)*cs] = byte(i)
	}
	// One snapshot without L1 table whose entry lacks the extra data a
	// version 3 image requires: a repair rewrites the table.
	e := img[snap*cs:]
	be.PutUint16(e[12:], 1) // ID length
	be.PutUint16(e[14:], 1) // name length
	e[40], e[41] = '1', 's'
	p := filepath.Join(t.TempDir(), "full.qcow2")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	im := ckImage{path: p}
	ckCompare(t, im, p, 0)
	if ckCompare(t, im, p, FixAll) == "" {
		t.Error("the repaired image is not clean")
	}
}

// TestCheckRefcountTableBeyondEOF checks and repairs an image whose
// refcount table lies far past the end of the file: it reads as zeros, as
// in QEMU, and -r all rebuilds the refcount structure.
func TestCheckRefcountTableBeyondEOF(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := qemuCreate(t, t.TempDir(), "rt.qcow2", "1M")
	mustRun(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", p)
	l := ckLoad(t, p)
	l.put64(48, 1<<50)
	l.save()
	im := ckImage{path: p}
	for _, fix := range []FixMode{0, FixLeaks, FixAll} {
		ckCompare(t, im, p, fix)
	}
}
