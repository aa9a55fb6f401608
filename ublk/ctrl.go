package ublk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/coroutine"
	"ublkimg/ublk/internal/uapi"
)

// ControlPath is the ublk driver's control device.
const ControlPath = "/dev/ublk-control"

// Features is a set of UBLK_F_* flags, as GET_FEATURES reports them and as
// ADD_DEV negotiates them. Its String method names the flags.
type Features = uapi.Features

// Feature flags the package uses (see ublk_cmd.h for the others).
const (
	// FeatureUserCopy is UBLK_F_USER_COPY (6.4): request data moves with
	// read/write on /dev/ublkcN instead of through per-tag buffers.
	FeatureUserCopy = uapi.FUserCopy
	// FeatureUnprivileged is UBLK_F_UNPRIVILEGED_DEV (6.2).
	FeatureUnprivileged = uapi.FUnprivilegedDev
	// FeatureIoctlEncode is UBLK_F_CMD_IOCTL_ENCODE (6.4): the kernel takes
	// the ioctl-encoded opcodes.
	FeatureIoctlEncode = uapi.FCmdIoctlEncode
	// FeatureUserRecovery is UBLK_F_USER_RECOVERY (6.1): the device
	// survives its server (QUIESCED) until a new one recovers it.
	FeatureUserRecovery = uapi.FUserRecovery
	// FeatureUserRecoveryReissue is UBLK_F_USER_RECOVERY_REISSUE (6.1):
	// requests the dead server held are sent again to the next one.
	FeatureUserRecoveryReissue = uapi.FUserRecoveryReissue
)

// DevState is a device's state as the kernel reports it (UBLK_S_DEV_*):
// DEAD (added but not started, or stopped), LIVE, QUIESCED, FAIL_IO.
type DevState = uapi.DevState

// Device states.
const (
	StateDead     = uapi.SDevDead
	StateLive     = uapi.SDevLive
	StateQuiesced = uapi.SDevQuiesced
	StateFailIO   = uapi.SDevFailIO
)

// DevInfo is struct ublksrv_ctrl_dev_info in Go terms: what ADD_DEV is asked
// for and what GET_DEV_INFO reports.
type DevInfo struct {
	// ID is N in /dev/ublkcN and /dev/ublkbN. In an ADD_DEV request, -1
	// lets the kernel pick.
	ID int
	// Queues is the number of hardware queues (clamped by the kernel to
	// the CPU count).
	Queues int
	// Depth is the number of tags per queue.
	Depth int
	// MaxIOBufBytes is the largest request in bytes (rounded down to the
	// page size by the kernel).
	MaxIOBufBytes int
	// State is set by the kernel.
	State DevState
	// PID is the server pid given to START_DEV, -1 when not started.
	PID int
	// Flags are the requested, then negotiated, UBLK_F_* flags.
	Flags Features
	// OwnerUID and OwnerGID are the creator's ids (6.2+).
	OwnerUID, OwnerGID uint32
}

func (i *DevInfo) fromKernel(k *uapi.CtrlDevInfo) {
	*i = DevInfo{
		ID:            int(k.DevID),
		Queues:        int(k.NrHWQueues),
		Depth:         int(k.QueueDepth),
		MaxIOBufBytes: int(k.MaxIOBufBytes),
		State:         k.State,
		PID:           int(k.UblksrvPID),
		Flags:         k.Flags,
		OwnerUID:      k.OwnerUID,
		OwnerGID:      k.OwnerGID,
	}
}

// Ctrl is an open /dev/ublk-control: it sends control commands (add, set
// parameters, start, stop, delete, query) on its own io_uring with 128-byte
// SQEs, driven by a coroutine loop of its own. Its methods may be called
// from any goroutine, concurrently; each blocks until the kernel answers.
// Commands the kernel handles slowly (START_DEV, DEL_DEV) run on io_uring's
// worker threads, so they never stall the other commands.
type Ctrl struct {
	fd   int
	loop *coroutine.Loop
	// legacy is set when GET_FEATURES failed: the kernel predates 6.5 and
	// may only know the legacy opcodes (docs/ublk-uapi.md §1.1).
	legacy   bool
	features Features

	closeOnce sync.Once
}

