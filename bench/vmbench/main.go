// Command vmbench compares ublkimg with the kernel's loop device and with
// qemu-nbd over nbd, side by side in one VM (vmtest: Debian's 6.12
// kernel under qemu), with fio: 4 KiB random reads and writes at depth 1 and
// 16, 128 KiB sequential reads and writes. It prints a table of IOPS,
// bandwidth and ratios with the servers' peak RSS, and writes results.json,
// results.dat and (with gnuplot) results.png to -out.
//
//	go run ./bench/vmbench [-devices ublk-raw,loop,nbd-raw] [-runtime 5] [-out bench/results]
//
// Device kinds: ublk-raw, ublk-qcow2, ublk-raw-usercopy (UBLK_F_USER_COPY),
// ublk-raw-q1 (one queue), loop (losetup --direct-io=on on the raw file),
// nbd-raw, nbd-qcow2 (qemu-nbd --cache=none, io_uring). Every device serves
// the same image file, on the guest's tmpfs, one after the other.
package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"ublkimg/vmtest"
)

//go:embed guest.sh
var guestScript string

// jobs are the fio runs: name:rw:bs:iodepth[:numjobs].
var jobs = []string{
	"seqwrite-128k:write:128k:4",
	"seqread-128k:read:128k:4",
	"randread-4k-qd1:randread:4k:1",
	"randread-4k-qd16:randread:4k:16",
	"randwrite-4k-qd1:randwrite:4k:1",
	"randwrite-4k-qd16:randwrite:4k:16",
	// Images in the guest's tmpfs (as in /tmp or /dev/shm of CI jobs and
	// sandboxes), which cannot do non-blocking I/O.
	"tmpfs-randread-4k-qd1:randread:4k:1",
	"tmpfs-randread-4k-qd16:randread:4k:16",
	"tmpfs-randwrite-4k-qd16:randwrite:4k:16",
}

// extraJobs run only when -jobs names them. The queue-scaling run:
//
//	go run ./bench/vmbench -cpus 4 -devices ublk-raw+q1,ublk-raw+q2,ublk-raw+q4,loop -jobs randread-4k-qd32-j4
var extraJobs = []string{
	"randread-4k-qd32-j4:randread:4k:32:4", // 4 fio jobs (threads), depth 32 each
	"tmpfs-seqread-128k:read:128k:4",
}

// Result is one fio run in results.json.
type Result struct {
	Device string  `json:"device"`
	Job    string  `json:"job"`
	IOPS   float64 `json:"iops"`
	BWKiB  float64 `json:"bw_kib"`
	LatUS  float64 `json:"lat_us"`
	// CPUUS is the server's CPU time per request in µs (user and system,
	// 10 ms resolution); 0 for the loop device, whose work is the kernel's.
	CPUUS float64 `json:"cpu_us"`
	// PassIOPS are the IOPS of every pass; the other fields are those of
	// the best pass.
	PassIOPS []float64 `json:"pass_iops"`
}

// Report is results.json.
type Report struct {
	Date     time.Time          `json:"date"`
	Kernel   string             `json:"kernel"`
	Accel    string             `json:"accel"`
	CPUs     int                `json:"cpus"`
	RuntimeS int                `json:"runtime_s"`
	Passes   int                `json:"passes"`
	Size     string             `json:"size"`
	Storage  string             `json:"storage"`
	Devices  []string           `json:"devices"`
	Jobs     []string           `json:"jobs"`
	Results  []Result           `json:"results"`
	RSSKiB   map[string]float64 `json:"rss_kib"`
	// RSSShmemKiB is the part of the server's RSS at the end of its jobs
	// that is tmpfs pages it maps: a raw image in tmpfs, read straight
	// from its pages, not memory of the server's own.
	RSSShmemKiB map[string]float64 `json:"rss_shmem_kib,omitempty"`
	// Attach holds the attach and detach times in ms by device kind:
	// KIND.attach_ms (median), KIND.attach_min_ms, KIND.detach_ms, ...
	Attach    map[string]float64 `json:"attach_ms,omitempty"`
	Ratios    map[string]float64 `json:"ratios"`
	Failures  []string           `json:"failures,omitempty"`
	HostLoad  string             `json:"host_loadavg"`
	ElapsedS  float64            `json:"elapsed_s"`
	GoalsMet  map[string]bool    `json:"goals"`
	GoalNotes []string           `json:"goal_notes"`
}

