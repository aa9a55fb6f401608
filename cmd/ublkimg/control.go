package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"sync"
	"time"

	"ublkimg/bdrv"
	"ublkimg/img"
	"ublkimg/jobs"
	"ublkimg/ublk"
)

// liveServer is what the control commands of a running server share: the
// device, how its image was opened, and its record, which the commands that
// change the image (live snapshot and commit) keep up to date.
type liveServer struct {
	dev  *ublk.Device
	opts *attachOptions
	logf func(string, ...any)

	recMu sync.Mutex
	rec   ublk.Record

	// handedOver is closed once the device was handed to the next server
	// (restart): the server then exits without stopping it.
	handedOver chan struct{}
	handOnce   sync.Once
}

func newLiveServer(dev *ublk.Device, o *attachOptions, rec ublk.Record, logf func(string, ...any)) *liveServer {
	return &liveServer{dev: dev, opts: o, rec: rec, logf: logf, handedOver: make(chan struct{})}
}

// listen serves the device's control socket with the device's own commands
// and the server's.
func (s *liveServer) listen() (*ublk.ControlServer, error) {
	cmds := s.dev.ControlCommands()
	maps.Copy(cmds, s.commands())
	return ublk.ListenControl(s.dev.ID(), cmds, s.logf)
}

// record returns the device's record as it is now.
func (s *liveServer) record() ublk.Record {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	return s.rec
}

// updateRecord changes the record with fn and writes it; the record is
// left as it was when the write fails.
func (s *liveServer) updateRecord(fn func(r *ublk.Record)) error {
	s.recMu.Lock()
	defer s.recMu.Unlock()
	r := s.rec
	fn(&r)
	if err := ublk.WriteRecord(r); err != nil {
		return err
	}
	s.rec = r
	return nil
}

func (s *liveServer) commands() map[string]ublk.ControlCommand {
	return map[string]ublk.ControlCommand{
		"handover":      {Job: true, Handler: s.handover},
		"snapshot-live": {Job: true, Handler: s.snapshot},
		"commit-live":   {Job: true, Handler: s.commit},
		"backup":        {Job: true, Handler: s.backup},
		"bitmap":        {Job: true, Handler: s.bitmap},
		"resize":        {Job: true, Handler: s.resize},
	}
}

// openOptions are how the jobs open images: with the device's cache mode,
// the recovery option when the device has recovery, and the options of
// the record's --image-opts string for the image it serves.
func (s *liveServer) openOptions() (jobs.OpenOptions, error) {
	rec := s.record()
	o := jobs.OpenOptions{Cache: s.opts.cache}
	if rec.Recovery {
		o.Options = recoveryOptions(nil)
	}
	if rec.ImageOpts != "" {
		_, _, opts, err := img.ParseImageOpts(rec.ImageOpts)
		if err != nil {
			return o, fmt.Errorf("record of %s: %w", s.dev.Path(), err)
		}
		o.Image = opts
	}
	return o, nil
}

// pivot records image as the device's image (a live snapshot or commit
// switches to it), and, for a device attached with --image-opts, the
// options it is opened with as its option string, which recover and
// restart open it with.
func (s *liveServer) pivot(image, format string, opts bdrv.Options) error {
	return s.updateRecord(func(r *ublk.Record) {
		r.Image, r.Format = image, format
		if r.ImageOpts != "" {
			r.ImageOpts = imageOptsString(image, format, opts)
		}
	})
}

// imageOptsString is the --image-opts string of image in format, opened
// with opts.
func imageOptsString(image, format string, opts bdrv.Options) string {
	return optionString(opts.Merge(bdrv.Options{"driver": format, "file.filename": image}))
}

// progressEvents sends a job's progress as events from a goroutine of its
// own: the job reports from a coroutine, which must not block on the
// socket. Reports that come faster than the client reads are merged into
// the latest. stop sends the last one and ends the goroutine.
func progressEvents(r *ublk.ControlRequest) (progress jobs.Progress, stop func()) {
	var mu sync.Mutex
	var last progressData
	kick := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sent := progressData{Done: -1}
		for range kick {
			mu.Lock()
			d := last
			mu.Unlock()
			if d != sent {
				r.Event("progress", d)
				sent = d
			}
		}
	}()
	progress = func(d, total int64) {
		mu.Lock()
		last = progressData{Done: d, Total: total}
		mu.Unlock()
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	stop = func() {
		kick <- struct{}{}
		close(kick)
		<-done
	}
	return progress, stop
}

