package ublk

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The control channel: every server listens on a unix socket next to its
// device's record, /run/ublkimg/ublkbN.sock (0600, in the root-only run
// directory, and peers must run as the server's user), for the commands
// that act on a device while it is served: statistics, live snapshot and
// commit, backup, bitmaps, resize, restart. docs/control.md describes the
// protocol; in short, after QMP:
//
//	-> {"execute": "query-stats", "arguments": {}}
//	<- {"event": "progress", "data": {...}}          (zero or more)
//	<- {"return": {...}}  or  {"error": {"class": "GenericError", "desc": "one line"}}
//
// one JSON object per line, one command at a time per connection, any
// number of commands per connection. The connection goroutines never touch
// the queues: a command reads their statistics, or pauses the device
// (Pause) for the moment it changes what the device serves.

// ControlHandler serves one command. It runs on its own goroutine; ctx
// ends when the client goes away or the server closes.
type ControlHandler func(ctx context.Context, r *ControlRequest) (any, error)

// ControlCommand is a command the control server knows.
type ControlCommand struct {
	Handler ControlHandler
	// Job marks a command that runs for a while and changes the device
	// or its image (snapshot, commit, backup, resize, restart): one
	// runs at a time per device, and a second one is refused.
	Job bool
}

// ControlCommands are the commands of the control protocol the device
// serves itself: query-stats, its figures now (DeviceStats).
func (d *Device) ControlCommands() map[string]ControlCommand {
	return map[string]ControlCommand{
		"query-stats": {Handler: func(ctx context.Context, r *ControlRequest) (any, error) {
			if err := r.Args(&struct{}{}); err != nil {
				return nil, err
			}
			return d.Stats(), nil
		}},
	}
}

// ControlRequest is one command as a handler receives it.
type ControlRequest struct {
	Command   string
	Arguments json.RawMessage
	conn      *controlConn
	after     []func()
}

// Args decodes the command's arguments into v, refusing unknown fields.
func (r *ControlRequest) Args(v any) error {
	if len(r.Arguments) == 0 || string(r.Arguments) == "null" {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(r.Arguments))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: invalid arguments: %w", r.Command, err)
	}
	return nil
}

// Event sends an event (progress of a job) to the client, before the
// command's reply. A client that went away is not an error here: the
// handler's context ends.
func (r *ControlRequest) Event(name string, data any) {
	r.conn.send(controlMessage{Event: name, Data: data})
}

// AfterReply runs fn once the reply has been sent (restart uses it to exit
// only once the client knows).
func (r *ControlRequest) AfterReply(fn func()) { r.after = append(r.after, fn) }

