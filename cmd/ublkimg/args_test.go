package main

import (
	"strings"
	"testing"
)

func TestGetoptArgs(t *testing.T) {
	bench, info := benchCommand(), infoCommand()
	for _, tc := range []struct {
		args []string
		want string // joined with spaces, or "error: message"
	}{
		{[]string{"-c", "10", "img"}, "-c 10 -- img"},
		{[]string{"img", "-c", "10"}, "-c 10 -- img"},
		{[]string{"-c10", "-d8", "img"}, "-c 10 -d 8 -- img"},
		{[]string{"-wqc", "5", "img"}, "-w -q -c 5 -- img"},
		{[]string{"-wqc5", "img"}, "-w -q -c 5 -- img"},
		{[]string{"--pattern=7", "--no-drain", "img"}, "--pattern 7 --no-drain -- img"},
		{[]string{"--pattern", "7", "img"}, "--pattern 7 -- img"},
		{[]string{"--pat", "7", "--force", "img"}, "--pattern 7 --force-share -- img"},
		{[]string{"-o", "-5", "img"}, "-o -5 -- img"},
		{[]string{"--", "-img"}, "-- -img"},
		{[]string{"-Z", "img"}, "error: unrecognized option '-Z'"},
		{[]string{"-wZ", "img"}, "error: unrecognized option '-wZ'"},
		{[]string{"--bogus", "img"}, "error: unrecognized option '--bogus'"},
		{[]string{"--f", "img"}, "error: option '--f' is ambiguous"},
		{[]string{"img", "-c"}, "error: missing argument for option '-c'"},
		{[]string{"img", "--pattern"}, "error: missing argument for option '--pattern'"},
		{[]string{"--no-drain=1", "img"}, "error: option '--no-drain' doesn't allow an argument"},
		{[]string{"-h"}, "-h --"},
	} {
		got, err := getoptArgs(bench, tc.args)
		s := strings.Join(got, " ")
		if err != nil {
			s = "error: " + err.Error()
		}
		if s != tc.want {
			t.Errorf("bench %q: %q, want %q", tc.args, s, tc.want)
		}
	}
	got, err := getoptArgs(info, []string{"a.img", "--output", "json", "--back"})
	if s := strings.Join(got, " "); err != nil || s != "--output json --backing-chain -- a.img" {
		t.Errorf("info: %q, %v", s, err)
	}
}

// TestDeviceVerbArgs: the device verbs take options after their operands,
// as getopt permutes them, through the same normalisation as the image
// verbs.
func TestDeviceVerbArgs(t *testing.T) {
	app := newApp(nil, nil)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "a.img", "--queues", "2"}, "attach --queues 2 -- a.img"},
		{[]string{"attach", "a.img", "--queues=2", "-f", "raw", "--recovery"}, "attach --queues 2 -f raw --recovery -- a.img"},
		{[]string{"attach", "--read-only", "a.img", "-tnone"}, "attach --read-only -t none -- a.img"},
		{[]string{"attach", "a.img", "--rec"}, "attach --recovery -- a.img"},
		{[]string{"detach", "3", "--force"}, "detach --force -- 3"},
		{[]string{"list", "--output", "json"}, "list --output json --"},
		{[]string{"recover", "0", "a.img", "--foreground"}, "recover --foreground -- 0 a.img"},
		{[]string{"attach", "a.img", "--bogus"}, "error: unrecognized option '--bogus'"},
		{[]string{"recover", "0", "--id", "1"}, "error: unrecognized option '--id'"},
	} {
		got, err := normalize(app, append([]string{"ublkimg"}, tc.args...))
		s := strings.Join(got[min(1, len(got)):], " ")
		if err != nil {
			s = "error: " + err.Error()
		}
		if s != tc.want {
			t.Errorf("%q: %q, want %q", tc.args, s, tc.want)
		}
	}
}
