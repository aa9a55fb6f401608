package img

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/qcow2"
)

// SnapshotOp is the action of qemu-img snapshot.
type SnapshotOp byte

// Snapshot actions: -l, -c, -a, -d.
const (
	SnapshotListOp   SnapshotOp = 'l'
	SnapshotCreateOp SnapshotOp = 'c'
	SnapshotApplyOp  SnapshotOp = 'a'
	SnapshotDeleteOp SnapshotOp = 'd'
)

// SnapshotOptions are qemu-img snapshot's arguments.
type SnapshotOptions struct {
	Filename string
	Format   string // -f; "" probes
	Op       SnapshotOp
	Name     string // the snapshot for -c, -a, -d
}

// SnapshotInfo is one internal snapshot as qemu-img lists it (QEMU's QAPI
// SnapshotInfo).
type SnapshotInfo = bdrv.SnapshotInfo

// snapshotInfos lists the internal snapshots of an open node; formats
// without snapshots have none.
func snapshotInfos(co *coroutine.Co, n *bdrv.Node) []SnapshotInfo {
	q, ok := n.Driver().(*qcow2.Image)
	if !ok {
		return fallbackSnapshots(co, n)
	}
	var out []SnapshotInfo
	for _, s := range q.SnapshotList(co) {
		out = append(out, SnapshotInfo{ID: s.ID, Name: s.Name, VMStateSize: s.VMStateSize,
			DateSec: int64(s.DateSec), DateNsec: int64(s.DateNsec), VMClockNsec: s.VMClockNsec, Icount: s.Icount})
	}
	return out
}

// fallbackSnapshots lists the snapshots of the node that QEMU's snapshot
// calls fall back to (the rbd image under a raw format); none when there is
// none or the list fails, as bdrv_query_image_info ignores that.
func fallbackSnapshots(co *coroutine.Co, n *bdrv.Node) []SnapshotInfo {
	s := bdrv.SnapshotFallback(n)
	if s == nil {
		return nil
	}
	list, err := s.ListSnapshots(co)
	if err != nil {
		return nil
	}
	return list
}

// snapshotHeader is bdrv_snapshot_dump's title line.
var snapshotHeader = fmt.Sprintf("%-10s%-17s%8s%20s%13s%11s", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")

// writeSnapshotLine prints one snapshot as bdrv_snapshot_dump does.
func writeSnapshotLine(b *strings.Builder, s SnapshotInfo) {
	date := time.Unix(s.DateSec, 0).Format("2006-01-02 15:04:05")
	secs := s.VMClockNsec / 1e9
	clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (s.VMClockNsec/1e6)%1000)
	icount := ""
	if s.Icount != -1 {
		icount = strconv.FormatInt(s.Icount, 10)
	}
	fmt.Fprintf(b, "%-9s %-16s %8s%20s%13s%11s\n", s.ID, s.Name, SizeToStr(s.VMStateSize), date, clock, icount)
}

// writeSnapshotList prints "Snapshot list:" and the table, as qemu-img
// snapshot -l and qemu-img info do.
func writeSnapshotList(b *strings.Builder, snaps []SnapshotInfo) {
	b.WriteString("Snapshot list:\n" + snapshotHeader + "\n")
	for _, s := range snaps {
		writeSnapshotLine(b, s)
	}
}

// snapshotDicts is the QAPI "snapshots" member of ImageInfo.
func snapshotDicts(snaps []SnapshotInfo) []any {
	l := make([]any, 0, len(snaps))
	for _, s := range snaps {
		d := NewDict()
		d.Set("id", s.ID)
		d.Set("name", s.Name)
		d.Set("vm-state-size", int64(s.VMStateSize))
		d.Set("date-sec", s.DateSec)
		d.Set("date-nsec", s.DateNsec)
		d.Set("vm-clock-sec", int64(s.VMClockNsec/1e9))
		d.Set("vm-clock-nsec", int64(s.VMClockNsec%1e9))
		if s.Icount != -1 {
			d.Set("icount", s.Icount)
		}
		l = append(l, d)
	}
	return l
}

