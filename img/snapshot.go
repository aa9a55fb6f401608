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
	// ForceShare (-U) opens the image and its backing chain even if
	// another process writes them; only -l, which opens read-only, can.
	ForceShare bool
}

// snapshotList lists the snapshots of an open node (its driver's, or those
// of the node snapshot calls fall back to, bdrv.SnapshotFallback); nodes
// that take none have none, as QEMU's bdrv_query_snapshot_info_list takes
// ENOTSUP.
func snapshotList(co *coroutine.Co, n *bdrv.Node) ([]bdrv.SnapshotInfo, error) {
	s := bdrv.SnapshotFallback(n)
	if s == nil {
		return nil, nil
	}
	l, err := s.ListSnapshots(co)
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	return l, err
}

// snapshotHeader is bdrv_snapshot_dump's title line.
var snapshotHeader = fmt.Sprintf("%-10s%-17s%8s%20s%13s%11s", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")

// writeSnapshotLine prints one snapshot as bdrv_snapshot_dump does.
func writeSnapshotLine(b *strings.Builder, s bdrv.SnapshotInfo) {
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
func writeSnapshotList(b *strings.Builder, snaps []bdrv.SnapshotInfo) {
	b.WriteString("Snapshot list:\n" + snapshotHeader + "\n")
	for _, s := range snaps {
		writeSnapshotLine(b, s)
	}
}

// snapshotDicts is the QAPI "snapshots" member of ImageInfo.
func snapshotDicts(snaps []bdrv.SnapshotInfo) []any {
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
	// qemu-img snapshot opens the backing chain, for every action: an
	// image whose backing file is missing, or written by another process,
	// is refused untouched.
	s := openSpec{filename: opts.Filename, format: opts.Format, readOnly: opts.Op == SnapshotListOp}
	if opts.ForceShare {
		s.options = bdrv.Options{bdrv.OptForceShare: "on"}
	}
	node, err := openImage(co, s)
	if err != nil {
		return err
	}
	q := bdrv.SnapshotFallback(node)
	name := opts.Name
	switch opts.Op {
	case SnapshotListOp:
		var snaps []bdrv.SnapshotInfo
		snaps, err = snapshotList(co, node)
		if err == nil && len(snaps) > 0 {
			var b strings.Builder
			writeSnapshotList(&b, snaps)
			_, err = io.WriteString(out, b.String())
		}
	case SnapshotCreateOp:
		err = unix.ENOTSUP
		if q != nil {
			err = q.CreateSnapshot(co, name)
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
			err = q.ApplySnapshot(co, name)
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
		var found *bdrv.SnapshotInfo
		snaps, lerr := snapshotList(co, node)
		for _, s := range snaps {
			if s.Name == name {
				found = &s
				break
			}
		}
		if lerr != nil {
			err = fmt.Errorf("Could not delete snapshot '%s': %s", name, snapErrText(lerr))
		} else if found == nil {
			err = fmt.Errorf("Could not delete snapshot '%s': snapshot not found", name)
		} else if err = q.DeleteSnapshot(co, found.Name); err != nil {
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

// snapErrText is an error's message, or the C library's text for a bare
// errno.
func snapErrText(err error) string {
	var errno unix.Errno
	if errors.As(err, &errno) && err.Error() == errno.Error() {
		return Strerror(err)
	}
	return err.Error()
}