// controlMessage is every line of the protocol, in both directions.
type controlMessage struct {
	Execute   string          `json:"execute,omitempty"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
	Event     string          `json:"event,omitempty"`
	Data      any             `json:"data,omitempty"`
	Return    any             `json:"return,omitempty"`
	Error     *ControlError   `json:"error,omitempty"`
}

// ControlError is a command's failure as the protocol carries it.
type ControlError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *ControlError) Error() string { return e.Desc }

// maxControlLine bounds a request line: commands are small.
const maxControlLine = 1 << 20

// controlWriteTimeout bounds a write to a client that does not read.
const controlWriteTimeout = 10 * time.Second

func sockName(id int) string { return fmt.Sprintf("ublkb%d.sock", id) }

// SocketPath is device id's control socket.
func SocketPath(id int) string { return RecordDir + "/" + sockName(id) }

// ControlServer serves a device's control socket.
type ControlServer struct {
	id       int
	ln       *net.UnixListener
	commands map[string]ControlCommand
	logf     func(string, ...any)
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu    sync.Mutex
	conns map[*controlConn]struct{}
	job   string // the job running, "" for none
	ino   uint64 // the socket file's inode, to remove only ours
}

// ListenControl creates device id's control socket (replacing a stale one)
// and serves commands on it until Close. logf receives problems (nil
// discards them).
func ListenControl(id int, commands map[string]ControlCommand, logf func(string, ...any)) (*ControlServer, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	s := &ControlServer{id: id, commands: commands, logf: logf, conns: map[*controlConn]struct{}{}}
	err := withRunDir(true, func(d *runDir) error {
		name := sockName(id)
		if err := d.remove(name); err != nil {
			return err
		}
		// Bound through the checked directory's descriptor, so that the
		// directory name is not followed again.
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: d.procPath(name), Net: "unix"})
		if err != nil {
			return err
		}
		ln.SetUnlinkOnClose(false)
		if err := unix.Fchmodat(d.fd, name, 0o600, 0); err != nil {
			ln.Close()
			return err
		}
		var st unix.Stat_t
		if err := unix.Fstatat(d.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			ln.Close()
			return err
		}
		s.ln, s.ino = ln, st.Ino
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", SocketPath(id), err)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// Close stops serving: running commands see their context end, and Close
// waits for them, then removes the socket.
func (s *ControlServer) Close() error {
	s.cancel()
	err := s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.conn.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	rerr := withRunDir(false, func(d *runDir) error {
		var st unix.Stat_t
		if err := unix.Fstatat(d.fd, sockName(s.id), &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Ino != s.ino {
			return nil // gone, or already a successor's
		}
		return d.remove(sockName(s.id))
	})
	if errors.Is(rerr, os.ErrNotExist) {
		rerr = nil
	}
	return errors.Join(err, rerr)
}

func (s *ControlServer) accept() {
	defer s.wg.Done()
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if s.ctx.Err() == nil {
				s.logf("ublkb%d: control socket: %v", s.id, err)
			}
			return
		}
		if err := checkPeer(conn); err != nil {
			s.logf("ublkb%d: control socket: %v", s.id, err)
			conn.Close()
			continue
		}
		c := &controlConn{srv: s, conn: conn}
		s.mu.Lock()
		if s.ctx.Err() != nil {
			s.mu.Unlock()
			conn.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go c.serve()
	}
}

// checkPeer refuses a client that runs as another user than the server:
// the socket's mode and directory already keep them out.
func checkPeer(conn *net.UnixConn) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if euid := os.Geteuid(); int(cred.Uid) != euid {
		return fmt.Errorf("refused a client running as uid %d (pid %d)", cred.Uid, cred.Pid)
	}
	return nil
}

// controlConn is one client.
type controlConn struct {
	srv  *ControlServer
	conn *net.UnixConn
	wmu  sync.Mutex
}

// serve reads requests and runs them one after the other. A reader
// goroutine notices the client leaving while a command runs, which ends
// the command's context.
func (c *controlConn) serve() {
	defer c.srv.wg.Done()
	defer func() {
		c.srv.mu.Lock()
		delete(c.srv.conns, c)
		c.srv.mu.Unlock()
		c.conn.Close()
	}()
	lines := make(chan []byte)
	gone := make(chan struct{})
	done := make(chan struct{})
	defer close(done)
	go func() {
		defer close(gone)
		sc := bufio.NewScanner(c.conn)
		sc.Buffer(make([]byte, 4096), maxControlLine)
		for sc.Scan() {
			line := append([]byte(nil), sc.Bytes()...)
			select {
			case lines <- line:
			case <-done:
				return
			}
		}
	}()
	for {
		select {
		case line := <-lines:
			c.run(line, gone)
		case <-gone:
			return
		case <-c.srv.ctx.Done():
			return
		}
	}
}

// run executes one request line and sends its reply.
func (c *controlConn) run(line []byte, gone <-chan struct{}) {
	var m controlMessage
	if err := json.Unmarshal(line, &m); err != nil || m.Execute == "" {
		c.send(controlMessage{Error: &ControlError{Class: "GenericError", Desc: "invalid request: expected {\"execute\": COMMAND, \"arguments\": {...}}"}})
		return
	}
	r := &ControlRequest{Command: m.Execute, Arguments: m.Arguments, conn: c}
	ret, err := c.srv.dispatch(r, gone)
	if err != nil {
		c.send(controlMessage{Error: &ControlError{Class: "GenericError", Desc: oneLineText(err.Error())}})
	} else {
		if ret == nil {
			ret = struct{}{}
		}
		c.send(controlMessage{Return: ret})
	}
	for _, fn := range r.after {
		fn()
	}
}

// dispatch runs r's handler with a context that ends when the client goes
// away or the server closes; jobs run one at a time.
func (s *ControlServer) dispatch(r *ControlRequest, gone <-chan struct{}) (any, error) {
	cmd, ok := s.commands[r.Command]
	if !ok {
		return nil, fmt.Errorf("unknown command '%s' (known: %s)", r.Command, s.names())
	}
	if cmd.Job {
		s.mu.Lock()
		running := s.job
		if running == "" {
			s.job = r.Command
		}
		s.mu.Unlock()
		if running != "" {
			return nil, fmt.Errorf("/dev/ublkb%d is busy with a %s job: wait for it to end", s.id, running)
		}
		defer func() {
			s.mu.Lock()
			s.job = ""
			s.mu.Unlock()
		}()
	}
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-gone:
			cancel()
		case <-stop:
		}
	}()
	return cmd.Handler(ctx, r)
}

func (s *ControlServer) names() string {
	return strings.Join(slices.Sorted(maps.Keys(s.commands)), ", ")
}

// send writes one message; a client that does not read for
// controlWriteTimeout is dropped.
func (c *controlConn) send(m controlMessage) {
	data, err := json.Marshal(m)
	if err != nil {
		data, _ = json.Marshal(controlMessage{Error: &ControlError{Class: "GenericError", Desc: "encoding the reply: " + err.Error()}})
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.conn.SetWriteDeadline(time.Now().Add(controlWriteTimeout))
	if _, err := c.conn.Write(append(data, '\n')); err != nil {
		c.conn.Close()
	}
}

func oneLineText(s string) string { return strings.TrimSpace(strings.ReplaceAll(s, "\n", " ")) }

// ControlClient is a connection to a server's control socket.
type ControlClient struct {
	conn *net.UnixConn
	sc   *bufio.Scanner
}

// DialControl connects to device id's control socket. Use ConnectDevice to
// get the errors users should see for a device that is not served.
func DialControl(id int) (*ControlClient, error) {
	var conn *net.UnixConn
	err := withRunDir(false, func(d *runDir) error {
		var err error
		conn, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: d.procPath(sockName(id)), Net: "unix"})
		return err
	})
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	return &ControlClient{conn: conn, sc: sc}, nil
}

// ConnectDevice connects to the control socket of the server of device
// id, with one line for each reason it cannot: ublkimg serves no such
// device, its server is gone.
func ConnectDevice(id int) (*ControlClient, error) {
	dev := fmt.Sprintf("/dev/ublkb%d", id)
	rec, err := ReadRecord(id)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: no such device served by ublkimg (no record in %s)", dev, RecordDir)
	}
	if err != nil {
		return nil, err
	}
	if !rec.ServerAlive() {
		return nil, fmt.Errorf("%s: its server (process %d) is not running", dev, rec.PID)
	}
	c, err := DialControl(id)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ECONNREFUSED) {
		return nil, fmt.Errorf("%s: its server (process %d) has no control socket (%s)", dev, rec.PID, SocketPath(id))
	}
	if err != nil {
		return nil, fmt.Errorf("%s: control socket: %w", dev, err)
	}
	return c, nil
}

// Close ends the connection.
func (c *ControlClient) Close() error { return c.conn.Close() }

// Call runs command with args (nil for none) and decodes its reply into
// result (nil to ignore it). Events before the reply go to onEvent (nil to
// ignore them); an error from onEvent ends the call. When ctx ends the
// connection is closed, which cancels the command on the server.
func (c *ControlClient) Call(ctx context.Context, command string, args, result any, onEvent func(name string, data json.RawMessage) error) error {
	req := controlMessage{Execute: command}
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return err
		}
		req.Arguments = raw
	}
	data, err := json.Marshal(req)
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { c.conn.Close() })
	defer stop()
	if _, err := c.conn.Write(append(data, '\n')); err != nil {
		return c.callError(ctx, err)
	}
	for c.sc.Scan() {
		var m struct {
			Event  string          `json:"event"`
			Data   json.RawMessage `json:"data"`
			Return json.RawMessage `json:"return"`
			Error  *ControlError   `json:"error"`
		}
		if err := json.Unmarshal(c.sc.Bytes(), &m); err != nil {
			return fmt.Errorf("control socket: invalid reply: %w", err)
		}
		switch {
		case m.Error != nil:
			return m.Error
		case m.Event != "":
			if onEvent != nil {
				if err := onEvent(m.Event, m.Data); err != nil {
					return err
				}
			}
		case m.Return != nil:
			if result == nil {
				return nil
			}
			if err := json.Unmarshal(m.Return, result); err != nil {
				return fmt.Errorf("control socket: invalid reply to %s: %w", command, err)
			}
			return nil
		}
	}
	err = c.sc.Err()
	if err == nil {
		err = errors.New("the server closed the connection")
	}
	return c.callError(ctx, err)
}

func (c *ControlClient) callError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("control socket: %w", err)
}
