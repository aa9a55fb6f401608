package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os/signal"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"ublkimg/ublk"
)

func init() { registerCommands(statsCommand) }

func statsCommand() *cli.Command {
	return &cli.Command{
		Name:      "stats",
		Usage:     "show the live figures of devices: requests, bytes, IOPS, throughput, latency",
		ArgsUsage: "[DEV|ID...]",
		Description: "Asks the server of each device (every device ublkimg serves when none is named)\n" +
			"for its figures, per queue and in total, by operation (read, write, flush,\n" +
			"discard, write-zeroes): requests, bytes, errors, IOPS, throughput and latency\n" +
			"percentiles (p50, p99, p99.9; the server's time, from the request's arrival to\n" +
			"the completion of its last I/O), the requests in flight, and the image format's\n" +
			"own counters (qcow2: metadata cache hits and misses, clusters allocated,\n" +
			"copy-on-write bytes). Without --interval the figures cover the server's life;\n" +
			"with --interval D they cover the next D.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Value: "human", Usage: "output `FORMAT`: human or json"},
			&cli.DurationFlag{Name: "interval", Usage: "measure over `DURATION` (e.g. 1s) instead of since the start"},
		},
		Action: statsAction,
	}
}

func statsAction(c *cli.Context) error {
	out := c.String("output")
	if out != "human" && out != "json" {
		return fmt.Errorf("--output must be human or json, not '%s'", out)
	}
	interval := c.Duration("interval")
	if interval < 0 || (c.IsSet("interval") && interval == 0) {
		return fmt.Errorf("invalid interval %v", interval)
	}
	ids, err := deviceArgs(c.Args().Slice())
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGINT, unix.SIGTERM)
	defer stop()
	reports, err := gatherStats(ctx, ids, interval)
	if err != nil {
		return err
	}
	if out == "json" {
		data, err := json.MarshalIndent(reports, "", "    ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(c.App.Writer, string(data))
		return err
	}
	return printStats(c.App.Writer, reports)
}