// OpenCtrl opens /dev/ublk-control and probes the driver's features. It
// fails with ErrNoDriver when the control device does not exist and with
// ErrPermission when the caller may not open it.
func OpenCtrl() (*Ctrl, error) {
	fd, err := openControl()
	if err != nil {
		return nil, err
	}
	loop, err := coroutine.Start(coroutine.Config{Entries: 16, SQE128: true})
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("ublk control ring: %w", err)
	}
	c := &Ctrl{fd: fd, loop: loop}
	var feat uint64
	cc := uapi.CtrlCmd{DevID: uapi.DevIDAny, QueueID: uapi.QueueIDNone, Len: uapi.FeaturesLen}
	res, _ := c.submit(context.Background(), uapi.UCmdGetFeatures, cc, payloadOf(&feat))
	switch {
	case res == 0:
		c.features = Features(feat)
	case res == -int32(unix.EOPNOTSUPP) || res == -int32(unix.ENODEV) || res == -int32(unix.EINVAL):
		c.legacy = true
	default:
		c.Close()
		return nil, &CmdError{Op: "GET_FEATURES", DevID: -1, Errno: unix.Errno(-res)}
	}
	return c, nil
}

// openControl opens ControlPath, with the errors OpenCtrl documents.
func openControl() (int, error) {
	fd, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO):
		return -1, ErrNoDriver
	case errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
		return -1, ErrPermission
	case err != nil:
		return -1, fmt.Errorf("opening %s: %w", ControlPath, err)
	}
	return fd, nil
}

