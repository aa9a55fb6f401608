package vmtest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"
)

//go:embed guest/init.sh
var initScript []byte

//go:embed guest/lib.sh
var libScript []byte

// guestApplets are the busybox applets guest/init.sh and guest/lib.sh use.
var guestApplets = []string{
	"cut", "dmesg", "insmod", "mkdir", "mount", "poweroff", "sed", "sync", "tail", "uname",
}

// initramfsFormat changes whenever the layout BuildInitramfs writes changes,
// so that cached images built by older code are not reused.
const initramfsFormat = "ublkimg-vm-initramfs-2"

// How many cached initramfs images and Go binaries are kept.
const (
	keepInitramfs = 4
	keepBinaries  = 8
)

// File is a file to put into the guest's initramfs.
type File struct {
	// Src is the host file to copy; symlinks are followed. Empty when Data
	// is used.
	Src string
	// Dst is the absolute path in the guest. Empty means Src.
	Dst string
	// Data is the file's content when Src is empty.
	Data []byte
	// Mode holds the permission bits; 0 means Src's, or 0o644 for Data.
	Mode fs.FileMode
}

// HostFile is the host file path, at the same path in the guest.
func HostFile(path string) File { return File{Src: path} }

// DataFile is a guest file at dst with the given content and permissions.
func DataFile(dst string, data []byte, mode fs.FileMode) File {
	return File{Dst: dst, Data: data, Mode: mode}
}

// Tool finds the named program on the host (in $PATH, then in the sbin and
// bin directories, which a non-root $PATH may lack) and returns it as a File
// at the same path in the guest. Dynamic programs bring their libraries
// along when the initramfs is built.
func Tool(name string) (File, error) {
	p, err := lookTool(name)
	if err != nil {
		return File{}, err
	}
	return File{Src: p}, nil
}

func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, dir := range []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("vm: %s not found on the host (run scripts/deps.sh)", name)
}

// GoBinary builds the Go package pkg (an import path or a directory, as for
// `go build`) without cgo (CGO_ENABLED=0, -trimpath): a static binary, or,
// for a program that loads C libraries at run time (ublkimg's rbd driver,
// through purego), one linked against the C library alone, whose libraries
// the initramfs brings (see InitramfsOptions.Files). It returns it
// as a File at /usr/local/bin/<last element of pkg>. Binaries are stored in
// the cache by content, so an unchanged build reuses the cached initramfs.
func GoBinary(ctx context.Context, pkg string) (File, error) {
	return goBinary(ctx, pkg, false)
}

// GoRaceBinary is GoBinary with the race detector (go build -race). The
// race runtime needs cgo, so the binary is dynamic: the initramfs brings
// the C library it links along. In the guest, GORACE=log_path=... makes
// every process write its reports to a file the scenario can check.
func GoRaceBinary(ctx context.Context, pkg string) (File, error) {
	return goBinary(ctx, pkg, true)
}

func goBinary(ctx context.Context, pkg string, race bool) (File, error) {
	cache, err := CacheDir()
	if err != nil {
		return File{}, err
	}
	name := path.Base(filepath.ToSlash(pkg))
	bin := filepath.Join(cache, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return File{}, fmt.Errorf("vm: %w", err)
	}
	tmp, err := os.MkdirTemp(bin, ".build-")
	if err != nil {
		return File{}, fmt.Errorf("vm: %w", err)
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, name)
	args, cgo := []string{"build", "-trimpath", "-o", out}, "CGO_ENABLED=0"
	if race {
		args, cgo = append(args, "-race"), "CGO_ENABLED=1"
	}
	cmd := exec.CommandContext(ctx, "go", append(args, pkg)...)
	cmd.Env = append(os.Environ(), cgo)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return File{}, fmt.Errorf("vm: go build %s: %w\n%s", pkg, err, msg)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return File{}, fmt.Errorf("vm: %w", err)
	}
	sum := sha256.Sum256(data)
	dir := filepath.Join(bin, hex.EncodeToString(sum[:8]))
	dst := filepath.Join(dir, name)
	if _, err := os.Stat(dst); err == nil {
		now := time.Now()
		os.Chtimes(dir, now, now) // most recently used, for pruning
	} else {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return File{}, fmt.Errorf("vm: %w", err)
		}
		if err := writeFileAtomic(dst, data, 0o755); err != nil {
			return File{}, err
		}
		pruneCache(bin, dir, keepBinaries)
	}
	return File{Src: dst, Dst: "/usr/local/bin/" + name}, nil
}

