package ublk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	_ "ublkimg/drivers/file"
	_ "ublkimg/drivers/null"
	_ "ublkimg/drivers/raw"
	"ublkimg/ublk/internal/uapi"
	"ublkimg/uring"
)

func TestResultOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int32
	}{
		{nil, 0},
		{unix.ENOSPC, -int32(unix.ENOSPC)},
		{fmt.Errorf("qcow2: %w", unix.EROFS), -int32(unix.EROFS)},
		{uring.ResultError(-int32(unix.EIO)), -int32(unix.EIO)},
		{uring.ResultError(-int32(unix.ENOTSUP)), -int32(unix.ENOTSUP)},
		{errors.New("no errno"), -int32(unix.EIO)},
	} {
		if got := resultOf(tc.err); got != tc.want {
			t.Errorf("resultOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

func TestParseDeviceID(t *testing.T) {
	for in, want := range map[string]int{"/dev/ublkb3": 3, "ublkb12": 12, "/dev/ublkc0": 0, "7": 7} {
		if got, err := ParseDeviceID(in); err != nil || got != want {
			t.Errorf("ParseDeviceID(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "/dev/sda", "ublkb", "-1", "ublkbx", "1048576"} {
		if _, err := ParseDeviceID(in); err == nil {
			t.Errorf("ParseDeviceID(%q) succeeded", in)
		}
	}
}

func TestConfigDefaults(t *testing.T) {
	cfg, err := Config{ID: -1}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Queues != DefaultQueues() || cfg.Depth != 128 || cfg.BlockSize != 512 || cfg.MaxIOBytes != 128<<10 {
		t.Errorf("defaults: %+v", cfg)
	}
	for _, bad := range []Config{
		{ID: -2}, {ID: 1 << 20}, {Queues: 5000}, {Depth: 4097}, {BlockSize: 1000},
		{BlockSize: 8192}, {MaxIOBytes: 1000}, {MaxIOBytes: 64 << 20},
		{ID: -1, UserCopy: true, NoUserCopy: true},
	} {
		if _, err := bad.withDefaults(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// TestWantUserCopy: ADD_DEV asks for user copy when the configuration
// asks for it (an error where the kernel lacks it), and for a mappable node
// (a raw image in tmpfs) where the kernel has it, unless NoUserCopy.
func TestWantUserCopy(t *testing.T) {
	const has, lacks = FeatureUserCopy | FeatureUpdateSize, FeatureUpdateSize
	for _, tc := range []struct {
		cfg      Config
		mappable bool
		features Features
		want     bool
		err      bool
	}{
		{Config{}, false, has, false, false},
		{Config{}, true, has, true, false},
		{Config{}, true, lacks, false, false},
		{Config{UserCopy: true}, false, has, true, false},
		{Config{UserCopy: true}, true, has, true, false},
		{Config{UserCopy: true}, false, lacks, false, true},
		{Config{NoUserCopy: true}, true, has, false, false},
		{Config{NoUserCopy: true}, false, has, false, false},
		{Config{NoUserCopy: true}, true, lacks, false, false},
	} {
		got, err := wantUserCopy(&tc.cfg, tc.mappable, tc.features)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("%+v mappable %v features %#x: %v, %v; want %v (error %v)", tc.cfg, tc.mappable, tc.features, got, err, tc.want, tc.err)
		}
		if err != nil && !errors.Is(err, ErrNotSupported) {
			t.Errorf("%+v: error %v does not match ErrNotSupported", tc.cfg, err)
		}
	}
}

func openNode(t *testing.T, spec bdrv.Spec) *bdrv.Node {
	t.Helper()
	var n *bdrv.Node
	err := coroutine.Run(func(co *coroutine.Co) (err error) {
		n, err = bdrv.Open(co, spec)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { coroutine.Run(func(co *coroutine.Co) error { return n.Close(co) }) })
	return n
}

func TestBuildParams(t *testing.T) {
	img := filepath.Join(t.TempDir(), "a.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20+1000); err != nil {
		t.Fatal(err)
	}
	raw := openNode(t, bdrv.Spec{Filename: img, Format: "raw"})
	cfg, _ := Config{BlockSize: 4096}.withDefaults()
	p, err := buildParams(&cfg, raw, cfg.MaxIOBytes)
	if err != nil {
		t.Fatal(err)
	}
	b := p.Basic
	if b.DevSectors != 64<<20>>9 || b.LogicalBSShift != 12 || b.PhysicalBSShift != 12 || b.MaxSectors != 256 {
		t.Errorf("basic: %+v", b)
	}
	if b.Attrs != uapi.AttrVolatileCache|uapi.AttrFUA {
		t.Errorf("attrs %#x", b.Attrs)
	}
	d := p.Discard
	if p.Types != uapi.ParamTypeBasic|uapi.ParamTypeDiscard || d.MaxDiscardSegments != 1 ||
		d.MaxDiscardSectors != maxLimitSectors || d.MaxWriteZeroesSectors != maxLimitSectors || d.DiscardGranularity != 4096 {
		t.Errorf("discard: types %#x %+v", p.Types, d)
	}

	cfg.Discard = DiscardIgnore
	p, _ = buildParams(&cfg, raw, cfg.MaxIOBytes)
	if p.Discard.MaxDiscardSectors != 0 || p.Discard.MaxWriteZeroesSectors == 0 {
		t.Errorf("discard=ignore: %+v", p.Discard)
	}
	cfg.ReadOnly = true
	p, _ = buildParams(&cfg, raw, cfg.MaxIOBytes)
	if p.Types != uapi.ParamTypeBasic || p.Basic.Attrs&uapi.AttrReadOnly == 0 {
		t.Errorf("read-only: types %#x attrs %#x", p.Types, p.Basic.Attrs)
	}

	null := openNode(t, bdrv.Spec{Filename: "null-co://", Format: "null-co", Options: bdrv.Options{"size": "1M"}})
	cfg, _ = Config{}.withDefaults()
	p, _ = buildParams(&cfg, null, cfg.MaxIOBytes)
	if p.Basic.LogicalBSShift != 9 || p.Basic.PhysicalBSShift != 12 || p.Basic.DevSectors != 2048 {
		t.Errorf("null-co: types %#x %+v", p.Types, p.Basic)
	}
	tiny := openNode(t, bdrv.Spec{Filename: "null-co://", Format: "null-co", Options: bdrv.Options{"size": "100"}})
	if _, err := buildParams(&cfg, tiny, cfg.MaxIOBytes); err == nil {
		t.Error("a 100-byte image was accepted")
	}
}

func TestRecords(t *testing.T) {
	old := RecordDir
	RecordDir = t.TempDir()
	defer func() { RecordDir = old }()
	r := Record{ID: 5, Device: "/dev/ublkb5", Image: "/x.img", Format: "raw", Queues: 2, Depth: 128}
	if err := WriteRecord(r); err != nil {
		t.Fatal(err)
	}
	got, err := ReadRecord(5)
	if err != nil {
		t.Fatal(err)
	}
	if got.PID != os.Getpid() || !got.ServerAlive() || got.Image != "/x.img" {
		t.Errorf("record %+v", got)
	}
	if err := RemoveRecord(5, os.Getpid()+1); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadRecord(5); err != nil {
		t.Error("record of another server removed")
	}
	RemoveRecord(5, os.Getpid())
	if _, err := ReadRecord(5); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record not removed: %v", err)
	}
	dead := Record{PID: os.Getpid(), PIDStart: 1}
	if dead.ServerAlive() {
		t.Error("a record with another start time is alive")
	}
}

func TestErrors(t *testing.T) {
	e := &CmdError{Op: "ADD_DEV", DevID: 3, Errno: unix.EEXIST}
	if !errors.Is(e, ErrIDTaken) || !errors.Is(e, unix.EEXIST) || e.Error() != "ublk device id 3 is already in use" {
		t.Errorf("%v", e)
	}
	if !errors.Is(&UnsupportedFeatureError{Name: "UBLK_F_USER_COPY"}, ErrNotSupported) {
		t.Error("UnsupportedFeatureError does not match ErrNotSupported")
	}
	if !errors.Is(&CmdError{Op: "GET_DEV_INFO", DevID: 1, Errno: unix.ENODEV}, ErrNoDevice) {
		t.Error("ENODEV is not ErrNoDevice")
	}
	// The kernel refuses an unprivileged ADD_DEV with EPERM or EACCES
	// (the control node's permissions): both are ErrPermission, and
	// nothing else is.
	for errno, want := range map[unix.Errno]bool{unix.EPERM: true, unix.EACCES: true, unix.EEXIST: false, unix.EINVAL: false} {
		e := &CmdError{Op: "ADD_DEV", DevID: -1, Errno: errno}
		if errors.Is(e, ErrPermission) != want || !errors.Is(e, errno) {
			t.Errorf("%v: errors.Is(ErrPermission) = %v, want %v", e, errors.Is(e, ErrPermission), want)
		}
	}
}