// deviceArgs parses device arguments; none means every device with a
// record whose server runs.
func deviceArgs(args []string) ([]int, error) {
	if len(args) > 0 {
		ids := make([]int, 0, len(args))
		for _, a := range args {
			id, err := ublk.ParseDeviceID(a)
			if err != nil {
				return nil, err
			}
			ids = append(ids, id)
		}
		return ids, nil
	}
	all, err := ublk.RecordIDs()
	if err != nil {
		return nil, err
	}
	var ids []int
	for _, id := range all {
		if r, err := ublk.ReadRecord(id); err == nil && r.ServerAlive() {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// queryStats asks device id's server for its figures on an open
// connection.
func queryStats(ctx context.Context, c *ublk.ControlClient) (ublk.DeviceStats, error) {
	var s ublk.DeviceStats
	err := c.Call(ctx, "query-stats", nil, &s, nil)
	return s, err
}

// gatherStats returns the report of each device: since its start, or over
// interval (two queries that far apart, the devices measured together).
func gatherStats(ctx context.Context, ids []int, interval time.Duration) ([]statsReport, error) {
	clients := make([]*ublk.ControlClient, len(ids))
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.Close()
			}
		}
	}()
	first := make([]ublk.DeviceStats, len(ids))
	for i, id := range ids {
		c, err := ublk.ConnectDevice(id)
		if err != nil {
			return nil, err
		}
		clients[i] = c
		if interval > 0 {
			if first[i], err = queryStats(ctx, c); err != nil {
				return nil, fmt.Errorf("/dev/ublkb%d: %w", id, err)
			}
		}
	}
	if interval > 0 {
		select {
		case <-time.After(interval):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	reports := make([]statsReport, 0, len(ids))
	for i, c := range clients {
		s, err := queryStats(ctx, c)
		if err != nil {
			return nil, fmt.Errorf("/dev/ublkb%d: %w", ids[i], err)
		}
		var prev *ublk.DeviceStats
		if interval > 0 {
			prev = &first[i]
		}
		reports = append(reports, makeReport(s, prev))
	}
	return reports, nil
}

// statsReport is one device in stats' output (its JSON is stats --output
// json).
type statsReport struct {
	ID     int    `json:"id"`
	Device string `json:"device"`
	Image  string `json:"image"`
	Format string `json:"format"`
	// PeriodNs is the time the figures cover: the interval, or the
	// server's uptime.
	PeriodNs uint64 `json:"period-ns"`
	InFlight uint64 `json:"in-flight"`
	// Total sums the queues, by operation name.
	Total  map[string]opReport `json:"total"`
	Queues []queueReport       `json:"queues"`
	// FormatCounters are the image format's figures (qcow2), over the
	// period.
	FormatCounters map[string]uint64 `json:"format-counters,omitempty"`
}

type queueReport struct {
	Queue    int                 `json:"queue"`
	InFlight uint64              `json:"in-flight"`
	Ops      map[string]opReport `json:"ops"`
}

// opReport is the figures of one operation over the period.
type opReport struct {
	Requests       uint64     `json:"requests"`
	Bytes          uint64     `json:"bytes"`
	Errors         uint64     `json:"errors"`
	IOPS           float64    `json:"iops"`
	BytesPerSecond float64    `json:"bytes-per-second"`
	Latency        latencyPct `json:"latency-ns"`
}

type latencyPct struct {
	P50  uint64 `json:"p50"`
	P99  uint64 `json:"p99"`
	P999 uint64 `json:"p99.9"`
}

func makeOpReport(o ublk.OpStats, period time.Duration) opReport {
	r := opReport{Requests: o.Requests, Bytes: o.Bytes, Errors: o.Errors,
		Latency: latencyPct{uint64(o.Percentile(0.5)), uint64(o.Percentile(0.99)), uint64(o.Percentile(0.999))}}
	if sec := period.Seconds(); sec > 0 {
		r.IOPS, r.BytesPerSecond = float64(o.Requests)/sec, float64(o.Bytes)/sec
	}
	return r
}

// makeReport turns s into a report, of the difference from prev when it is
// not nil.
func makeReport(s ublk.DeviceStats, prev *ublk.DeviceStats) statsReport {
	period := time.Duration(s.UptimeNs)
	if prev != nil {
		period = time.Duration(s.UptimeNs - prev.UptimeNs)
	}
	r := statsReport{ID: s.ID, Device: s.Device, Image: s.Image, Format: s.Format, PeriodNs: uint64(period),
		InFlight: s.InFlight(), Total: map[string]opReport{}}
	diff := func(cur ublk.OpStats, queue int, op ublk.StatOp) ublk.OpStats {
		if prev == nil {
			return cur
		}
		if queue < 0 {
			return cur.Sub(prev.Total(op))
		}
		for _, q := range prev.Queues {
			if q.Queue == queue {
				return cur.Sub(q.Op(op))
			}
		}
		return cur
	}
	for op := range ublk.NumStatOps {
		r.Total[op.String()] = makeOpReport(diff(s.Total(op), -1, op), period)
	}
	for _, q := range s.Queues {
		qr := queueReport{Queue: q.Queue, InFlight: q.InFlight, Ops: map[string]opReport{}}
		for op := range ublk.NumStatOps {
			qr.Ops[op.String()] = makeOpReport(diff(q.Op(op), q.Queue, op), period)
		}
		r.Queues = append(r.Queues, qr)
	}
	if len(s.FormatCounters) > 0 {
		r.FormatCounters = map[string]uint64{}
		old := map[string]uint64{}
		if prev != nil {
			for _, c := range prev.FormatCounters {
				old[c.Name] = c.Value
			}
		}
		for _, c := range s.FormatCounters {
			r.FormatCounters[c.Name] = c.Value - old[c.Name]
		}
	}
	return r
}

// printStats prints the reports as tables: for every device, the
// operations that had requests, in total and per queue.
func printStats(w io.Writer, reports []statsReport) error {
	for i, r := range reports {
		if i > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "%s: %s (%s), %d in flight, over %v\n", r.Device, orDash(r.Image), orDash(r.Format),
			r.InFlight, time.Duration(r.PeriodNs).Round(time.Millisecond))
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "QUEUE\tOP\tREQUESTS\tBYTES\tERRORS\tIOPS\tMiB/s\tP50\tP99\tP99.9\t")
		row := func(queue string, ops map[string]opReport) {
			for op := range ublk.NumStatOps {
				o := ops[op.String()]
				if o.Requests == 0 {
					continue
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%.0f\t%.1f\t%v\t%v\t%v\t\n", queue, op, o.Requests, o.Bytes, o.Errors,
					o.IOPS, o.BytesPerSecond/(1<<20), fmtLatency(o.Latency.P50), fmtLatency(o.Latency.P99),
					fmtLatency(o.Latency.P999))
			}
		}
		row("all", r.Total)
		if len(r.Queues) > 1 {
			for _, q := range r.Queues {
				row(fmt.Sprint(q.Queue), q.Ops)
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if len(r.FormatCounters) > 0 {
			var parts []string
			for _, k := range slices.Sorted(maps.Keys(r.FormatCounters)) {
				parts = append(parts, fmt.Sprintf("%s %d", strings.ReplaceAll(k, "_", "-"), r.FormatCounters[k]))
			}
			fmt.Fprintf(w, "%s: %s\n", r.Format, strings.Join(parts, ", "))
		}
	}
	return nil
}

// fmtLatency prints a latency with about three significant digits.
func fmtLatency(ns uint64) string {
	d := time.Duration(ns)
	switch {
	case d >= time.Second:
		d = d.Round(10 * time.Millisecond)
	case d >= time.Millisecond:
		d = d.Round(10 * time.Microsecond)
	case d >= time.Microsecond:
		d = d.Round(10 * time.Nanosecond)
	}
	return d.String()
}
