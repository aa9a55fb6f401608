package main

import (
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestForegroundArgs(t *testing.T) {
	got := foregroundArgs([]string{"attach", "-f", "raw", "--id", "3", "a.img"}, "attach")
	want := []string{"attach", "--foreground", "-f", "raw", "--id", "3", "a.img"}
	if !slices.Equal(got, want) {
		t.Errorf("foregroundArgs = %q, want %q", got, want)
	}
}

func TestSdNotify(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	sdNotify("READY=1\nSTATUS=serving")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:n]); !strings.HasPrefix(got, "READY=1\n") {
		t.Errorf("notification %q", got)
	}
	t.Setenv("NOTIFY_SOCKET", "")
	sdNotify("READY=1") // no socket: nothing happens
}

func TestAttachUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ublkimg", "attach"}, "expecting exactly one image"},
		{[]string{"ublkimg", "attach", "-t", "bogus", "a.img"}, "invalid cache option"},
		{[]string{"ublkimg", "attach", "--discard", "maybe", "a.img"}, "invalid discard mode"},
		{[]string{"ublkimg", "attach", "--queues", "0", "a.img"}, "invalid queue count"},
		{[]string{"ublkimg", "detach"}, "expecting exactly one device"},
		{[]string{"ublkimg", "detach", "sda"}, "not a ublk device"},
		{[]string{"ublkimg", "list", "--output", "yaml"}, "--output must be human or json"},
	} {
		var out, errOut strings.Builder
		if code := run(tc.args, &out, &errOut); code != 1 {
			t.Errorf("%q: exit %d, want 1", tc.args, code)
		}
		msg := errOut.String()
		if !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 {
			t.Errorf("%q: stderr %q, want one line with %q", tc.args, msg, tc.want)
		}
	}
}
