package main

import (
	"encoding/json"
	"fmt"
	"strconv"
	"text/tabwriter"

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
			fmt.Fprintln(tw, "ID\tDEVICE\tIMAGE\tFORMAT\tQUEUES\tDEPTH\tSTATE\tPID")
			for _, d := range devs {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n", d.ID, d.Device, orDash(d.Image),
					orDash(d.Format), d.Queues, d.Depth, d.State, pidText(d.PID))
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
}

func printListJSON(c *cli.Context, devs []ublk.Status) error {
	entries := make([]listEntry, 0, len(devs))
	for _, d := range devs {
		entries = append(entries, listEntry{Record: d.Record, State: d.State, Server: d.ServerRunning})
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