func main() {
	devices := flag.String("devices", "ublk-raw,loop,nbd-raw", "comma-separated device kinds to compare")
	runtime := flag.Int("runtime", 5, "seconds per fio run (plus 1 s ramp)")
	size := flag.String("size", "256M", "image size and fio region")
	out := flag.String("out", "bench/results", "output directory")
	cpus := flag.Int("cpus", 2, "guest vCPUs")
	cli := flag.String("ublkimg", "ublkimg/cmd/ublkimg", "package of the ublkimg command")
	only := flag.String("jobs", "", "comma-separated job names to run (default: all; none: only the attach and detach times)")
	storage := flag.String("storage", "disk", "where the images live: disk (ext4 on a virtio disk) or tmpfs")
	passes := flag.Int("passes", 2, "runs of every device and job; the best counts")
	attach := flag.Int("attach", 10, "rounds of attach/detach timing per device kind (ublk, loop, nbd); 0: none")
	base := flag.String("base", "", "a static ublkimg binary (CGO_ENABLED=0) to compare with: devices ublk-*+base run it")
	flag.Parse()
	if *only != "" {
		var keep []string
		for _, j := range append(jobs, extraJobs...) {
			for _, name := range strings.Split(*only, ",") {
				if strings.HasPrefix(j, name+":") {
					keep = append(keep, j)
				}
			}
		}
		jobs = keep
	}
	if *storage != "disk" && *storage != "tmpfs" {
		fmt.Fprintln(os.Stderr, "vmbench: -storage must be disk or tmpfs")
		os.Exit(2)
	}
	if err := run(*devices, *runtime, *passes, *size, *storage, *out, *cpus, *cli, *base, *attach); err != nil {
		fmt.Fprintln(os.Stderr, "vmbench:", err)
		os.Exit(1)
	}
}