// progressData is the data of a job's progress event.
type progressData struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
}

// snapshotArgs are snapshot-live's arguments.
type snapshotArgs struct {
	Overlay string `json:"overlay"`
}

func (s *liveServer) snapshot(ctx context.Context, r *ublk.ControlRequest) (any, error) {
	var a snapshotArgs
	if err := r.Args(&a); err != nil {
		return nil, err
	}
	if !filepath.IsAbs(a.Overlay) {
		return nil, fmt.Errorf("snapshot-live: the overlay must be an absolute path, not '%s'", a.Overlay)
	}
	o, err := s.openOptions()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	dev := &pauseTimer{Device: s.dev}
	if err := jobs.Snapshot(ctx, dev, a.Overlay, o, s.pivot); err != nil {
		return nil, err
	}
	s.logf("%s: live snapshot: now serving %s in %v (%s)", s.dev.Path(), a.Overlay, time.Since(t0).Round(time.Millisecond), dev)
	return jobResult{Image: a.Overlay, Seconds: time.Since(t0).Seconds()}, nil
}

// pauseTimer is the device as a job sees it, timing the job's pauses for
// the log: from the call of Pause, which holds new requests, to Resume.
// A job pauses and resumes one at a time, so the fields need no lock.
type pauseTimer struct {
	jobs.Device
	since          time.Time
	n              int
	total, longest time.Duration
}

func (p *pauseTimer) Pause(ctx context.Context) error {
	p.since = time.Now()
	return p.Device.Pause(ctx)
}

func (p *pauseTimer) Resume() {
	d := time.Since(p.since)
	p.n++
	p.total += d
	p.longest = max(p.longest, d)
	p.Device.Resume()
}

// String says how long the device was paused: "2 pauses, 41ms in all,
// the longest 35ms".
func (p *pauseTimer) String() string {
	pauses := "pauses"
	if p.n == 1 {
		pauses = "pause"
	}
	return fmt.Sprintf("%d %s, %v in all, the longest %v", p.n, pauses, p.total.Round(time.Microsecond), p.longest.Round(time.Microsecond))
}

// jobResult is the reply of the jobs.
type jobResult struct {
	// Image is the image the device serves afterwards (snapshot,
	// commit) or the target written (backup).
	Image   string  `json:"image"`
	Seconds float64 `json:"seconds"`
	// Secret is the secret a backup is encrypted with, and ImageOpts the
	// --image-opts string that opens it (with its backing chain);
	// Plaintext says that the backup of an encrypted device was written
	// in clear, as asked.
	Secret    string `json:"secret,omitempty"`
	ImageOpts string `json:"image-opts,omitempty"`
	Plaintext bool   `json:"plaintext,omitempty"`
}

func (s *liveServer) commit(ctx context.Context, r *ublk.ControlRequest) (any, error) {
	if err := r.Args(&struct{}{}); err != nil {
		return nil, err
	}
	o, err := s.openOptions()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	progress, stop := progressEvents(r)
	dev := &pauseTimer{Device: s.dev}
	err = jobs.Commit(ctx, dev, o, s.pivot, progress)
	stop()
	if err != nil {
		return nil, err
	}
	image := s.record().Image
	s.logf("%s: live commit: now serving %s after %v (%s)", s.dev.Path(), image, time.Since(t0).Round(time.Millisecond), dev)
	return jobResult{Image: image, Seconds: time.Since(t0).Seconds()}, nil
}

// backupArgs are backup's arguments.
type backupArgs struct {
	Target      string `json:"target"`
	Format      string `json:"format,omitempty"`
	Bitmap      string `json:"bitmap,omitempty"`
	Incremental string `json:"incremental,omitempty"`
	Plaintext   bool   `json:"plaintext,omitempty"`
}