// InitramfsOptions says what goes into an initramfs.
type InitramfsOptions struct {
	// Kernel provides the modules. Required when Modules is not empty.
	Kernel *KernelFiles
	// Modules are loaded by /init in this order, after their dependencies
	// (see KernelFiles.Modules). Built-in ones are skipped.
	Modules []string
	// Files are added on top of busybox and /init. Dynamic ELF programs
	// and libraries bring the shared libraries `ldd` lists and the ELF
	// interpreter. A file whose base name is a busybox applet replaces the
	// applet.
	Files []File
	// Gzip compresses the archive. Uncompressed is the default: the guest
	// unpacks it faster under software emulation than it inflates gzip.
	Gzip bool
	// CacheDir overrides CacheDir().
	CacheDir string
}

// entry is one file of the archive being built.
type entry struct {
	src  string // host path, or "" for data
	data []byte
	mode fs.FileMode
	link string // symlink target when set
}

// BuildInitramfs builds a newc cpio archive holding busybox (from the
// busybox-static package) with a symlink for every applet, /init (which
// mounts /proc, /sys, /dev, /tmp, loads the modules and runs /scenario.sh),
// the modules and the caller's files with their libraries. /scenario.sh is
// not part of it: Run appends it as a second archive.
//
// Images are cached under CacheDir()/initramfs by a hash of their inputs
// (host files by path, size and modification time), so a rebuild happens
// only when something changed; the newest few are kept.
func BuildInitramfs(ctx context.Context, opts InitramfsOptions) (string, error) {
	entries := map[string]*entry{}
	add := func(dst string, e *entry) error {
		if !path.IsAbs(dst) {
			return fmt.Errorf("vm: guest path %q is not absolute", dst)
		}
		entries[path.Clean(dst)] = e
		return nil
	}
	bb, err := findBusybox()
	if err != nil {
		return "", err
	}
	// /bin/sh is dash, not busybox ash: ash runs its applets in preference
	// to $PATH, which would shadow the callers' mke2fs or losetup.
	dash, err := lookTool("dash")
	if err != nil {
		return "", err
	}
	files := append([]File{{Src: bb, Dst: "/bin/busybox"}, {Src: dash, Dst: "/bin/sh"}}, opts.Files...)
	libs := map[string]bool{}
	provided := map[string]bool{} // base names of executables, which win over applets
	for _, f := range files {
		dst := f.Dst
		if dst == "" {
			dst = f.Src
		}
		e := &entry{src: f.Src, data: f.Data, mode: f.Mode}
		if f.Src != "" {
			fi, err := os.Stat(f.Src)
			if err != nil {
				return "", fmt.Errorf("vm: %w", err)
			}
			if e.mode == 0 {
				e.mode = fi.Mode().Perm()
			}
			needs, err := sharedLibraries(ctx, f.Src)
			if err != nil {
				return "", err
			}
			for _, l := range needs {
				libs[l] = true
			}
		} else if e.mode == 0 {
			e.mode = 0o644
		}
		if e.mode&0o111 != 0 {
			provided[path.Base(dst)] = true
		}
		if err := add(dst, e); err != nil {
			return "", err
		}
	}
	for l := range libs {
		if _, ok := entries[l]; !ok {
			entries[l] = &entry{src: l, mode: 0o755}
		}
	}

	applets, err := command(ctx, "", bb, "--list-full").Output()
	if err != nil {
		return "", fmt.Errorf("vm: %s --list-full: %w", bb, err)
	}
	have := map[string]bool{}
	for _, a := range strings.Fields(string(applets)) {
		have[path.Base(a)] = true
	}
	for _, a := range guestApplets {
		if !have[a] {
			return "", fmt.Errorf("vm: %s lacks the applet %q that /init or lib.sh uses", bb, a)
		}
	}
	for _, a := range strings.Fields(string(applets)) {
		dst := "/" + a
		if _, ok := entries[dst]; ok || provided[path.Base(a)] {
			continue
		}
		entries[dst] = &entry{link: "/bin/busybox"}
	}

	var modList bytes.Buffer
	if len(opts.Modules) > 0 {
		if opts.Kernel == nil {
			return "", errors.New("vm: InitramfsOptions.Modules needs Kernel")
		}
		mods, err := opts.Kernel.Modules(ctx, opts.Modules...)
		if err != nil {
			return "", err
		}
		for _, m := range mods {
			dst := "/lib/modules/" + opts.Kernel.Release + "/" + m.Name + ".ko"
			entries[dst] = &entry{src: m.Path, mode: 0o644}
			modList.WriteString(dst)
			if m.Optional {
				modList.WriteString(" optional")
			}
			modList.WriteByte('\n')
		}
	}
	entries["/init"] = &entry{data: initScript, mode: 0o755}
	entries["/etc/vmtest/lib.sh"] = &entry{data: libScript, mode: 0o644}
	entries["/etc/vmtest/modules"] = &entry{data: modList.Bytes(), mode: 0o644}
	for dst, data := range map[string]string{
		"/etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
		"/etc/group":  "root:x:0:\n",
	} {
		if _, ok := entries[dst]; !ok {
			entries[dst] = &entry{data: []byte(data), mode: 0o644}
		}
	}

	key, err := initramfsKey(entries, opts.Gzip)
	if err != nil {
		return "", err
	}
	cache := opts.CacheDir
	if cache == "" {
		if cache, err = CacheDir(); err != nil {
			return "", err
		}
	}
	dir := filepath.Join(cache, "initramfs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("vm: %w", err)
	}
	name := filepath.Join(dir, key+".cpio")
	if opts.Gzip {
		name += ".gz"
	}
	if _, err := os.Stat(name); err == nil {
		now := time.Now()
		os.Chtimes(name, now, now) // most recently used, for pruning
		return name, nil
	}
	if err := writeInitramfs(name, entries, opts.Gzip); err != nil {
		return "", err
	}
	pruneCache(dir, name, keepInitramfs)
	return name, nil
}