func run(devices string, runtime, passes int, size, storage, out string, cpus int, cliPkg, base string, attach int) error {
	ctx := context.Background()
	devs := strings.Split(devices, ",")
	start := time.Now()
	bin, err := vmtest.GoBinary(ctx, cliPkg)
	if err != nil {
		return err
	}
	timer, err := vmtest.GoBinary(ctx, "ublkimg/bench/attachtime")
	if err != nil {
		return err
	}
	files := []vmtest.File{bin, timer}
	if base != "" {
		files = append(files, vmtest.File{Src: base, Dst: "/usr/local/bin/ublkimg-base", Mode: 0o755})
	}
	for _, t := range []string{"fio", "losetup", "qemu-nbd", "qemu-img", "mke2fs"} {
		f, err := vmtest.Tool(t)
		if err != nil {
			return err
		}
		files = append(files, f)
	}
	files = append(files, vmtest.HostFile("/etc/mke2fs.conf"))
	modules := []string{"ublk_drv", "loop", "nbd"}
	var qemuArgs []string
	if storage == "disk" {
		disk, err := os.CreateTemp("", "vmbench-disk-")
		if err != nil {
			return err
		}
		defer os.Remove(disk.Name())
		disk.Close()
		// Room for the raw image, a fully allocated qcow2 copy and ext4.
		if err := os.Truncate(disk.Name(), 3<<30); err != nil {
			return err
		}
		qemuArgs = []string{"-drive", "file=" + disk.Name() + ",format=raw,if=virtio,cache=unsafe,aio=threads"}
		modules = append(modules, "virtio_blk", "ext4")
	}
	kinds := "ublk loop nbd"
	if base != "" {
		kinds = "ublk ublk-base loop nbd"
	}
	script := fmt.Sprintf("DEVICES=%q RUNTIME=%d PASSES=%d SIZE=%s JOBS=%q STORAGE=%s ATTACH=%d ATTACH_KINDS=%q\n%s",
		strings.Join(devs, " "), runtime, passes, size, strings.Join(jobs, " "), storage, attach, kinds, guestScript)
	perRun := time.Duration(passes*len(devs)*len(jobs)*(runtime+4)+attach*4)*time.Second + 4*time.Minute
	res, err := vmtest.Run(ctx, vmtest.RunOptions{
		Script:   script,
		Files:    files,
		Modules:  modules,
		QemuArgs: qemuArgs,
		CPUs:     cpus,
		Memory:   3072,
		Timeout:  perRun,
		Console:  os.Stderr,
		Logf:     func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) },
	})
	if res == nil {
		return err
	}
	rep := &Report{
		Date: time.Now().UTC().Truncate(time.Second), Kernel: res.Kernel, Accel: res.Accel, CPUs: cpus,
		RuntimeS: runtime, Passes: passes, Size: size, Storage: storage, Devices: devs, RSSKiB: map[string]float64{},
		RSSShmemKiB: map[string]float64{},
		Ratios:      map[string]float64{}, GoalsMet: map[string]bool{}, Attach: map[string]float64{},
	}
	for k := range res.Metrics {
		if name, ok := strings.CutPrefix(k, "attach."); ok {
			rep.Attach[name], _ = strconv.ParseFloat(res.Metrics[k], 64)
		}
	}
	if load, e := os.ReadFile("/proc/loadavg"); e == nil {
		rep.HostLoad = strings.TrimSpace(string(load))
	}
	if err != nil {
		rep.Failures = append(rep.Failures, err.Error())
	}
	for _, j := range jobs {
		rep.Jobs = append(rep.Jobs, strings.SplitN(j, ":", 2)[0])
	}
	get := func(k string) (float64, bool) {
		v, ok := res.Metrics[k]
		if !ok {
			return 0, false
		}
		f, err := strconv.ParseFloat(v, 64)
		return f, err == nil
	}
	for _, d := range devs {
		for _, j := range rep.Jobs {
			var best Result
			for p := 1; p <= passes; p++ {
				at := fmt.Sprintf("@%d", p)
				iops, ok := get(d + "." + j + ".iops" + at)
				if !ok {
					continue
				}
				best.PassIOPS = append(best.PassIOPS, iops)
				if iops > best.IOPS {
					best.IOPS = iops
					best.BWKiB, _ = get(d + "." + j + ".bw_kib" + at)
					best.LatUS, _ = get(d + "." + j + ".lat_us" + at)
					best.CPUUS, _ = get(d + "." + j + ".cpu_us" + at)
				}
			}
			if len(best.PassIOPS) > 0 {
				best.Device, best.Job = d, j
				rep.Results = append(rep.Results, best)
			}
		}
		for p := 1; p <= passes; p++ {
			if r, ok := get(fmt.Sprintf("%s.rss_kib@%d", d, p)); ok && r > rep.RSSKiB[d] {
				rep.RSSKiB[d] = r
			}
			if r, ok := get(fmt.Sprintf("%s.rss_shmem_kib@%d", d, p)); ok && r > rep.RSSShmemKiB[d] {
				rep.RSSShmemKiB[d] = r
			}
		}
	}
	rep.ElapsedS = time.Since(start).Seconds()
	ratios(rep)
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	data, _ := json.MarshalIndent(rep, "", "  ")
	if err := os.WriteFile(filepath.Join(out, "results.json"), append(data, '\n'), 0o644); err != nil {
		return err
	}
	printTable(rep)
	if len(rep.Results) > 0 { // none with -jobs none: attach times only
		if err := chart(rep, out); err != nil {
			fmt.Fprintln(os.Stderr, "vmbench: chart:", err)
		}
	}
	if len(rep.Failures) > 0 {
		return errors.New(strings.Join(rep.Failures, "; "))
	}
	return nil
}

func (r *Report) iops(dev, job string) float64 {
	for _, x := range r.Results {
		if x.Device == dev && x.Job == job {
			return x.IOPS
		}
	}
	return 0
}

