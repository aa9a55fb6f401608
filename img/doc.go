// Package img implements the image operations of qemu-img for ublkimg:
// create, info, check, map, convert, compare, resize, commit, rebase,
// snapshot, amend, measure, dd, bench and bitmap. Each operation is generic
// over the formats registered with bdrv (raw, qcow2) and reproduces qemu-img
// 7.2's semantics, output text and error wording, so that scripts written
// against qemu-img keep working.
//
// Operations run on the coroutine engine: they either take a *coroutine.Co
// or call coroutine.Run themselves. They never print on their own; text goes
// to the io.Writer the caller passes in, and errors come back as values
// whose messages are qemu-img's (without the "qemu-img: " prefix, which the
// command line adds as "ublkimg: ").
package img
