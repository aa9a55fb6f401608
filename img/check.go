package img

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Exit statuses of qemu-img check.
const (
	CheckClean       = 0  // no problem (left) in the image
	CheckFailed      = 1  // the check could not be completed, or open failed
	CheckCorrupted   = 2  // corruptions remain
	CheckLeaks       = 3  // only leaked clusters remain
	CheckUnsupported = 63 // the format has no consistency check
)

// Repair is check's -r mode.
type Repair int

// Repair modes.
const (
	RepairNone  Repair = iota
	RepairLeaks        // -r leaks: free leaked clusters
	RepairAll          // -r all: also fix corruptions
)

// ParseRepair parses -r's argument with qemu-img's message.
func ParseRepair(s string) (Repair, error) {
	switch s {
	case "leaks":
		return RepairLeaks, nil
	case "all":
		return RepairAll, nil
	}
	return 0, fmt.Errorf("Unknown option value for -r (expecting 'leaks' or 'all'): %s", s)
}

// CheckOptions are qemu-img check's arguments.
type CheckOptions struct {
	Filename string
	Format   string // -f; "" probes
	Repair   Repair
	JSON     bool // --output json
	// Quiet (-q) silences what qemu-img prints on stdout; the checker's
	// own lines ("Leaked cluster 5 refcount=1 reference=0") still go to
	// stderr, as with qemu-img.
	Quiet      bool
	Cache      bdrv.CacheMode // -T
	ForceShare bool
}

// CheckError is a failure that ends check with Code: CheckFailed for an
// image that could not be opened or checked, CheckUnsupported for a format
// without a check.
type CheckError struct {
	Code int
	Err  error
}

func (e *CheckError) Error() string { return e.Err.Error() }

func (e *CheckError) Unwrap() error { return e.Err }

// errNoCheck is qemu-img's message for formats without a check (bdrv_check
// returning -ENOTSUP).
var errNoCheck = errors.New("This image format does not support checks")