// ratios computes ublk/peer IOPS ratios and checks the goals: raw >= 0.9x
// loop on 4 KiB random reads, qcow2 >= 2x qemu-nbd on 4 KiB random I/O,
// peak RSS <= 64 MiB per device.
func ratios(r *Report) {
	pairs := [][2]string{}
	for _, p := range ratioPairs {
		a, b, _ := strings.Cut(p, "/")
		pairs = append(pairs, [2]string{a, b})
	}
	for _, p := range pairs {
		for _, j := range r.Jobs {
			a, b := r.iops(p[0], j), r.iops(p[1], j)
			if a > 0 && b > 0 {
				r.Ratios[p[0]+"/"+p[1]+"."+j] = a / b
			}
		}
	}
	goal := func(name string, ok bool, note string) {
		r.GoalsMet[name] = ok
		r.GoalNotes = append(r.GoalNotes, fmt.Sprintf("%s: %v (%s)", name, ok, note))
	}
	for _, j := range []string{"randread-4k-qd1", "randread-4k-qd16"} {
		if v, ok := r.Ratios["ublk-raw/loop."+j]; ok {
			goal("raw>=0.9*loop "+j, v >= 0.9, fmt.Sprintf("%.2fx", v))
		}
	}
	for _, j := range []string{"tmpfs-randread-4k-qd16", "tmpfs-randwrite-4k-qd16"} {
		if v, ok := r.Ratios["ublk-raw/loop."+j]; ok {
			goal("raw>=0.8*loop "+j, v >= 0.8, fmt.Sprintf("%.2fx", v))
		}
		if v, ok := r.Ratios["ublk-qcow2/nbd-qcow2."+j]; ok {
			goal("qcow2>nbd "+j, v > 1, fmt.Sprintf("%.2fx", v))
		}
	}
	for _, j := range []string{"randread-4k-qd1", "randread-4k-qd16", "randwrite-4k-qd1", "randwrite-4k-qd16"} {
		if v, ok := r.Ratios["ublk-qcow2/nbd-qcow2."+j]; ok {
			goal("qcow2>=2*nbd "+j, v >= 2, fmt.Sprintf("%.2fx", v))
		}
	}
	// The tmpfs pages a server maps are the image's own memory, not the
	// server's: they do not count against the goal.
	for d, kib := range r.RSSKiB {
		if strings.HasPrefix(d, "ublk") {
			shm := r.RSSShmemKiB[d]
			goal("rss<=64MiB "+d, kib-shm <= 64<<10, fmt.Sprintf("%.1f MiB, of which %.1f MiB the image's tmpfs pages", kib/1024, shm/1024))
		}
	}
}

