package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"ublkimg/ublk"
)

func listCommand() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list ublk devices and the images they serve",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Value: "human", Usage: "output `FORMAT`: human or json"},
		},
		Action: func(c *cli.Context) error {
			out := c.String("output")
			if out != "human" && out != "json" {
				return fmt.Errorf("--output must be human or json, not '%s'", out)
			}
			ctrl, err := ublk.OpenCtrl()
			if err != nil {
				return err
			}
			defer ctrl.Close()
			devs, err := ublk.ListDevices(ctrl)
			if err != nil {
				return err
			}
			if out == "json" {
				return printListJSON(c, devs)
			}
			if len(devs) == 0 {
				return nil
			}
			tw := tabwriter.NewWriter(c.App.Writer, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tDEVICE\tIMAGE\tFORMAT\tQUEUES\tDEPTH\tSTATE\tPID\tREADS\tWRITES\tINFLIGHT")
			for _, d := range devs {
				reads, writes, inFlight := "-", "-", "-"
				if l := liveFigures(d); l != nil {
					reads, writes, inFlight = strconv.FormatUint(l.Reads, 10), strconv.FormatUint(l.Writes, 10), strconv.FormatUint(l.InFlight, 10)
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", d.ID, d.Device, orDash(d.Image),
					orDash(d.Format), d.Queues, d.Depth, d.State, pidText(d.PID), reads, writes, inFlight)
			}
			return tw.Flush()
		},
	}
}

// listEntry is one device in `list --output json`.
type listEntry struct {
	ublk.Record
	State  string `json:"state"`
	Server bool   `json:"server-running"`
	// Live are the figures its server reports, when it runs.
	Live *live `json:"live,omitempty"`
}

// live are the figures list shows, since the server started.
type live struct {
	Reads        uint64 `json:"reads"`
	Writes       uint64 `json:"writes"`
	BytesRead    uint64 `json:"bytes-read"`
	BytesWritten uint64 `json:"bytes-written"`
	Errors       uint64 `json:"errors"`
	InFlight     uint64 `json:"in-flight"`
}

// listTimeout bounds the wait for a server's figures: list never hangs on
// a server that does not answer.
const listTimeout = time.Second

// liveFigures asks the server of d for its figures, nil when it has none
// to give (no server, no answer).
func liveFigures(d ublk.Status) *live {
	if !d.HasRecord || !d.ServerRunning {
		return nil
	}
	c, err := ublk.DialControl(d.ID)
	if err != nil {
		return nil
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), listTimeout)
	defer cancel()
	s, err := queryStats(ctx, c)
	if err != nil {
		return nil
	}
	r, w := s.Total(ublk.StatRead), s.Total(ublk.StatWrite)
	l := &live{Reads: r.Requests, Writes: w.Requests, BytesRead: r.Bytes, BytesWritten: w.Bytes, InFlight: s.InFlight()}
	for op := range ublk.NumStatOps {
		l.Errors += s.Total(op).Errors
	}
	return l
}

func printListJSON(c *cli.Context, devs []ublk.Status) error {
	entries := make([]listEntry, 0, len(devs))
	for _, d := range devs {
		entries = append(entries, listEntry{Record: d.Record, State: d.State, Server: d.ServerRunning, Live: liveFigures(d)})
	}
	data, err := json.MarshalIndent(entries, "", "    ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(c.App.Writer, string(data))
	return err
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func pidText(pid int) string {
	if pid <= 0 {
		return "-"
	}
	return strconv.Itoa(pid)
}