// Snapshot lists, creates, applies or deletes internal snapshots as
// qemu-img snapshot does; the list goes to out (which -q does not silence,
// as in qemu-img). The errors are qemu-img's.
func Snapshot(co *coroutine.Co, opts SnapshotOptions, out io.Writer) error {
	node, err := openImage(co, openSpec{filename: opts.Filename, format: opts.Format,
		readOnly: opts.Op == SnapshotListOp, noBacking: true})
	if err != nil {
		return err
	}
	q, _ := node.Driver().(*qcow2.Image)
	var fallback bdrv.Snapshotter
	if q == nil {
		fallback = bdrv.SnapshotFallback(node)
	}
	name := opts.Name
	switch opts.Op {
	case SnapshotListOp:
		snaps := snapshotInfos(co, node)
		if len(snaps) > 0 {
			var b strings.Builder
			writeSnapshotList(&b, snaps)
			_, err = io.WriteString(out, b.String())
		}
	case SnapshotCreateOp:
		err = unix.ENOTSUP
		if q != nil {
			err = q.SnapshotCreate(co, name)
		} else if fallback != nil {
			err = fallback.CreateSnapshot(co, name)
		}
		if err != nil {
			var errno unix.Errno
			if errors.As(err, &errno) {
				err = fmt.Errorf("Could not create snapshot '%s': %d (%s)", name, -int(errno), Strerror(errno))
			} else {
				err = fmt.Errorf("Could not create snapshot '%s': %s", name, snapErrText(err))
			}
		}
	case SnapshotApplyOp:
		err = unix.ENOTSUP
		if q != nil {
			err = q.SnapshotApply(co, name)
		} else if fallback != nil {
			err = fallback.ApplySnapshot(co, name)
		}
		if err != nil {
			var errno unix.Errno
			if errors.As(err, &errno) {
				err = fmt.Errorf("Could not apply snapshot '%s': Failed to load snapshot: %s", name, Strerror(errno))
			} else {
				err = fmt.Errorf("Could not apply snapshot '%s': %s", name, snapErrText(err))
			}
		}
	case SnapshotDeleteOp:
		// qemu-img looks the snapshot up by name only (bdrv_snapshot_find).
		var found *qcow2.Snapshot
		if q != nil {
			for _, s := range q.SnapshotList(co) {
				if s.Name == name {
					found = &s
					break
				}
			}
		}
		if fallback != nil {
			err = deleteFallbackSnapshot(co, fallback, name)
		} else if found == nil {
			err = fmt.Errorf("Could not delete snapshot '%s': snapshot not found", name)
		} else if err = q.SnapshotDelete(co, found.ID, found.Name); err != nil {
			err = fmt.Errorf("Could not delete snapshot '%s': %s", name, snapErrText(err))
		}
	default:
		err = fmt.Errorf("internal error: snapshot operation %q", opts.Op)
	}
	if cerr := node.Close(co); err == nil && cerr != nil {
		err = errors.New(snapErrText(cerr))
	}
	return err
}

// deleteFallbackSnapshot deletes the snapshot name through the fallback
// driver, looked up by name first as qemu-img does.
func deleteFallbackSnapshot(co *coroutine.Co, s bdrv.Snapshotter, name string) error {
	list, err := s.ListSnapshots(co)
	if err != nil {
		return fmt.Errorf("Could not delete snapshot '%s': %s", name, snapErrText(err))
	}
	for _, i := range list {
		if i.Name == name {
			if err := s.DeleteSnapshot(co, name); err != nil {
				return fmt.Errorf("Could not delete snapshot '%s': %s", name, snapErrText(err))
			}
			return nil
		}
	}
	return fmt.Errorf("Could not delete snapshot '%s': snapshot not found", name)
}

// snapErrText is an error's message, or the C library's text for a bare
// errno.
func snapErrText(err error) string {
	var errno unix.Errno
	if errors.As(err, &errno) && err.Error() == errno.Error() {
		return Strerror(err)
	}
	return err.Error()
}
