// Package jobs runs the block jobs that work on an image while a device
// serves it, after QEMU's block jobs: a live external snapshot (an overlay
// created over the image, the device switched to it), an active commit
// (the overlay merged into its base while written, then the device
// switched to the base: block/mirror.c's active mode) and a backup (a
// point-in-time copy while the image is written, with copy-before-write,
// full or incremental from a persistent dirty bitmap: block/backup.c and
// block/copy-before-write.c), and the bitmap operations of an attached
// image.
//
// A job sees the device through [Device] (ublk.Device implements it):
// the node it serves, and a pause during which no request runs, so that
// the job can switch that node. Jobs that must see the guest's writes
// insert a filter node above the image while they run (bdrv.NewFilter):
// the commit's marks what the guest dirtied, the backup's copies old data
// to the target before the guest overwrites it. Nothing of either is on
// the requests' path when no job runs.
//
// Every job runs its I/O as coroutines on a loop of its own (one thread),
// next to the device's queues; the filters run on the queues' loops.
// Each step that can fail is ordered so that the images stay consistent
// whatever fails, or if the process dies: see each job.
package jobs
