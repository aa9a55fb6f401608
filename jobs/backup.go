package jobs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// backupGranularity is the smallest unit a backup copies (QEMU's backup
// job: the target's cluster size, at least 64 KiB); a bitmap of a smaller
// granularity is read in units of this.
const backupGranularity = 64 << 10

// BackupOptions say what Backup writes.
type BackupOptions struct {
	// Target is the backup image to create; it must not exist.
	Target string
	// Format is the target's format: qcow2 (the default) or raw.
	Format string
	// Bitmap names a persistent dirty bitmap of the image: it is cleared
	// at the backup's point in time, so that it then records what
	// changes after it; with Incremental, only what it marks is copied.
	Bitmap string
	// Incremental names the previous backup of the chain: the target is
	// a qcow2 image backed by it that receives only what Bitmap marks.
	Incremental string
	// Open is how the target is opened (cache mode), and Open.Image the
	// options the device's image was opened with, where its secret is.
	Open OpenOptions
	// Plaintext lets the backup of an encrypted image be written in
	// clear. Without it, such a backup is a qcow2 image encrypted with
	// LUKS under the image's secret (backupIterTime), and a raw target is
	// refused: nothing the guest wrote encrypted reaches a backup in
	// clear unless the user asked for it. On an image in clear it
	// changes nothing (BackupResult.Plaintext stays false, so that the
	// caller can tell the user).
	Plaintext bool
}

// BackupResult says how to open the backup written.
type BackupResult struct {
	// Secret is the ID of the secret the target is encrypted with (the
	// secret of the device's image), "" for a target in clear.
	Secret string
	// Plaintext: the device's image is encrypted and the target is not
	// (BackupOptions.Plaintext).
	Plaintext bool
	// Options are the options to open the target with: its secret and
	// those of the encrypted images of its backing chain, as "backing."
	// ones (backing.encrypt.key-secret=ID, backing.backing....); nil for
	// none.
	Options bdrv.Options
}

// backupIterTime is the encrypt.iter-time of an encrypted backup, ""
// for QEMU's default: 2 s of PBKDF2 at the creation and again at every
// open. The backup is the copy of the data that leaves the machine, the
// one an attacker is the likeliest to get: its key slot keeps the full
// default cost against guessing the passphrase. The job pays it before
// the point in time (creation, then the open), never while the device
// pauses; each image of an incremental chain costs it again when the
// chain is opened. The tests shorten it.
var backupIterTime = ""

// Backup writes a copy of the device's image as it is at the call's
// point in time (QEMU's drive-backup with sync=full, or sync=incremental
// with a bitmap) while the guest goes on writing: the point in time is a
// pause of the device, during which a copy-before-write filter is inserted
// above the image (and the bitmap taken and cleared); from then on every
// guest write to a granule not copied yet first copies that granule's old
// data to the target, while the job copies the others. A full backup
// skips what reads as zeros (the new target reads as zeros there); an
// incremental one writes zeros where the bitmap marks zeros.
//
// The target is created first; if the job fails (or is cancelled) the
// filter is taken out, the target removed and the bitmap's taken content
// merged back into it, so that the next backup still copies what this one
// did not. A copy the filter cannot make fails the backup, never the
// guest's write (QEMU's on-cbw-error=break-snapshot). The image itself is
// never written by the job.
//
// The backup of an encrypted image (qcow2 with encrypt.key-secret, luks
// with key-secret, or any image of its backing chain encrypted) is
// encrypted with LUKS under the image's secret, unless o.Plaintext; the
// result says which secret opens it, and with which options.
func Backup(ctx context.Context, dev Device, o BackupOptions, progress Progress) (BackupResult, error) {
	var res BackupResult
	image, err := activeImage(dev, "backup", true)
	if err != nil {
		return res, err
	}
	if o.Format == "" {
		o.Format = "qcow2"
	}
	if progress == nil {
		progress = func(int64, int64) {}
	}
	if err := o.check(); err != nil {
		return res, err
	}
	encrypted, secret := chainSecret(image, o.Open.Image)
	if encrypted && !o.Plaintext {
		if o.Format != "qcow2" {
			return res, fmt.Errorf("backup: the device's image is encrypted and a %s target would hold its data in clear: "+
				"use -f qcow2 (encrypted with the image's secret), or --plaintext to write it in clear", o.Format)
		}
		if secret == "" {
			return res, fmt.Errorf("backup: the device's image is encrypted, but it was not opened with a secret " +
				"that the backup could be encrypted with: use --plaintext to write it in clear")
		}
		res.Secret = secret
	}
	res.Plaintext = encrypted && o.Plaintext
	target, err := filepath.Abs(o.Target)
	if err != nil {
		return res, err
	}
	err = coroutine.Run(func(co *coroutine.Co) error {
		bm, _ := image.Driver().(bdrv.PersistentBitmaps)
		if o.Bitmap != "" {
			if bm == nil {
				return inBacking(co, image, o.Bitmap,
					fmt.Errorf("Dirty bitmap '%s' not found: '%s' is %s and holds no bitmaps", o.Bitmap, image.Filename, image.Format.Name))
			}
			if err := bm.CheckBitmap(co, o.Bitmap); err != nil {
				return inBacking(co, image, o.Bitmap, err)
			}
			// Taking it clears it: the image must be writable.
			if image.ReadOnly {
				return fmt.Errorf("backup: bitmap '%s' cannot be cleared: the device is read-only", o.Bitmap)
			}
		}
		size := image.Length()
		var prevFormat string
		open := bdrv.Options{}
		if res.Secret != "" {
			open[secretOption("qcow2")] = res.Secret
		}
		if o.Incremental != "" {
			var err error
			if prevFormat, err = checkPrevious(co, o.Incremental, size, secret, open); err != nil {
				return err
			}
		}
		if len(open) > 0 {
			res.Options = open
		}
		tgt, err := createTarget(co, target, o, prevFormat, size, res)
		if err != nil {
			return err
		}
		j := &backupJob{ctx: ctx, dev: dev, image: image, target: tgt, o: o, bm: bm, progress: progress}
		err = j.run(co)
		if cerr := tgt.Close(co); err == nil && cerr != nil {
			err = fmt.Errorf("closing '%s': %w", target, cerr)
		}
		if err != nil {
			err = errors.Join(err, j.undo(co))
			os.Remove(target)
		}
		return err
	})
	return res, err
}

