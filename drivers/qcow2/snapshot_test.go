package qcow2

import (
	"bytes"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
)

func sampleSnapshots() []Snapshot {
	return []Snapshot{
		{L1TableOffset: 0x70000, L1Size: 2, ID: "1", Name: "first", DateSec: 1700000000, DateNsec: 123,
			VMClockNsec: 5e9, VMStateSize: 0, DiskSize: 1 << 30, Icount: -1, ExtraDataSize: 24},
		{L1TableOffset: 0x80000, L1Size: 16, ID: "22", Name: "with vm state", VMStateSize: 5 << 30,
			DiskSize: 2 << 30, Icount: 77, ExtraDataSize: 24 + 5, UnknownExtra: []byte("hello")},
		{L1TableOffset: 0x90000, L1Size: 0, ID: "333", Name: "", DiskSize: 1 << 30, Icount: 0, ExtraDataSize: 24},
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	snaps := sampleSnapshots()
	b, err := MarshalSnapshotTable(snaps)
	if err != nil {
		t.Fatal(err)
	}
	// Layout: entry 0 is 40+24+1+5 = 70 bytes, padded to 72.
	if be.Uint32(b[36:]) != 24 || string(b[64:70]) != "1first" || !allZero(b[70:72]) {
		t.Errorf("entry 0 layout: % x", b[:72])
	}
	// Entry 1: the 32-bit VM state size is 0 because 5 GiB does not fit.
	if be.Uint32(b[72+32:]) != 0 || be.Uint64(b[72+40:]) != 5<<30 {
		t.Error("large VM state size not stored as QEMU does")
	}
	got, n, err := ParseSnapshotTable(append(b, 0xff, 0xff), uint32(len(snaps)), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if n != len(b) {
		t.Errorf("table length %d, want %d", n, len(b))
	}
	if !reflect.DeepEqual(got, snaps) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, snaps)
	}
	if size, err := SnapshotEntrySize(b); err != nil || size != 70 {
		t.Errorf("SnapshotEntrySize(entry 0) = %d, %v; want 70", size, err)
	}
	if size, err := SnapshotEntrySize(b[72:]); err != nil || size != 40+29+2+13 {
		t.Errorf("SnapshotEntrySize(entry 1) = %d, %v; want 84", size, err)
	}
	g := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	if err := CheckSnapshots(got, g, 0x60000, 0xa0000); err != nil {
		t.Errorf("CheckSnapshots: %v", err)
	}
}

// entry builds a raw snapshot table entry with the given extra data.
func rawSnapshot(l1 uint64, l1Size uint32, id, name string, vmstate32 uint32, extra []byte) []byte {
	b := make([]byte, SnapshotHeaderSize)
	be.PutUint64(b, l1)
	be.PutUint32(b[8:], l1Size)
	be.PutUint16(b[12:], uint16(len(id)))
	be.PutUint16(b[14:], uint16(len(name)))
	be.PutUint32(b[32:], vmstate32)
	be.PutUint32(b[36:], uint32(len(extra)))
	b = append(b, extra...)
	b = append(b, id...)
	b = append(b, name...)
	for len(b)%8 != 0 {
		b = append(b, 0)
	}
	return b
}

func TestSnapshotShortExtra(t *testing.T) {
	e8 := make([]byte, 8)
	be.PutUint64(e8, 1<<33)
	e16 := make([]byte, 16)
	be.PutUint64(e16[8:], 12345)
	table := bytes.Join([][]byte{
		rawSnapshot(0x10000, 1, "1", "v2 style", 4096, nil),
		rawSnapshot(0x10000, 1, "2", "vmstate64", 4096, e8),
		rawSnapshot(0x10000, 1, "3", "disk size", 4096, e16),
	}, nil)
	snaps, _, err := ParseSnapshotTable(table, 3, 999)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ vm, disk uint64 }{{4096, 999}, {1 << 33, 999}, {0, 12345}}
	for i, s := range snaps {
		if s.VMStateSize != want[i].vm || s.DiskSize != want[i].disk || s.Icount != -1 {
			t.Errorf("entry %d: vm %d disk %d icount %d", i, s.VMStateSize, s.DiskSize, s.Icount)
		}
	}
	v3 := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	err = CheckSnapshots(snaps, v3, 0x20000, -1)
	if err == nil || !strings.Contains(err.Error(), `snapshot "1" has insufficient extra data (0 bytes, version 3 requires 16)`) {
		t.Errorf("CheckSnapshots v3: %v", err)
	}
	v2 := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 2}
	if err := CheckSnapshots(snaps, v2, 0x20000, -1); err != nil {
		t.Errorf("CheckSnapshots v2: %v", err)
	}
}

