package main

import (
	"context"
	"fmt"
	"maps"
	"sync"

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

func (s *liveServer) commands() map[string]ublk.ControlCommand {
	return map[string]ublk.ControlCommand{
		"handover": {Job: true, Handler: s.handover},
	}
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