// Check checks an image's consistency, repairing it as opts.Repair allows,
// as qemu-img check does, and returns the exit status: CheckClean,
// CheckCorrupted or CheckLeaks, or with a *CheckError, CheckFailed or
// CheckUnsupported. What qemu-img prints on stdout (the report, the
// summary, or the JSON document) goes to stdout, which may be nil; the
// lines the checker prints while it works go to stderr.
//
// Formats check through their bdrv.Format's Check (qcow2 has one). An
// image is checked on its file alone (the checker reads and repairs the
// metadata itself, so a dirty or corrupt image is not repaired by opening
// it first), after the image and its backing chain were opened read-only
// once, so that an image qemu-img cannot open fails here too.
func Check(co *coroutine.Co, opts CheckOptions, stdout, stderr io.Writer) (int, error) {
	if stdout == nil || opts.Quiet {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	fail := func(err error) (int, error) { return CheckFailed, &CheckError{CheckFailed, err} }
	// An --image-opts name: check the file it names, opened with its
	// options (the key of an encrypted image).
	// Opens go through the name as given (marked); the file itself is
	// named.filename; messages and JSON say display, as qemu-img does.
	named := openSpec{filename: opts.Filename, format: opts.Format}
	display, err := resolveImageOpts(&named)
	if err != nil {
		return fail(openError(display, err))
	}
	marked := opts.Filename
	opts.Filename, opts.Format = named.filename, named.format
	if opts.Format != "" {
		if _, err := bdrv.LookupFormat(opts.Format); err != nil {
			return fail(openError(display, errors.New("Unknown driver '"+opts.Format+"'")))
		}
	}
	var fopts bdrv.Options
	if opts.ForceShare {
		fopts = bdrv.Options{bdrv.OptForceShare: "on"}
	}

	if opts.Repair != RepairNone {
		// qemu-img opens the image read-write from the start: an image
		// another process uses fails with its write lock's message,
		// before the read-only open below could fail on a shared lock.
		// The repair itself opens the file again, under the same lock.
		file, err := bdrv.Open(co, bdrv.Spec{Filename: opts.Filename, Format: "file", Options: fopts, Cache: opts.Cache})
		if errors.Is(err, bdrv.ErrLocked) {
			return fail(openError(display, err))
		}
		if err == nil {
			file.Close(co)
		}
	}

	// Open the image as qemu-img does before checking, with its backing
	// chain. A checkable image is opened read-only even for a repair: a
	// read-write open would repair a dirty image before the check sees it.
	// Options given to the backing file (--image-opts backing.*) need it
	// opened with the image.
	format := opts.Format
	withBacking := named.options.BackingOverridden()
	n, err := openImage(co, openSpec{filename: marked, format: format, cache: opts.Cache,
		readOnly: true, noBacking: !withBacking, options: fopts})
	if err != nil {
		var oe *OpenError
		var ke *bdrv.KeyError
		var be *bdrv.OptionError
		if !errors.As(err, &oe) || (format != "" && checker(format) == nil) || errors.As(err, &ke) || errors.As(err, &be) || withBacking {
			return fail(err)
		}
		// The driver may refuse images that its checker handles;
		// let the checker tell.
		if format == "" {
			if format, err = probeFile(co, opts.Filename, fopts); err != nil {
				return fail(err)
			}
		}
	} else {
		format = n.Format.Name
		backing, backingFormat := n.BackingFile, n.BackingFormat
		n.Close(co)
		if backing != "" && !withBacking {
			b, err := openImage(co, openSpec{filename: bdrv.ResolveBacking(opts.Filename, backing),
				format: backingFormat, cache: opts.Cache, readOnly: true, options: fopts})
			if err != nil {
				return fail(openError(display, newBackingOpenError(bdrv.ResolveBacking(opts.Filename, backing), 0, err)))
			}
			b.Close(co)
		}
	}
	check := checker(format)
	if check == nil {
		if opts.Repair != RepairNone {
			// qemu-img opens the image read-write to repair it.
			n, err := openImage(co, openSpec{filename: marked, format: format, cache: opts.Cache,
				noBacking: true, options: fopts})
			if err != nil {
				return fail(err)
			}
			n.Close(co)
		}
		return CheckUnsupported, &CheckError{CheckUnsupported, errNoCheck}
	}

	// The checker works on the file, opened with the options the image
	// gives it (file.locking=off; read-only=on, which a repair refuses).
	file, err := bdrv.Open(co, bdrv.Spec{Filename: opts.Filename, Format: "file", Options: fopts.Merge(named.options.FileOptions()),
		Cache: opts.Cache, ReadOnly: opts.Repair == RepairNone})
	if err == nil && file.ReadOnly && opts.Repair != RepairNone {
		file.Close(co)
		err = bdrv.ErrReadOnlyNode
	}
	if err != nil {
		return fail(openError(display, err))
	}
	defer file.Close(co)
	fix := bdrv.FixMode(0)
	switch opts.Repair {
	case RepairLeaks:
		fix = bdrv.FixLeaks
	case RepairAll:
		fix = bdrv.FixAll
	}
	// The checker's lines go out as they are found (an image can make
	// millions of them), buffered, and flushed before anything goes to
	// stdout so that a terminal shows both in qemu-img's order.
	errw := bufio.NewWriter(stderr)
	r, err := check(co, file, fix, bdrv.CheckEvents{
		Message: func(line string) {
			errw.WriteString(line)
			errw.WriteByte('\n')
		},
		Recheck: func(first *bdrv.CheckResult) {
			errw.Flush()
			if !opts.JSON {
				writeCheckRepaired(stdout, first)
			}
		},
	})
	errw.Flush()
	if r == nil {
		if err == nil {
			err = errors.New("check returned no result")
		}
		var cf *bdrv.CheckFailedError
		if errors.As(err, &cf) {
			return fail(err)
		}
		return fail(openError(display, err))
	}
	if err != nil {
		return fail(err)
	}
	if opts.JSON {
		_ = WriteJSONPretty(stdout, checkDict(r, display, format))
		io.WriteString(stdout, "\n")
	} else {
		writeCheckHuman(stdout, r)
	}
	if r.CheckErrors != 0 {
		return fail(errors.New("Check failed"))
	}
	return r.ExitCode(), nil
}

// writeCheckRepaired writes the report qemu-img check prints between the
// repairing pass and the second one.
func writeCheckRepaired(w io.Writer, r *bdrv.CheckResult) {
	fmt.Fprintf(w, "The following inconsistencies were found and repaired:\n\n"+
		"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
		r.LeaksFixed, r.CorruptionsFixed)
}

// writeCheckHuman writes the summary qemu-img check prints after checking
// (its dump_human_image_check).
func writeCheckHuman(w io.Writer, r *bdrv.CheckResult) {
	if r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0 {
		io.WriteString(w, "No errors were found on the image.\n")
	} else {
		if r.Corruptions != 0 {
			fmt.Fprintf(w, "\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
		}
		if r.Leaks != 0 {
			fmt.Fprintf(w, "\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", r.Leaks)
		}
		if r.CheckErrors != 0 {
			fmt.Fprintf(w, "\n%d internal errors have occurred during the check.\n", r.CheckErrors)
		}
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		fmt.Fprintf(w, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters),
			float64(r.FragmentedClusters)*100/float64(r.AllocatedClusters),
			float64(r.CompressedClusters)*100/float64(r.AllocatedClusters))
	}
	if r.ImageEndOffset != 0 {
		fmt.Fprintf(w, "Image end offset: %d\n", r.ImageEndOffset)
	}
}

// checkDict returns qemu-img check --output=json's document for the result
// of checking an image of format: QAPI ImageCheck, its members set in the schema's order (which,
// through Dict's hash order, gives qemu-img's order), the optional ones
// only when not zero, as collect_image_check sets them.
func checkDict(r *bdrv.CheckResult, filename, format string) *Dict {
	d := NewDict()
	d.Set("filename", filename)
	d.Set("format", format)
	d.Set("check-errors", r.CheckErrors)
	for _, m := range []struct {
		key string
		v   int64
	}{
		{"image-end-offset", r.ImageEndOffset},
		{"corruptions", int64(r.Corruptions)},
		{"leaks", int64(r.Leaks)},
		{"corruptions-fixed", int64(r.CorruptionsFixed)},
		{"leaks-fixed", int64(r.LeaksFixed)},
		{"total-clusters", r.TotalClusters},
		{"allocated-clusters", r.AllocatedClusters},
		{"fragmented-clusters", r.FragmentedClusters},
		{"compressed-clusters", r.CompressedClusters},
	} {
		if m.v != 0 {
			d.Set(m.key, m.v)
		}
	}
	return d
}

// checker is the check of the registered format name, nil if it has none.
func checker(name string) bdrv.CheckFunc {
	f, err := bdrv.LookupFormat(name)
	if err != nil {
		return nil
	}
	return f.Check
}

// probeFile finds the format of an image the format driver would not open,
// from its first bytes, as bdrv.Open would have.
func probeFile(co *coroutine.Co, filename string, opts bdrv.Options) (string, error) {
	file, err := bdrv.Open(co, bdrv.Spec{Filename: filename, Format: "file", Options: opts, ReadOnly: true})
	if err != nil {
		return "", openError(filename, err)
	}
	defer file.Close(co)
	head := bdrv.AlignedBuffer(int(alignUp(min(2048, file.Length()), 4096)), 4096)
	if len(head) > 0 {
		if err := file.Preadv(co, 0, bdrv.IOVec{head}, 0); err != nil {
			return "", openError(filename, err)
		}
	}
	head = head[:min(2048, file.Length())]
	best, score := "", 0
	for _, name := range bdrv.FormatNames() {
		f, err := bdrv.LookupFormat(name)
		if err != nil || f.Probe == nil {
			continue
		}
		if s := f.Probe(head, filename); s > score {
			best, score = name, s
		}
	}
	if best == "" {
		return "", openError(filename, errors.New("Could not determine the image format"))
	}
	return best, nil
}