// CheckCtrl reports whether the control device opens, with OpenCtrl's
// errors, without setting up a ring for commands: the cheap check of a
// command that leaves the commands to another process.
func CheckCtrl() error {
	fd, err := openControl()
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

// Close releases the control device. It may be called more than once.
func (c *Ctrl) Close() error {
	c.closeOnce.Do(func() {
		c.loop.Close()
		unix.Close(c.fd)
	})
	return nil
}

// Features returns what GET_FEATURES reported: every UBLK_F_* flag the
// driver supports. It is 0 on kernels before 6.5, which lack the command.
func (c *Ctrl) Features() Features { return c.features }

// Legacy reports whether the control device uses the legacy (pre-6.4)
// opcodes because GET_FEATURES failed.
func (c *Ctrl) Legacy() bool { return c.legacy }

// op returns the form of op this kernel understands.
func (c *Ctrl) op(op uapi.CmdOp) uapi.CmdOp {
	if c.legacy {
		return op.Legacy()
	}
	return op
}

// payload is a control command's buffer, which the kernel reads or writes
// at cc.Addr on an io-wq worker, after the submitting coroutine parked.
type payload struct {
	addr uint64
	obj  any // the Go object at addr
}

// payloadOf is *p as a command buffer. Taking the object, not an address,
// lets submit pin exactly what cc.Addr points to.
func payloadOf[T any](p *T) payload {
	return payload{addr: uint64(uintptr(unsafe.Pointer(p))), obj: p}
}

// submit sends one control command and waits for its completion; it returns
// cqe.res. buf, if any, becomes cc.Addr: it stays pinned and referenced
// until the kernel is done with it (control commands run on an io-wq worker
// after submission). If ctx ends first the command is cancelled (an
// interruptible wait in the kernel returns EINTR) and submit still waits
// for its completion, returning ctx.Err() with it.
func (c *Ctrl) submit(ctx context.Context, op uapi.CmdOp, cc uapi.CtrlCmd, buf payload) (int32, error) {
	done := make(chan int32, 1)
	ud := make(chan uint64, 1)
	c.loop.Spawn(func(co *coroutine.Co) {
		var pin runtime.Pinner
		if buf.obj != nil {
			pin.Pin(buf.obj)
			cc.Addr = buf.addr
		}
		sqe := co.SQE()
		sqe.PrepURingCmd(int32(c.fd), uint32(op), nil)
		cc.Encode(sqe.Cmd()[:])
		ud <- sqe.UserData
		res := co.Wait()
		pin.Unpin()
		runtime.KeepAlive(buf.obj)
		done <- res
	})
	select {
	case res := <-done:
		return res, nil
	case <-ctx.Done():
	}
	target := <-ud
	c.loop.Spawn(func(co *coroutine.Co) {
		co.SQE().PrepCancel(target, 0)
		co.Wait() // ENOENT or EALREADY when it completed meanwhile: fine
	})
	return <-done, ctx.Err()
}

// run is submit for commands on a device, mapping failures to CmdError.
func (c *Ctrl) run(ctx context.Context, op uapi.CmdOp, id int, cc uapi.CtrlCmd, buf payload) error {
	res, err := c.submit(ctx, c.op(op), cc, buf)
	if err != nil {
		return err
	}
	if res < 0 {
		return &CmdError{Op: cmdName(op), DevID: id, Errno: unix.Errno(-res)}
	}
	return nil
}

func devID(id int) uint32 {
	if id < 0 {
		return uapi.DevIDAny
	}
	return uint32(id)
}

// AddDev creates a device (ADD_DEV) as req describes and returns what the
// kernel made of it: the id it assigned, the negotiated flags, the queue
// count clamped to the CPUs, the page-aligned buffer size. It fails with an
// error matching ErrIDTaken when req.ID is in use.
func (c *Ctrl) AddDev(req DevInfo) (DevInfo, error) {
	info := &uapi.CtrlDevInfo{
		NrHWQueues:    uint16(req.Queues),
		QueueDepth:    uint16(req.Depth),
		MaxIOBufBytes: uint32(req.MaxIOBufBytes),
		DevID:         devID(req.ID),
		Flags:         req.Flags,
	}
	cc := uapi.CtrlCmd{DevID: info.DevID, QueueID: uapi.QueueIDNone, Len: uapi.SizeofCtrlDevInfo}
	if err := c.run(context.Background(), uapi.UCmdAddDev, req.ID, cc, payloadOf(info)); err != nil {
		return DevInfo{}, err
	}
	var out DevInfo
	out.fromKernel(info)
	return out, nil
}

// DevInfo returns the kernel's view of device id (GET_DEV_INFO). It fails
// with an error matching ErrNoDevice when there is none.
func (c *Ctrl) DevInfo(id int) (DevInfo, error) {
	info := &uapi.CtrlDevInfo{}
	cc := uapi.CtrlCmd{DevID: devID(id), Len: uapi.SizeofCtrlDevInfo}
	if err := c.run(context.Background(), uapi.UCmdGetDevInfo, id, cc, payloadOf(info)); err != nil {
		return DevInfo{}, err
	}
	var out DevInfo
	out.fromKernel(info)
	return out, nil
}

// setParams sends SET_PARAMS; p.Len is set here.
func (c *Ctrl) setParams(id int, p *uapi.Params) error {
	p.Len = uapi.SizeofParams
	cc := uapi.CtrlCmd{DevID: devID(id), Len: uapi.SizeofParams}
	return c.run(context.Background(), uapi.UCmdSetParams, id, cc, payloadOf(p))
}

// startDev sends START_DEV with this process as the server. It returns once
// the kernel added the disk, which needs every tag of every queue fetched and
// the partition scan served; ctx cancels the wait.
func (c *Ctrl) startDev(ctx context.Context, id int) error {
	cc := uapi.CtrlCmd{DevID: devID(id), Data: uint64(os.Getpid())}
	return c.run(ctx, uapi.UCmdStartDev, id, cc, payload{})
}

// getParams returns device id's parameters (GET_PARAMS).
func (c *Ctrl) getParams(id int) (*uapi.Params, error) {
	p := &uapi.Params{Len: uapi.SizeofParams}
	cc := uapi.CtrlCmd{DevID: devID(id), Len: uapi.SizeofParams}
	if err := c.run(context.Background(), uapi.UCmdGetParams, id, cc, payloadOf(p)); err != nil {
		return nil, err
	}
	return p, nil
}

// startRecovery sends START_USER_RECOVERY: the kernel forgets the dead
// server's queues so that a new process may open /dev/ublkcN, map it and
// fetch every tag. It fails with EBUSY while the old server still holds
// /dev/ublkcN or the device is not QUIESCED.
func (c *Ctrl) startRecovery(id int) error {
	return c.run(context.Background(), uapi.UCmdStartUserRecovery, id, uapi.CtrlCmd{DevID: devID(id)}, payload{})
}

// endRecovery sends END_USER_RECOVERY with this process as the server. It
// returns once every tag of every queue is fetched and the device is LIVE
// again (the held requests are then sent to the new server); ctx cancels
// the wait.
func (c *Ctrl) endRecovery(ctx context.Context, id int) error {
	cc := uapi.CtrlCmd{DevID: devID(id), Data: uint64(os.Getpid())}
	return c.run(ctx, uapi.UCmdEndUserRecovery, id, cc, payload{})
}

// StopDev stops device id (STOP_DEV): the disk is removed once in-flight
// requests completed, and every armed FETCH of the server completes with
// -ENODEV. Stopping a device that is not started only cancels its fetches.
func (c *Ctrl) StopDev(id int) error {
	return c.run(context.Background(), uapi.UCmdStopDev, id, uapi.CtrlCmd{DevID: devID(id)}, payload{})
}

// DelDev deletes device id (DEL_DEV): it stops it if needed, removes
// /dev/ublkcN and waits until the last reference (an open /dev/ublkcN, the
// server's rings and mappings) is gone.
func (c *Ctrl) DelDev(id int) error {
	var err error
	for range 10 {
		err = c.run(context.Background(), uapi.UCmdDelDev, id, uapi.CtrlCmd{DevID: devID(id)}, payload{})
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	return err
}
