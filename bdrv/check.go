package bdrv

import (
	"golang.org/x/sys/unix"

	"ublkimg/coroutine"
)

// CheckFunc checks the consistency of an image of its format held in file
// and repairs it as fix allows (qemu-img check [-r leaks|all], QEMU's
// bdrv_co_check). It works on the protocol node, not on an open node of
// the format: opening a dirty or corrupt image would repair it before the
// check sees it. The lines qemu-img prints while checking go to ev as they
// are found.
//
// Errors: with a nil result, the image could not be checked at all (the
// caller words it "Could not open"); with a result, a *CheckFailedError
// when the check could not complete.
type CheckFunc func(co *coroutine.Co, file *Node, fix FixMode, ev CheckEvents) (*CheckResult, error)

// CheckResult is the outcome of a check: QEMU's BdrvCheckResult plus what
// qemu-img needs to print its summary (its ImageCheck).
type CheckResult struct {
	// Corruptions are errors left in the image, Leaks clusters that are
	// allocated but unused, CheckErrors problems that kept the check from
	// looking at part of the image (I/O errors, impossible repairs).
	Corruptions, Leaks, CheckErrors int
	// CorruptionsFixed and LeaksFixed count the repairs made.
	CorruptionsFixed, LeaksFixed int
	// ImageEndOffset is the end of the last cluster in use or referenced.
	ImageEndOffset int64
	// Allocation statistics of the image (QEMU's BlockFragInfo): clusters
	// of the virtual disk, allocated ones, allocated ones not contiguous
	// with their predecessor in the file, compressed ones.
	TotalClusters, AllocatedClusters, FragmentedClusters, CompressedClusters int64

	// Repaired is set when the check repaired something and then checked the
	// image again without repairing, as qemu-img check -r does ("Double
	// checking the fixed image now..."). The counts above are then those of
	// the second pass, except CorruptionsFixed and LeaksFixed.
	Repaired bool
}

// ExitCode returns qemu-img check's exit status for the result: 1 when the
// check had internal errors, 2 when corruptions remain, 3 when only leaks
// remain, 0 when the image is clean. (63, for formats that cannot be
// checked, and 1 for a failed check, are the caller's.)
func (r *CheckResult) ExitCode() int {
	switch {
	case r.CheckErrors != 0:
		return 1
	case r.Corruptions != 0:
		return 2
	case r.Leaks != 0:
		return 3
	}
	return 0
}

// CheckEvents receives what a check finds while it works. A zero
// CheckEvents drops it all.
type CheckEvents struct {
	// Message receives each line qemu-img prints to stderr while checking,
	// such as "Leaked cluster 5 refcount=1 reference=0", in order, as it
	// is found. Lines QEMU prints through error_report lack its
	// "qemu-img: " prefix; a CLI adds its own program name.
	Message func(line string)
	// Recheck is called when a repairing pass fixed something, before the
	// image is checked again; first holds that pass's counts (qemu-img
	// prints its repair report then).
	Recheck func(first *CheckResult)
}

// FixMode selects what a check repairs (QEMU's BdrvCheckMode).
type FixMode int

// Repair modes; 0 only checks.
const (
	// FixLeaks frees leaked clusters (check -r leaks).
	FixLeaks FixMode = 1 << iota
	// FixErrors repairs corruptions.
	FixErrors
	// FixAll is check -r all.
	FixAll = FixLeaks | FixErrors
)

// CheckFailedError reports that a check could not complete (QEMU's
// bdrv_check returning -errno). qemu-img prints the messages gathered so far
// and then "qemu-img: Check failed: <strerror>", prints no summary, and exits
// with status 1; Error returns that line without the program name.
type CheckFailedError struct {
	Errno unix.Errno
}

// Error returns qemu-img's line, with the C library's wording of the errno.
func (e *CheckFailedError) Error() string { return "Check failed: " + capitalizeFirst(e.Errno.Error()) }

// Unwrap returns the errno.
func (e *CheckFailedError) Unwrap() error { return e.Errno }
