package ublk

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/ublk/internal/uapi"
)

// TestControlProtocol runs a control server on a socket in a private run
// directory and talks to it as the CLI does: replies, events, errors,
// arguments, one job at a time, a job cancelled when its client leaves,
// and the socket's mode and removal.
func TestControlProtocol(t *testing.T) {
	tempRunDir(t)
	leakCheck(t)
	jobStarted := make(chan struct{})
	jobEnded := make(chan error, 1)
	cmds := map[string]ControlCommand{
		"echo": {Handler: func(ctx context.Context, r *ControlRequest) (any, error) {
			var a struct {
				Text string `json:"text"`
			}
			if err := r.Args(&a); err != nil {
				return nil, err
			}
			r.Event("progress", map[string]int{"done": 1})
			r.Event("progress", map[string]int{"done": 2})
			return map[string]string{"text": a.Text}, nil
		}},
		"fail": {Handler: func(ctx context.Context, r *ControlRequest) (any, error) {
			return nil, errors.New("it failed\non two lines")
		}},
		"wait": {Job: true, Handler: func(ctx context.Context, r *ControlRequest) (any, error) {
			close(jobStarted)
			<-ctx.Done()
			jobEnded <- ctx.Err()
			return nil, ctx.Err()
		}},
	}
	srv, err := ListenControl(7, cmds, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Lstat(SocketPath(7))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with mode 0600", st.Mode())
	}

	c := dial(t, 7)
	ctx := t.Context()
	var got struct{ Text string }
	var events []string
	err = c.Call(ctx, "echo", map[string]string{"text": "hello"}, &got, func(name string, data json.RawMessage) error {
		events = append(events, name+" "+string(data))
		return nil
	})
	if err != nil || got.Text != "hello" {
		t.Errorf("echo: %q, %v", got.Text, err)
	}
	if strings.Join(events, ";") != `progress {"done":1};progress {"done":2}` {
		t.Errorf("events %q", events)
	}
	for _, tc := range []struct {
		cmd  string
		args any
		want string
	}{
		{"fail", nil, "it failed on two lines"},
		{"nope", nil, "unknown command 'nope' (known: echo, fail, wait)"},
		{"echo", map[string]int{"txt": 1}, `echo: invalid arguments: json: unknown field "txt"`},
	} {
		err := c.Call(ctx, tc.cmd, tc.args, nil, nil)
		var ce *ControlError
		if !errors.As(err, &ce) || ce.Desc != tc.want {
			t.Errorf("%s: error %v, want %q", tc.cmd, err, tc.want)
		}
	}

	// A job runs alone; it ends when its client goes away.
	jc := dial(t, 7)
	callDone := make(chan error, 1)
	jctx, cancel := context.WithCancel(ctx)
	go func() { callDone <- jc.Call(jctx, "wait", nil, nil, nil) }()
	<-jobStarted
	if err := c.Call(ctx, "wait", nil, nil, nil); err == nil || !strings.Contains(err.Error(), "busy with a wait job") {
		t.Errorf("second job: %v", err)
	}
	cancel()
	if err := <-callDone; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled call: %v", err)
	}
	select {
	case err := <-jobEnded:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("job ended with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the job did not end when its client went away")
	}

	// An invalid line gets an error, and the connection goes on.
	raw, err := net.Dial("unix", SocketPath(7))
	if err != nil {
		t.Fatal(err)
	}
	raw.Write([]byte("not json\n"))
	buf := make([]byte, 4096)
	n, _ := raw.Read(buf)
	if !strings.Contains(string(buf[:n]), `"error":{"class":"GenericError","desc":"invalid request`) {
		t.Errorf("invalid request: reply %q", buf[:n])
	}
	raw.Close()

	c.Close()
	jc.Close()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(SocketPath(7)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after Close: %v", err)
	}
}