func (s *liveServer) backup(ctx context.Context, r *ublk.ControlRequest) (any, error) {
	var a backupArgs
	if err := r.Args(&a); err != nil {
		return nil, err
	}
	for _, p := range []string{a.Target, a.Incremental} {
		if p != "" && !filepath.IsAbs(p) {
			return nil, fmt.Errorf("backup: paths must be absolute, not '%s'", p)
		}
	}
	open, err := s.openOptions()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	// The target is opened with the device's cache mode; the image's
	// options tell the job the secret it is encrypted with.
	o := jobs.BackupOptions{Target: a.Target, Format: a.Format, Bitmap: a.Bitmap, Incremental: a.Incremental,
		Open: jobs.OpenOptions{Cache: open.Cache, Image: open.Image}, Plaintext: a.Plaintext}
	events, stop := progressEvents(r)
	var pit time.Duration
	var toCopy int64
	progress := func(done, total int64) {
		if pit == 0 {
			// The first report comes right after the point in time;
			// the log says so (off the job's coroutine).
			pit, toCopy = time.Since(t0), total
			go s.logf("%s: backup to %s: point in time taken", s.dev.Path(), a.Target)
		}
		events(done, total)
	}
	dev := &pauseTimer{Device: s.dev}
	res, err := jobs.Backup(ctx, dev, o, progress)
	stop()
	if err != nil {
		return nil, err
	}
	out := jobResult{Image: a.Target, Seconds: time.Since(t0).Seconds(), Secret: res.Secret, Plaintext: res.Plaintext}
	if res.Options != nil {
		// An incremental backup is qcow2, and so is an encrypted one.
		out.ImageOpts = imageOptsString(a.Target, "qcow2", res.Options)
	}
	crypt := ""
	switch {
	case res.Secret != "":
		crypt = ", encrypted with secret " + res.Secret
	case res.Plaintext:
		crypt = ", in clear as asked (--plaintext)"
	}
	s.logf("%s: backup to %s: point in time %v after the start, %d bytes to copy, done in %v (%s)%s", s.dev.Path(), a.Target,
		pit.Round(time.Millisecond), toCopy, time.Since(t0).Round(time.Millisecond), dev, crypt)
	return out, nil
}

// bitmapArgs are bitmap's arguments: Source is where merges read their
// source bitmap (the image itself by default).
type bitmapArgs struct {
	Name   string            `json:"name"`
	Ops    []jobs.BitmapOp   `json:"ops"`
	Source jobs.BitmapSource `json:"source,omitzero"`
}

func (s *liveServer) bitmap(ctx context.Context, r *ublk.ControlRequest) (any, error) {
	var a bitmapArgs
	if err := r.Args(&a); err != nil {
		return nil, err
	}
	if a.Source.File != "" && !filepath.IsAbs(a.Source.File) {
		return nil, fmt.Errorf("bitmap: the source file must be an absolute path, not '%s'", a.Source.File)
	}
	return struct{}{}, jobs.Bitmap(ctx, s.dev, a.Name, a.Ops, a.Source)
}

// resizeArgs are resize's arguments: the size as resize takes it
// ("+1G", "20G").
type resizeArgs struct {
	Size string `json:"size"`
}

func (s *liveServer) resize(ctx context.Context, r *ublk.ControlRequest) (any, error) {
	var a resizeArgs
	if err := r.Args(&a); err != nil {
		return nil, err
	}
	sign, n, huge, err := img.ParseResizeSize(a.Size)
	if err != nil {
		return nil, err
	}
	// The kernel first: nothing is changed where it cannot follow.
	if err := s.dev.CanResize(); err != nil {
		return nil, err
	}
	cur := s.dev.Node().Length()
	size := n
	switch {
	case huge:
		return nil, errors.New("New image size must be positive")
	case sign > 0:
		size = cur + n
	case sign < 0:
		size = cur - n
	}
	if err := s.dev.Grow(ctx, size); err != nil {
		return nil, err
	}
	return struct {
		Size int64 `json:"size"`
	}{size}, nil
}

// handover is the old server's part of restart: it pauses the device,
// flushes and closes the image, replies, and then the server exits without
// stopping the device, which the kernel quiesces for the new server.
func (s *liveServer) handover(ctx context.Context, r *ublk.ControlRequest) (any, error) {
	if err := r.Args(&struct{}{}); err != nil {
		return nil, err
	}
	if !s.record().Recovery {
		return nil, fmt.Errorf("cannot restart %s: it was not attached with --recovery", s.dev.Path())
	}
	if err := s.dev.Handover(ctx); err != nil {
		return nil, err
	}
	s.logf("%s: handed over for a restart", s.dev.Path())
	r.AfterReply(func() { s.handOnce.Do(func() { close(s.handedOver) }) })
	return struct{}{}, nil
}
