// Command attachtime measures, in the test VM, how long a block device
// takes to attach (the attach command until a 4 KiB O_DIRECT read of the
// new device succeeds) and to detach (the detach command until the server
// is gone), for ublkimg, the loop device and qemu-nbd. bench/vmbench runs
// it in the guest; it prints "KIND.attach_ms VALUE" and "KIND.detach_ms
// VALUE" lines (median of -n rounds) and the minimum as *_min_ms. Every
// round times each kind once, in the order given.
//
//	attachtime -n 10 -image /data/bench.raw ublk ublk-base loop nbd
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	n := flag.Int("n", 10, "rounds per device kind")
	image := flag.String("image", "", "raw image to attach")
	flag.Parse()
	if *image == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: attachtime -n N -image RAW ublk|ublk-NAME|loop|nbd...")
		os.Exit(2)
	}
	// Rounds alternate the kinds (each round times every kind once), so
	// that a slow spell of the host slows all of them alike.
	kinds := flag.Args()
	att := make([][]time.Duration, len(kinds))
	det := make([][]time.Duration, len(kinds))
	failed := make([]bool, len(kinds))
	for range *n {
		for i, kind := range kinds {
			if failed[i] {
				continue
			}
			a, d, err := round(kind, *image)
			if err != nil {
				fmt.Fprintf(os.Stderr, "attachtime: %s: %v\n", kind, err)
				failed[i] = true
				continue
			}
			att[i], det[i] = append(att[i], a), append(det[i], d)
		}
	}
	for i, kind := range kinds {
		report(kind+".attach", att[i])
		report(kind+".detach", det[i])
	}
	if slices.Contains(failed, true) {
		os.Exit(1)
	}
}

func report(name string, ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	slices.Sort(ds)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	fmt.Printf("%s_ms %.1f\n%s_min_ms %.1f\n", name, ms(ds[len(ds)/2]), name, ms(ds[0]))
}

// round attaches image as kind, waits until the device reads, detaches it
// and waits until its server is gone.
func round(kind, image string) (attach, detach time.Duration, err error) {
	t0 := time.Now()
	var dev string
	var detachCmd []string
	switch {
	case kind == "ublk" || strings.HasPrefix(kind, "ublk-"):
		// ublk-NAME: the binary ublkimg-NAME, another build put in the
		// guest for before/after figures (vmbench -base: ublkimg-base).
		cmd := "ublkimg" + strings.TrimPrefix(kind, "ublk")
		dev, err = output(cmd, "attach", "-f", "raw", "-t", "none", image)
		detachCmd = []string{cmd, "detach", dev}
	case kind == "loop":
		dev, err = output("losetup", "--direct-io=on", "-f", "--show", image)
		detachCmd = []string{"losetup", "-d", dev}
	case kind == "nbd":
		dev = "/dev/nbd0"
		_, err = output("qemu-nbd", "-f", "raw", "--cache=none", "--aio=io_uring", "-c", dev, image)
		detachCmd = []string{"qemu-nbd", "-d", dev}
	default:
		return 0, 0, fmt.Errorf("unknown kind %q", kind)
	}
	if err != nil {
		return 0, 0, err
	}
	if err := readable(dev); err != nil {
		return 0, 0, err
	}
	attach = time.Since(t0)
	t1 := time.Now()
	if _, err := output(detachCmd[0], detachCmd[1:]...); err != nil {
		return 0, 0, err
	}
	if kind == "nbd" || strings.HasPrefix(kind, "ublk") {
		// The next attach needs the server gone (nbd0 free, the ublk
		// device deleted).
		if err := gone(kind, dev); err != nil {
			return 0, 0, err
		}
	}
	return attach, time.Since(t1), nil
}

func output(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, ee.Stderr)
		}
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

// readable waits (polling every 100 µs, at most 10 s) until a 4 KiB
// O_DIRECT read at offset 0 of dev returns the whole block: nbd devices
// exist before their size is set.
func readable(dev string) error {
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	deadline := time.Now().Add(10 * time.Second)
	for {
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err == nil {
			var n int
			n, err = unix.Pread(fd, buf, 0)
			unix.Close(fd)
			if err == nil && n == len(buf) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not readable after 10 s: %v", dev, err)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// gone waits until the device's server has let it go: the ublk device's
// sysfs entry disappears, nbd0's pid file does.
func gone(kind, dev string) error {
	path := "/sys/block/" + strings.TrimPrefix(dev, "/dev/")
	if kind == "nbd" {
		path += "/pid"
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(path); err != nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still there 10 s after detach", path)
		}
		time.Sleep(100 * time.Microsecond)
	}
}