func printTable(r *Report) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Printf("\n%s, %s, %d vCPUs, best of %d runs of %d s, %s image on %s (host load %s)\n",
		r.Kernel, r.Accel, r.CPUs, r.Passes, r.RuntimeS, r.Size, r.Storage, r.HostLoad)
	fmt.Fprint(tw, "job\t")
	for _, d := range r.Devices {
		fmt.Fprintf(tw, "%s IOPS\t%s MiB/s\t", d, d)
	}
	for _, k := range ratioColumns(r) {
		fmt.Fprintf(tw, "%s\t", k)
	}
	fmt.Fprintln(tw)
	for _, j := range r.Jobs {
		fmt.Fprintf(tw, "%s\t", j)
		for _, d := range r.Devices {
			found := false
			for _, x := range r.Results {
				if x.Device == d && x.Job == j {
					fmt.Fprintf(tw, "%.0f\t%.1f\t", x.IOPS, x.BWKiB/1024)
					found = true
				}
			}
			if !found {
				fmt.Fprint(tw, "-\t-\t")
			}
		}
		for _, k := range ratioColumns(r) {
			if v, ok := r.Ratios[k+"."+j]; ok {
				fmt.Fprintf(tw, "%.2fx\t", v)
			} else {
				fmt.Fprint(tw, "-\t")
			}
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	fmt.Println("\nserver CPU time per request (µs, user+system):")
	tw = tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "job\t")
	for _, d := range r.Devices {
		fmt.Fprintf(tw, "%s\t", d)
	}
	fmt.Fprintln(tw)
	for _, j := range r.Jobs {
		fmt.Fprintf(tw, "%s\t", j)
		for _, d := range r.Devices {
			v := "-"
			for _, x := range r.Results {
				if x.Device == d && x.Job == j && x.CPUUS > 0 {
					v = fmt.Sprintf("%.1f", x.CPUUS)
				}
			}
			fmt.Fprintf(tw, "%s\t", v)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	for _, d := range r.Devices {
		if v, ok := r.RSSKiB[d]; ok {
			fmt.Printf("peak RSS %s: %.1f MiB\n", d, v/1024)
		}
	}
	if len(r.Attach) > 0 {
		fmt.Println("\nattach (command to first 4 KiB O_DIRECT read) and detach (command to server gone), ms, median (min):")
		for _, k := range []string{"ublk", "ublk-base", "loop", "nbd"} {
			if v, ok := r.Attach[k+".attach_ms"]; ok {
				fmt.Printf("  %-10s attach %7.1f (%.1f)  detach %7.1f (%.1f)\n", k, v, r.Attach[k+".attach_min_ms"],
					r.Attach[k+".detach_ms"], r.Attach[k+".detach_min_ms"])
			}
		}
	}
	for _, n := range r.GoalNotes {
		fmt.Println("goal", n)
	}
}

// ratioPairs are the ratios computed when both devices ran, in the table's
// order. The +base devices run the -base binary: the change against it.
var ratioPairs = []string{"ublk-raw/loop", "ublk-raw/nbd-raw", "ublk-qcow2/nbd-qcow2",
	"ublk-raw-usercopy/ublk-raw", "ublk-raw-q1/ublk-raw", "ublk-raw/ublk-raw+base", "ublk-qcow2/ublk-qcow2+base",
	"ublk-raw+q1/loop", "ublk-raw+q2/loop", "ublk-raw+q4/loop",
	"ublk-raw+usercopy/loop", "ublk-raw+usercopy/ublk-raw", "ublk-raw+usercopy/ublk-raw+usercopy+base"}

// ratioColumns lists the ratio pairs present in r, in a fixed order.
func ratioColumns(r *Report) []string {
	var cols []string
	for _, p := range ratioPairs {
		for k := range r.Ratios {
			if strings.HasPrefix(k, p+".") {
				cols = append(cols, p)
				break
			}
		}
	}
	return cols
}

// chart writes results.dat and a gnuplot script, and renders results.png
// when gnuplot is installed (Debian: gnuplot-nox).
func chart(r *Report, out string) error {
	var dat strings.Builder
	fmt.Fprint(&dat, "job")
	for _, d := range r.Devices {
		fmt.Fprintf(&dat, " %s", d)
	}
	fmt.Fprintln(&dat)
	for _, j := range r.Jobs {
		fmt.Fprint(&dat, j)
		for _, d := range r.Devices {
			fmt.Fprintf(&dat, " %.0f", r.iops(d, j))
		}
		fmt.Fprintln(&dat)
	}
	datPath := filepath.Join(out, "results.dat")
	if err := os.WriteFile(datPath, []byte(dat.String()), 0o644); err != nil {
		return err
	}
	gp := fmt.Sprintf(`set terminal pngcairo size 1300,600 noenhanced
set output %q
set title "IOPS by device (%s, %s, %d vCPUs, %d s runs)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel "IOPS (log)"
set xtics rotate by -20
set key outside right top
set grid ytics
plot for [i=2:%d] %q using i:xtic(1) title columnheader(i)
`, filepath.Join(out, "results.png"), r.Kernel, r.Accel, r.CPUs, r.RuntimeS, len(r.Devices)+1, datPath)
	gpPath := filepath.Join(out, "results.gp")
	if err := os.WriteFile(gpPath, []byte(gp), 0o644); err != nil {
		return err
	}
	if _, err := exec.LookPath("gnuplot"); err != nil {
		return errors.New("gnuplot not installed (apt-get install gnuplot-nox): results.png not drawn")
	}
	if msg, err := exec.Command("gnuplot", gpPath).CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %v: %s", err, msg)
	}
	return nil
}