// chainSecret says whether an image of n's chain (n, its backing file,
// ...) is encrypted, and returns the secret of the topmost encrypted one
// as opts, the options n was opened with, give it ("" when they do not).
func chainSecret(n *bdrv.Node, opts bdrv.Options) (encrypted bool, secret string) {
	prefix := ""
	for ; n != nil; n, prefix = n.Backing, prefix+"backing." {
		if !isEncrypted(n) {
			continue
		}
		return true, opts[prefix+secretOption(n.Format.Name)]
	}
	return false, ""
}

func isEncrypted(n *bdrv.Node) bool {
	e, ok := n.Driver().(bdrv.EncryptionReporter)
	return ok && e.IsEncrypted()
}

// secretOption is the option that gives an image of format its secret.
func secretOption(format string) string {
	if format == "luks" {
		return "key-secret"
	}
	return "encrypt.key-secret"
}

// luksOptions adds to create the options that encrypt a new qcow2 image
// with LUKS under secret, with a PBKDF2 cost of iterTime milliseconds
// ("" for QEMU's default).
func luksOptions(create bdrv.Options, secret, iterTime string) {
	create["encrypt.format"], create["encrypt.key-secret"] = "luks", secret
	if iterTime != "" {
		create["encrypt.iter-time"] = iterTime
	}
}

// check refuses the options that cannot work, before anything is done.
func (o *BackupOptions) check() error {
	switch o.Format {
	case "qcow2", "raw":
	default:
		return fmt.Errorf("backup: unsupported target format '%s' (qcow2, raw)", o.Format)
	}
	if o.Incremental != "" {
		if o.Bitmap == "" {
			return errors.New("backup: an incremental backup needs the bitmap that recorded the changes (--bitmap)")
		}
		if o.Format != "qcow2" {
			return errors.New("backup: an incremental backup is a qcow2 image backed by the previous one (-f qcow2)")
		}
		if _, err := os.Stat(o.Incremental); err != nil {
			return fmt.Errorf("backup: previous backup '%s': %w", o.Incremental, err)
		}
	}
	return checkNew(o.Target, "backup target")
}

// checkPrevious opens the previous backup (its metadata, with its backing
// chain) to learn its format and check that it is an image of the
// device's size; it adds to open the options that give each encrypted
// image of the chain secret (backing.encrypt.key-secret=ID, ...), which
// the target is opened with.
func checkPrevious(co *coroutine.Co, prev string, size int64, secret string, open bdrv.Options) (string, error) {
	n, err := bdrv.Open(co, bdrv.Spec{Filename: prev, ReadOnly: true, NoIO: true})
	if err != nil {
		return "", fmt.Errorf("backup: previous backup: %w", err)
	}
	defer n.Close(co)
	if n.Length() != size {
		return "", fmt.Errorf("backup: previous backup '%s' is %d bytes, the device %d", prev, n.Length(), size)
	}
	prefix := "backing."
	for b := n; b != nil; b, prefix = b.Backing, prefix+"backing." {
		if !isEncrypted(b) {
			continue
		}
		if secret == "" {
			return "", fmt.Errorf("backup: previous backup '%s' is encrypted (%s) and the device's image is not: no secret opens it", prev, b.Filename)
		}
		open[prefix+secretOption(b.Format.Name)] = secret
	}
	return n.Format.Name, nil
}

