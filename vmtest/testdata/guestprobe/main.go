// Command guestprobe checks, inside the test VM, that a static Go binary
// runs and can open /dev/ublk-control read-write, as ublkimg must.
package main

import (
	"fmt"
	"os"
	"syscall"
)

func main() {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		fmt.Fprintln(os.Stderr, "guestprobe: uname:", err)
		os.Exit(1)
	}
	release := make([]byte, 0, len(u.Release))
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		release = append(release, byte(c))
	}
	f, err := os.OpenFile("/dev/ublk-control", os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "guestprobe:", err)
		os.Exit(1)
	}
	f.Close()
	fmt.Printf("guestprobe: kernel %s, /dev/ublk-control opened read-write\n", release)
}