// initramfsKey hashes what an archive would hold. Host files count by path,
// size and modification time, which is enough for binaries and libraries
// that change by being rewritten.
func initramfsKey(entries map[string]*entry, gz bool) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s gzip=%v\n", initramfsFormat, gz)
	for _, dst := range slices.Sorted(maps.Keys(entries)) {
		e := entries[dst]
		switch {
		case e.link != "":
			fmt.Fprintf(h, "L %s %s\n", dst, e.link)
		case e.src != "":
			fi, err := os.Stat(e.src)
			if err != nil {
				return "", fmt.Errorf("vm: %w", err)
			}
			fmt.Fprintf(h, "F %s %o %s %d %d\n", dst, e.mode, e.src, fi.Size(), fi.ModTime().UnixNano())
		default:
			sum := sha256.Sum256(e.data)
			fmt.Fprintf(h, "D %s %o %x\n", dst, e.mode, sum)
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:32], nil
}

func writeInitramfs(name string, entries map[string]*entry, gz bool) error {
	f, err := os.CreateTemp(filepath.Dir(name), ".tmp-initramfs-")
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	defer os.Remove(f.Name()) // after a successful rename this fails harmlessly
	bw := bufio.NewWriterSize(f, 1<<20)
	var w io.Writer = bw
	var zw *gzip.Writer
	if gz {
		zw, _ = gzip.NewWriterLevel(bw, gzip.BestSpeed)
		w = zw
	}
	cw := newCPIOWriter(w)
	for _, d := range []string{"/proc", "/sys", "/dev", "/tmp", "/run", "/mnt", "/root"} {
		cw.Dir(d)
	}
	for _, dst := range slices.Sorted(maps.Keys(entries)) {
		e := entries[dst]
		switch {
		case e.link != "":
			cw.Symlink(dst, e.link)
		case e.src != "":
			data, err := os.ReadFile(e.src)
			if err != nil {
				f.Close()
				return fmt.Errorf("vm: %w", err)
			}
			cw.File(dst, e.mode, data)
		default:
			cw.File(dst, e.mode, e.data)
		}
	}
	err = cw.Close()
	if zw != nil && err == nil {
		err = zw.Close()
	}
	if err == nil {
		err = bw.Flush()
	}
	if zw != nil && err == nil {
		// Run appends an uncompressed archive, which the kernel finds only
		// at a 4-byte aligned offset; zeros between archives are skipped.
		var size int64
		if size, err = f.Seek(0, io.SeekCurrent); err == nil && size%512 != 0 {
			_, err = f.Write(make([]byte, 512-size%512))
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), name)
	}
	if err != nil {
		return fmt.Errorf("vm: writing initramfs %s: %w", name, err)
	}
	return nil
}