func dial(t *testing.T, id int) *ControlClient {
	t.Helper()
	c, err := DialControl(id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestConnectDeviceErrors: the one-line reasons a device's server cannot
// be reached.
func TestConnectDeviceErrors(t *testing.T) {
	tempRunDir(t)
	if _, err := ConnectDevice(3); err == nil || err.Error() != "/dev/ublkb3: no such device served by ublkimg (no record in "+RecordDir+")" {
		t.Errorf("no record: %v", err)
	}
	// A record whose process is this test but whose socket is missing,
	// then one whose process is gone.
	if err := WriteRecord(Record{ID: 3, Image: "/x"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ConnectDevice(3); err == nil || !strings.Contains(err.Error(), "has no control socket") {
		t.Errorf("no socket: %v", err)
	}
	if err := WriteRecord(Record{ID: 3, Image: "/x", PID: 1 << 22, PIDStart: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := ConnectDevice(3); err == nil || !strings.Contains(err.Error(), "is not running") {
		t.Errorf("dead server: %v", err)
	}
}

// TestQueryStats: the figures query-stats reports are the requests the
// queues handled, by operation, with their latencies bucketed, and the
// format's counters.
func TestQueryStats(t *testing.T) {
	tempRunDir(t)
	path := filepath.Join(t.TempDir(), "img")
	err := coroutine.Run(func(co *coroutine.Co) error {
		if err := bdrv.Create(co, "qcow2", &bdrv.CreateRequest{Filename: path, Size: 16 << 20}); err != nil {
			return err
		}
		node, err := bdrv.Open(co, bdrv.Spec{Filename: path, Format: "qcow2", Cache: bdrv.CacheWriteback})
		if err != nil {
			return err
		}
		defer node.Close(co)
		d := &Device{node: node, info: DevInfo{ID: 4}, started: time.Now()}
		d.queues = []*queue{{dev: d, id: 0}, {dev: d, id: 1}}
		tg := &tag{buf: bdrv.AlignedBuffer(64<<10, 4096), iov: bdrv.IOVec{nil}}
		for i, req := range []struct {
			q    int
			op   uapi.IOOp
			secs uint32
		}{{0, uapi.IOOpWrite, 8}, {0, uapi.IOOpWrite, 128}, {1, uapi.IOOpRead, 8}, {1, uapi.IOOpFlush, 0}, {1, uapi.IOOpWriteZeroes, 16}} {
			desc := uapi.IODesc{OpFlags: uint32(req.op), NrSectors: req.secs, StartSector: uint64(i) * 256}
			if res := d.queues[req.q].handle(co, tg, &desc); res < 0 {
				t.Fatalf("request %d: %d", i, res)
			}
		}
		srv, err := ListenControl(4, d.ControlCommands(), t.Logf)
		if err != nil {
			return err
		}
		defer srv.Close()
		var s DeviceStats
		done := make(chan error, 1)
		// The client runs off the loop: its Call blocks.
		go func() {
			c, err := DialControl(4)
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			done <- c.Call(context.Background(), "query-stats", nil, &s, nil)
		}()
		co.Offload(func() { err = <-done })
		if err != nil {
			return err
		}
		w, r := s.Total(StatWrite), s.Total(StatRead)
		if w.Requests != 2 || w.Bytes != 136*512 || r.Requests != 1 || r.Bytes != 4096 ||
			s.Total(StatFlush).Requests != 1 || s.Total(StatWriteZeroes).Bytes != 16*512 {
			t.Errorf("totals: write %+v, read %+v", w, r)
		}
		if q1 := s.Queues[1].Op(StatRead); q1.Requests != 1 || s.Queues[0].Op(StatRead).Requests != 0 {
			t.Errorf("per queue: %+v", s.Queues)
		}
		var hist uint64
		for _, b := range w.Latency {
			hist += b.Count
		}
		if hist != 2 {
			t.Errorf("write latency histogram holds %d requests, want 2", hist)
		}
		counters := map[string]uint64{}
		for _, c := range s.FormatCounters {
			counters[c.Name] = c.Value
		}
		if s.Format != "qcow2" || counters["clusters_allocated"] == 0 || counters["l2_cache_hits"]+counters["l2_cache_misses"] == 0 {
			t.Errorf("format %s counters %v", s.Format, counters)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestHistogram: buckets are contiguous, within 12.5%, and percentiles
// land in the right bucket.
func TestHistogram(t *testing.T) {
	prev := uint64(0)
	for i := range HistBuckets - 1 {
		up := HistUpper(i)
		if up <= prev {
			t.Fatalf("bucket %d: upper %d not above %d", i, up, prev)
		}
		if histBucket(prev) != i || histBucket(up-1) != i {
			t.Fatalf("bucket %d [%d, %d): values map to %d and %d", i, prev, up, histBucket(prev), histBucket(up-1))
		}
		if i >= histSub && float64(up-prev)/float64(prev) > 0.125+1e-9 {
			t.Fatalf("bucket %d [%d, %d) wider than 12.5%%", i, prev, up)
		}
		prev = up
	}
	if histBucket(1<<62) != HistBuckets-1 {
		t.Errorf("a huge latency is not in the last bucket")
	}
	var s queueStats
	for v := uint64(1); v <= 1000; v++ {
		s.record(StatRead, 4096, 4096, v*1000) // 1 µs .. 1 ms
	}
	o := s.snapshot(0).Op(StatRead)
	for _, tc := range []struct {
		p    float64
		want uint64
	}{{0.5, 500_000}, {0.99, 990_000}, {0.999, 999_000}} {
		got := uint64(o.Percentile(tc.p))
		if got < tc.want || float64(got) > float64(tc.want)*1.125 {
			t.Errorf("p%v = %d, want %d..+12.5%%", tc.p*100, got, tc.want)
		}
	}
}
