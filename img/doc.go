// Package img implements the image operations of qemu-img for ublkimg:
// create, info, check, map, convert, compare, resize, commit, rebase,
// snapshot, amend, measure, dd, bench and bitmap. Each operation is generic
// over the formats registered with bdrv and reproduces qemu-img 7.2's
// semantics, output text and error wording, so that scripts written against
// qemu-img keep working.
//
// The package names no format and imports no driver (the command line
// registers them): what is format-specific comes through bdrv, from the
// optional capabilities of bdrv/driver.go found on Node.Driver() (info,
// snapshots, amend, bitmaps, commit's make-empty, rebase's backing file
// change), the format-level operations of bdrv.Format (Check, Measure,
// StrongOptions, the option specs) and bdrv's error sentinels. A new format
// gets a verb by implementing its capability.
//
// Operations run on the coroutine engine: they either take a *coroutine.Co
// or call coroutine.Run themselves. They never print on their own; text goes
// to the io.Writer the caller passes in, and errors come back as values
// whose messages are qemu-img's (without the "qemu-img: " prefix, which the
// command line adds as "ublkimg: ").
package img