func TestSnapshotHostile(t *testing.T) {
	ok := rawSnapshot(0x10000, 1, "1", "a", 0, make([]byte, 24))
	cases := []struct {
		name  string
		b     []byte
		count uint32
		want  string
	}{
		{"too many", ok, 65537, "nb_snapshots 65537 exceeds the maximum of 65536"},
		{"empty", nil, 1, "entry 0 at table offset 0 truncated"},
		{"short fixed part", ok[:39], 1, "truncated"},
		{"second entry missing", ok, 2, "entry 1 at table offset 72 truncated"},
		{"extra too large", rawSnapshot(0x10000, 1, "1", "a", 0, make([]byte, 1025)), 1,
			"entry 0: extra data size 1025 exceeds the maximum of 1024"},
		{"name past end", ok[:SnapshotHeaderSize+24+1], 1, "truncated"},
		{"id length 65535", func() []byte {
			b := bytes.Clone(ok)
			be.PutUint16(b[12:], 65535)
			return b
		}(), 1, "truncated"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := ParseSnapshotTable(c.b, c.count, 0)
			if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrInvalid) {
				t.Errorf("got %v, want %q", err, c.want)
			}
		})
	}
	if _, err := SnapshotEntrySize(ok[:10]); err == nil {
		t.Error("SnapshotEntrySize accepted 10 bytes")
	}
	if _, err := SnapshotEntrySize(rawSnapshot(0, 0, "", "", 0, make([]byte, 2000))); err == nil {
		t.Error("SnapshotEntrySize accepted 2000 bytes of extra data")
	}

	// A table of 512 maximal entries is larger than 64 MiB.
	big := rawSnapshot(0x10000, 1, strings.Repeat("i", 65535), strings.Repeat("n", 65535), 0, make([]byte, 1024))
	table := bytes.Repeat(big, 520)
	_, _, err := ParseSnapshotTable(table, 520, 0)
	if err == nil || !strings.Contains(err.Error(), "table larger than the maximum of 67108864 bytes") {
		t.Errorf("huge table: %v", err)
	}
}

func TestCheckSnapshots(t *testing.T) {
	g := Geometry{ClusterBits: 16, RefcountOrder: 4, Version: 3}
	cases := []struct {
		name   string
		mutate func(s []Snapshot)
		want   string
	}{
		{"unaligned L1", func(s []Snapshot) { s[1].L1TableOffset = 0x80200 }, `snapshot "22" L1 table offset 0x80200 invalid (snapshot table offset: 0x60000, index: 0x1)`},
		{"L1 beyond 2^56", func(s []Snapshot) { s[0].L1TableOffset = 1 << 56 }, "L1 table offset 0x100000000000000 invalid"},
		{"L1 too large", func(s []Snapshot) { s[0].L1Size = 4<<20 + 1 }, "L1 table too large (4194305 entries)"},
		{"L1 at 0", func(s []Snapshot) { s[0].L1TableOffset = 0 }, "L1 table at offset 0 overlaps the header"},
		{"L1 beyond EOF", func(s []Snapshot) { s[1].L1Size = 1 << 20 }, "beyond end of file"},
		{"duplicate ID", func(s []Snapshot) { s[2].ID = "1" }, `snapshot ID "1" also used by entry 0`},
	}
	for _, c := range cases {
		s := sampleSnapshots()
		c.mutate(s)
		err := CheckSnapshots(s, g, 0x60000, 0xa0000)
		if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

func TestMarshalSnapshotErrors(t *testing.T) {
	s := sampleSnapshots()
	s[0].UnknownExtra = make([]byte, 1001)
	if _, err := MarshalSnapshotTable(s); err == nil || !strings.Contains(err.Error(), "extra data size 1025") {
		t.Errorf("extra: %v", err)
	}
	s = sampleSnapshots()
	s[1].Name = strings.Repeat("x", math.MaxUint16+1)
	if _, err := MarshalSnapshotTable(s); err == nil || !strings.Contains(err.Error(), "longer than 65535") {
		t.Errorf("name: %v", err)
	}
	if _, err := MarshalSnapshotTable(make([]Snapshot, MaxSnapshots+1)); err == nil {
		t.Error("65537 snapshots accepted")
	}
	if b, err := MarshalSnapshotTable(nil); err != nil || len(b) != 0 {
		t.Errorf("empty table: %d bytes, %v", len(b), err)
	}
}