// pruneCache removes all but the keep most recently used entries of dir
// (files or directories; names starting with "." are left alone), never
// current.
func pruneCache(dir, current string, keep int) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	type item struct {
		path string
		used time.Time
	}
	var items []item
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if strings.HasPrefix(e.Name(), ".") || p == current {
			continue
		}
		if fi, err := e.Info(); err == nil {
			items = append(items, item{p, fi.ModTime()})
		}
	}
	sort.Slice(items, func(i, j int) bool { return items[i].used.After(items[j].used) })
	for i := keep - 1; i < len(items); i++ {
		os.RemoveAll(items[i].path)
	}
}

// sharedLibraries returns the host paths of the shared libraries and ELF
// interpreter that the program or library p needs, as `ldd` resolves them.
// It returns nothing for static programs and for files that are not ELF.
func sharedLibraries(ctx context.Context, p string) ([]string, error) {
	f, err := elf.Open(p)
	if err != nil {
		var ferr *elf.FormatError
		if errors.As(err, &ferr) || errors.Is(err, io.EOF) {
			return nil, nil // not ELF: a script or data
		}
		return nil, fmt.Errorf("vm: %w", err)
	}
	dynamic := false
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_DYNAMIC {
			dynamic = true
		}
	}
	f.Close()
	if !dynamic {
		return nil, nil
	}
	out, err := command(ctx, "", "ldd", p).CombinedOutput()
	if err != nil {
		// A static-pie program has PT_DYNAMIC but nothing to load.
		if bytes.Contains(out, []byte("statically linked")) || bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("vm: ldd %s: %w: %s", p, err, out)
	}
	var libs []string
	for line := range strings.Lines(string(out)) {
		line = strings.TrimSpace(line)
		if _, rest, ok := strings.Cut(line, "=> "); ok {
			line = rest
		}
		if strings.HasPrefix(line, "not found") {
			return nil, fmt.Errorf("vm: ldd %s: a library is not found: %s", p, strings.TrimSpace(string(out)))
		}
		lib, _, _ := strings.Cut(line, " (")
		if path.IsAbs(lib) {
			libs = append(libs, lib)
		}
	}
	return libs, nil
}

// findBusybox returns the host's static busybox (package busybox-static).
func findBusybox() (string, error) {
	p, err := lookTool("busybox")
	if err != nil {
		return "", fmt.Errorf("vm: busybox not found (install busybox-static: scripts/deps.sh)")
	}
	f, err := elf.Open(p)
	if err != nil {
		return "", fmt.Errorf("vm: %w", err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return "", fmt.Errorf("vm: %s is dynamically linked; install busybox-static (scripts/deps.sh)", p)
		}
	}
	return p, nil
}