// createTarget creates and opens the backup image: size bytes, encrypted
// under res.Secret when it names one, backed by the previous backup when
// incremental (opened with it, read-only), opened with res.Options.
func createTarget(co *coroutine.Co, target string, o BackupOptions, prevFormat string, size int64, res BackupResult) (*bdrv.Node, error) {
	req := &bdrv.CreateRequest{Filename: target, Size: size, Options: bdrv.Options{}}
	if o.Incremental != "" {
		prev, err := filepath.Abs(o.Incremental)
		if err != nil {
			return nil, err
		}
		req.Options["backing_file"], req.Options["backing_fmt"] = prev, prevFormat
	}
	if res.Secret != "" {
		luksOptions(req.Options, res.Secret, backupIterTime)
	}
	if err := bdrv.Create(co, o.Format, req); err != nil {
		return nil, fmt.Errorf("creating '%s': %w", target, err)
	}
	n, err := bdrv.Open(co, bdrv.Spec{Filename: target, Format: o.Format, Cache: o.Open.Cache, Options: res.Options})
	if err != nil {
		os.Remove(target)
		return nil, fmt.Errorf("opening '%s': %w", target, err)
	}
	return n, nil
}

type backupJob struct {
	ctx      context.Context
	dev      Device
	image    *bdrv.Node
	target   *bdrv.Node
	o        BackupOptions
	bm       bdrv.PersistentBitmaps
	progress Progress

	f *filter
	// taken is the bitmap content taken at the point in time, merged
	// back if the backup fails.
	taken bdrv.BitmapData
	cbw   *cbwState
}

func (j *backupJob) run(co *coroutine.Co) error {
	size := j.image.Length()
	pending := newBitset(size, backupGranularity)
	// The point in time.
	if err := pause(co, j.ctx, j.dev); err != nil {
		return err
	}
	if j.o.Bitmap != "" {
		var err error
		if j.taken, err = j.bm.TakeBitmap(co, j.o.Bitmap); err != nil {
			j.dev.Resume()
			return err
		}
	}
	if j.o.Incremental != "" {
		markBitmap(pending, j.taken)
	} else {
		pending.setAll()
	}
	j.cbw = &cbwState{src: j.image, dst: j.target, pending: pending, incremental: j.o.Incremental != "",
		busy: map[int64]*coroutine.Queue{}}
	j.f = &filter{child: j.image, before: j.cbw.beforeWrite}
	insertFilter(j.dev, "copy-before-write", j.f)
	j.dev.Resume()

	total := pending.count() * backupGranularity
	j.progress(0, total)
	run := int64(maxCopy / backupGranularity)
	for i := pending.next(0); i >= 0; i = pending.next(i + run) {
		if err := cancelled(j.ctx); err != nil {
			return err
		}
		if err := j.cbw.copy(co, i, min(i+run, pending.n)); err != nil {
			return err
		}
		j.progress(total-pending.count()*backupGranularity, total)
	}
	if err := j.cbw.failure(co); err != nil {
		return err
	}
	// Every granule is in the target: the filter has nothing left to do.
	if err := pause(co, context.WithoutCancel(j.ctx), j.dev); err != nil {
		return err
	}
	removeFilter(j.dev, j.f)
	j.f = nil
	j.dev.Resume()
	if err := j.target.Flush(co); err != nil {
		return fmt.Errorf("flushing '%s': %w", j.target.Filename, err)
	}
	return nil
}

// undo takes the filter out and gives the bitmap back what was taken.
func (j *backupJob) undo(co *coroutine.Co) error {
	var errs []error
	if j.f != nil {
		if err := pause(co, context.WithoutCancel(j.ctx), j.dev); err != nil {
			return err
		}
		// The pause waited for the guest's writes in flight, and with
		// them for the copies the filter made: none is left.
		removeFilter(j.dev, j.f)
		j.dev.Resume()
	}
	if j.taken != nil {
		if err := j.bm.MergeBitmap(co, j.o.Bitmap, j.taken); err != nil {
			errs = append(errs, fmt.Errorf("restoring bitmap '%s': %w", j.o.Bitmap, err))
		}
	}
	return errors.Join(errs...)
}

// markBitmap sets in pending every granule that touches a dirty range of
// data.
func markBitmap(pending *bitset, data bdrv.BitmapData) {
	for off := uint64(0); ; {
		start, n := data.NextDirty(off)
		if n == 0 {
			return
		}
		pending.setBytes(int64(start), int64(n))
		off = start + n
	}
}
