// Command vmdemo runs the demo script (scripts/demo.sh) inside the test VM
// (vmtest: Debian's 6.12 kernel with ublk_drv under qemu) and streams
// what it prints: `make demo` on a machine whose kernel has no ublk.
//
//	go run ./cmd/vmdemo scripts/demo.sh
package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"

	"ublkimg/vmtest"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: vmdemo SCRIPT")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(path string) error {
	script, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	fmt.Println("demo: building ublkimg and the VM's initramfs (the first run downloads Debian's kernel package)")
	bin, err := vmtest.GoBinary(ctx, "ublkimg/cmd/ublkimg")
	if err != nil {
		return err
	}
	files := []vmtest.File{bin, vmtest.HostFile("/etc/mke2fs.conf")}
	for _, t := range []string{"mkfs.ext4", "qemu-img"} {
		if f, err := vmtest.Tool(t); err == nil {
			files = append(files, f)
		}
	}
	out := &filter{}
	_, err = vmtest.Run(ctx, vmtest.RunOptions{
		Script:  "UBLKIMG_DEMO_GUEST=1\n" + string(script),
		Files:   files,
		Modules: []string{"ublk_drv", "ext4"},
		Console: out,
		Logf:    func(format string, args ...any) { fmt.Printf("demo: "+format+"\n", args...) },
	})
	out.flush()
	return err
}

// filter passes the guest's console through, minus the harness's protocol
// lines ("@@ ...") and the kernel's messages ("[    1.234] ...").
type filter struct{ buf bytes.Buffer }

func (f *filter) Write(p []byte) (int, error) {
	f.buf.Write(p)
	for {
		line, err := f.buf.ReadString('\n')
		if err != nil {
			f.buf.WriteString(line)
			return len(p), nil
		}
		f.print(line)
	}
}

func (f *filter) flush() { f.print(f.buf.String()) }

func (f *filter) print(line string) {
	t := strings.TrimSpace(line)
	if t == "" && !strings.HasSuffix(line, "\n") {
		return
	}
	if strings.HasPrefix(t, "@@ ") || strings.HasPrefix(t, "[") && strings.Contains(t, "] ") && len(t) > 2 && (t[1] == ' ' || t[1] >= '0' && t[1] <= '9') {
		return
	}
	os.Stdout.WriteString(line)
}
