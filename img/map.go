package img

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// MapOptions are qemu-img map's arguments.
type MapOptions struct {
	Filename string
	Format   string // -f; "" probes
	JSON     bool   // --output json
	// StartOffset (--start-offset) is where the map begins; MaxLength
	// (--max-length), if not negative, limits how far it goes.
	StartOffset, MaxLength int64
	ForceShare             bool
}

// mapEntry is one extent of the map (QEMU's MapEntry): a run of bytes
// with the same status, answered by the layer at depth Depth of the
// backing chain.
type mapEntry struct {
	start, length int64
	data, zero    bool
	present       bool // allocated in some layer (BDRV_BLOCK_ALLOCATED)
	depth         int
	hasOffset     bool
	offset        int64
	filename      string // the file holding the data, if hasOffset
}

// mergeable reports whether next continues e (entry_mergeable).
func (e *mapEntry) mergeable(next *mapEntry) bool {
	if e.length == 0 {
		return false
	}
	if e.zero != next.zero || e.data != next.data || e.depth != next.depth ||
		e.present != next.present || e.hasOffset != next.hasOffset || e.filename != next.filename {
		return false
	}
	return !e.hasOffset || e.offset+e.length == next.offset
}

// errMapHuman is qemu-img's refusal to print extents without a host
// offset in the human format.
var errMapHuman = errors.New("File contains external, encrypted or compressed clusters.")

// dump prints e (dump_map_entry). next is the entry that follows, nil for
// the last one; the human format folds the distinction between zero,
// unallocated and zero-data into next, which lets more of them merge.
func (e *mapEntry) dump(w io.Writer, json bool, next *mapEntry) error {
	if !json {
		if e.data && !e.hasOffset {
			return errMapHuman
		}
		if e.data && !e.zero {
			var off int64
			if e.hasOffset {
				off = e.offset
			}
			fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", cHex(e.start), cHex(e.length), cHex(off), e.filename)
		}
		if next != nil && (!next.data || next.zero) {
			next.data, next.zero = false, true
		}
		return nil
	}
	fmt.Fprintf(w, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
		e.start, e.length, e.depth, e.present, e.zero, e.data)
	if e.hasOffset {
		fmt.Fprintf(w, `, "offset": %d`, e.offset)
	}
	io.WriteString(w, "}")
	if next != nil {
		io.WriteString(w, ",\n")
	}
	return nil
}

// cHex formats v as C's "%#x": "0x" and lower-case hex digits, except
// that 0 is plain "0".
func cHex(v int64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}

// Map prints the allocation map of an image and its backing chain as
// qemu-img map does: the human table of the extents that hold data
// ("Offset Length Mapped to File"), or with opts.JSON one object per
// extent with its status (start, length, depth, present, zero, data and
// the host offset where there is one). Adjacent extents with the same
// status, answered by the same layer and contiguous in the same file, are
// merged. Output goes to w as it is produced; on an error, what was
// printed stays printed, as with qemu-img.
func Map(co *coroutine.Co, opts MapOptions, out io.Writer) error {
	w := bufio.NewWriter(out)
	defer w.Flush()
	s := openSpec{filename: opts.Filename, format: opts.Format, readOnly: true}
	if opts.ForceShare {
		s.options = bdrv.Options{bdrv.OptForceShare: "on"}
	}
	n, err := openImage(co, s)
	if err != nil {
		return err
	}
	defer n.Close(co)
	names := chainNames(n, n.Filename) // the file, also for --image-opts

	if opts.JSON {
		io.WriteString(w, "[")
	} else {
		fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	length := qemuLength(n)
	if opts.MaxLength >= 0 {
		length = min(opts.StartOffset+opts.MaxLength, length)
	}
	curr := mapEntry{start: opts.StartOffset}
	for curr.start+curr.length < length {
		off := curr.start + curr.length
		// At most 1 GiB per query keeps the request in range.
		next, err := mapStatus(co, n, off, min(length-off, 1<<30), names)
		if err != nil {
			return fmt.Errorf("Could not read file metadata: %s", Strerror(err))
		}
		if curr.mergeable(&next) {
			curr.length += next.length
			continue
		}
		if curr.length > 0 {
			if err := curr.dump(w, opts.JSON, &next); err != nil {
				return err
			}
		}
		curr = next
	}
	if err := curr.dump(w, opts.JSON, nil); err != nil {
		return err
	}
	if opts.JSON {
		io.WriteString(w, "]\n")
	}
	return nil
}

// mapStatus is qemu-img's get_block_status: the status of [off,
// off+bytes) in the first layer of the chain that says anything about it
// (data or zero), and that layer's depth. Each layer answers as
// bdrv_block_status does (bdrv.Node.BlockStatus), including the zeros past
// the end of a short backing file and, at the bottom of the chain, the
// zeros of unallocated ranges.
func mapStatus(co *coroutine.Co, n *bdrv.Node, off, bytes int64, names map[*bdrv.Node]string) (mapEntry, error) {
	var st bdrv.Status
	depth := 0
	for p := n; ; p = p.Backing {
		var err error
		st, err = p.BlockStatus(co, true, off, bytes)
		if err != nil {
			return mapEntry{}, err
		}
		if st.Pnum <= 0 {
			// A layer that ends inside its last sector without
			// answering for the rest of it (not a raw file): zeros.
			st = bdrv.Status{Flags: bdrv.StatusZero | bdrv.StatusAllocated, Pnum: bytes}
			break
		}
		bytes = st.Pnum
		if st.Flags&(bdrv.StatusData|bdrv.StatusZero) != 0 {
			break
		}
		if p.Backing == nil {
			st.Flags = 0
			break
		}
		depth++
	}
	e := mapEntry{
		start:   off,
		length:  st.Pnum,
		data:    st.Flags&bdrv.StatusData != 0,
		zero:    st.Flags&bdrv.StatusZero != 0,
		present: st.Flags&bdrv.StatusAllocated != 0,
		depth:   depth,
	}
	if st.Flags&bdrv.StatusOffsetValid != 0 {
		e.hasOffset, e.offset = true, st.Map
		if st.File != nil {
			e.filename = names[st.File]
			if name, ok := optionsName(st.File); ok {
				e.filename = name
			} else if e.filename == "" {
				e.filename = st.File.Filename
			}
		}
	}
	return e, nil
}

// chainNames names the files of n's backing chain as QEMU does: the top
// image by the name given, each backing file by the name its overlay
// records, taken relative to the overlay's directory (path_combine, without
// cleaning the path). Each format node's protocol child gets its format
// node's name.
func chainNames(n *bdrv.Node, filename string) map[*bdrv.Node]string {
	names := map[*bdrv.Node]string{}
	name := filename
	for p := n; p != nil; p = p.Backing {
		names[p] = name
		if p.File != nil {
			names[p.File] = name
		}
		if p.BackingFile == "" {
			break
		}
		if bdrv.HasProtocol(p.BackingFile) {
			name = p.BackingFile
		} else {
			name = pathCombine(name, p.BackingFile)
		}
	}
	return names
}
