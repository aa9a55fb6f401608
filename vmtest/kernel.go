package vmtest

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// DefaultKernelPackage is the Debian package whose kernel the VM boots. It is
// Debian 12's 6.12 kernel (bookworm-security), the oldest Debian kernel that
// builds ublk (CONFIG_BLK_DEV_UBLK=m); Debian's default 6.1 kernel does not.
// The environment variable UBLKIMG_VM_KERNEL_PKG overrides it.
const DefaultKernelPackage = "linux-image-6.12.107+deb12-amd64-unsigned"

// fallbackKernelPackage matches the packages tried, newest first, when the
// default package has left the archive (Debian's security suite keeps a
// limited number of ABI versions).
var fallbackKernelPackage = regexp.MustCompile(`^linux-image-6\.12\.([0-9]+)\+deb12-amd64-unsigned$`)

// KernelFiles is an unpacked Debian kernel package in the cache.
type KernelFiles struct {
	// Package is the Debian package name, e.g.
	// "linux-image-6.12.107+deb12-amd64-unsigned".
	Package string `json:"package"`
	// PackageVersion is the Debian version of Package, e.g. "6.12.107-1~deb12u1".
	PackageVersion string `json:"package_version"`
	// Release is the kernel release (uname -r), e.g. "6.12.107+deb12-amd64".
	Release string `json:"release"`
	// Vmlinuz is the path of the bootable kernel image.
	Vmlinuz string `json:"-"`
	// Config is the path of the kernel's build configuration.
	Config string `json:"-"`
	// ModulesDir is lib/modules/<Release> inside the unpacked package.
	ModulesDir string `json:"-"`

	dir string // the cache entry: root/ (dpkg -x output), ko/ (decompressed modules)
}

// KernelOptions selects and fetches the kernel; the zero value is the default.
type KernelOptions struct {
	// Package is the Debian package to use. Empty means
	// $UBLKIMG_VM_KERNEL_PKG, or DefaultKernelPackage, in which case a newer
	// 6.12 package is used if the default is no longer in the archive.
	Package string
	// CacheDir overrides CacheDir().
	CacheDir string
	// Logf, when set, receives progress messages (download, fallback).
	Logf func(format string, args ...any)
}

// CacheDir is where downloaded kernels and built initramfs images are kept:
// $UBLKIMG_VM_CACHE, else $XDG_CACHE_HOME/ublkimg-vm, else ~/.cache/ublkimg-vm.
func CacheDir() (string, error) {
	if d := os.Getenv("UBLKIMG_VM_CACHE"); d != "" {
		return filepath.Abs(d)
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("vm: no cache directory (set UBLKIMG_VM_CACHE): %w", err)
	}
	return filepath.Join(d, "ublkimg-vm"), nil
}

// Kernel returns the default kernel, downloading and unpacking it into the
// cache on first use. It is LoadKernel with zero options.
func Kernel(ctx context.Context) (*KernelFiles, error) {
	return LoadKernel(ctx, KernelOptions{})
}

// LoadKernel returns the kernel package opts selects, fetching it with
// `apt-get download` and unpacking it with `dpkg-deb -x` when it is not yet
// in the cache. It holds a lock on the cache entry, so concurrent test
// processes download once. If the package is unknown to apt it runs
// `apt-get update` (as root) and tries again.
func LoadKernel(ctx context.Context, opts KernelOptions) (*KernelFiles, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	pkg, fallback := opts.Package, false
	if pkg == "" {
		pkg = os.Getenv("UBLKIMG_VM_KERNEL_PKG")
	}
	if pkg == "" {
		pkg, fallback = DefaultKernelPackage, true
	}
	cache := opts.CacheDir
	if cache == "" {
		var err error
		if cache, err = CacheDir(); err != nil {
			return nil, err
		}
	}
	kdir := filepath.Join(cache, "kernel")
	if err := os.MkdirAll(kdir, 0o755); err != nil {
		return nil, fmt.Errorf("vm: creating cache: %w", err)
	}
	// The lock is per cache, not per package: a fallback changes the name.
	unlock, err := lockFile(ctx, filepath.Join(kdir, ".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()

	if k, err := loadKernelEntry(filepath.Join(kdir, pkg)); err == nil {
		return k, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if fallback {
		// An earlier run may have fallen back already.
		if alt, err := os.ReadFile(filepath.Join(kdir, pkg+".fallback")); err == nil {
			if k, err := loadKernelEntry(filepath.Join(kdir, strings.TrimSpace(string(alt)))); err == nil {
				return k, nil
			}
		}
	}

	tmp, err := os.MkdirTemp(kdir, ".fetch-")
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	defer os.RemoveAll(tmp)
	start := time.Now()
	got, err := aptDownload(ctx, tmp, pkg, fallback, logf)
	if err != nil {
		return nil, err
	}
	logf("vm: downloaded %s in %v", got, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	if err := unpackKernel(ctx, tmp, got); err != nil {
		return nil, err
	}
	dst := filepath.Join(kdir, got)
	os.RemoveAll(dst) // a broken entry from an interrupted run
	if err := os.Rename(filepath.Join(tmp, "entry"), dst); err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	if got != pkg {
		if err := os.WriteFile(filepath.Join(kdir, pkg+".fallback"), []byte(got+"\n"), 0o644); err != nil {
			return nil, fmt.Errorf("vm: %w", err)
		}
	}
	logf("vm: unpacked %s in %v", got, time.Since(start).Round(time.Millisecond))
	return loadKernelEntry(dst)
}

// aptDownload fetches pkg's .deb into dir and returns the package name it
// fetched (pkg, or a newer 6.12 package when fallback is allowed).
func aptDownload(ctx context.Context, dir, pkg string, fallback bool, logf func(string, ...any)) (string, error) {
	updated := false
	for {
		out, err := aptGetDownload(ctx, dir, pkg)
		if err == nil {
			return pkg, nil
		}
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		// apt says "Unable to locate package" or "Can't select candidate
		// version" when its lists are missing or stale.
		if !updated && os.Geteuid() == 0 {
			logf("vm: apt-get download %s failed; running apt-get update", pkg)
			if out, err := command(ctx, "", "apt-get", "update", "-qq").CombinedOutput(); err != nil {
				return "", fmt.Errorf("vm: apt-get update: %w\n%s", err, out)
			}
			updated = true
			continue
		}
		if fallback {
			if alt, aerr := newestKernelPackage(ctx); aerr == nil && alt != pkg {
				logf("vm: %s is not in the archive; using %s", pkg, alt)
				pkg, fallback = alt, false
				continue
			}
		}
		hint := ""
		if os.Geteuid() != 0 {
			hint = " (run `apt-get update` as root if apt's package lists are missing)"
		}
		return "", fmt.Errorf("vm: apt-get download %s: %w%s\n%s", pkg, err, hint, out)
	}
}

func aptGetDownload(ctx context.Context, dir, pkg string) ([]byte, error) {
	args := []string{"download", "-q"}
	if os.Geteuid() == 0 {
		// Without this apt warns that the _apt user cannot write to dir.
		args = append(args, "-o", "APT::Sandbox::User=root")
	}
	return command(ctx, dir, "apt-get", append(args, pkg)...).CombinedOutput()
}

// newestKernelPackage asks apt for the newest package matching
// fallbackKernelPackage.
func newestKernelPackage(ctx context.Context) (string, error) {
	out, err := command(ctx, "", "apt-cache", "pkgnames", "linux-image-6.12.").Output()
	if err != nil {
		return "", fmt.Errorf("vm: apt-cache pkgnames: %w", err)
	}
	best := newestKernel(strings.Fields(string(out)))
	if best == "" {
		return "", errors.New("vm: apt knows no linux-image-6.12.*+deb12-amd64-unsigned package")
	}
	return best, nil
}

// newestKernel returns the name among names that matches
// fallbackKernelPackage with the highest patch level, or "".
func newestKernel(names []string) string {
	best, bestN := "", -1
	for _, name := range names {
		m := fallbackKernelPackage.FindStringSubmatch(name)
		if m == nil {
			continue
		}
		if n, err := strconv.Atoi(m[1]); err == nil && n > bestN {
			best, bestN = name, n
		}
	}
	return best
}

// unpackKernel unpacks the one .deb in dir into dir/entry and writes the
// entry's kernel.json. It keeps only boot/ and lib/modules/ and generates
// modules.dep and modules.alias, which the package leaves to the installed
// system's depmod.
func unpackKernel(ctx context.Context, dir, pkg string) error {
	debs, _ := filepath.Glob(filepath.Join(dir, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("vm: apt-get download %s left %d .deb files", pkg, len(debs))
	}
	deb := debs[0]
	ver, err := command(ctx, "", "dpkg-deb", "--field", deb, "Version").Output()
	if err != nil {
		return fmt.Errorf("vm: dpkg-deb --field %s: %w", deb, err)
	}
	entry := filepath.Join(dir, "entry")
	root := filepath.Join(entry, "root")
	if err := os.MkdirAll(entry, 0o755); err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	if out, err := command(ctx, "", "dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
		return fmt.Errorf("vm: dpkg-deb -x %s: %w\n%s", deb, err, out)
	}
	os.Remove(deb)
	os.RemoveAll(filepath.Join(root, "usr")) // docs and the linux-image's lintian files

	images, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(images) != 1 {
		return fmt.Errorf("vm: %s holds %d boot/vmlinuz-* files, want 1", pkg, len(images))
	}
	k := KernelFiles{
		Package:        pkg,
		PackageVersion: strings.TrimSpace(string(ver)),
		Release:        strings.TrimPrefix(filepath.Base(images[0]), "vmlinuz-"),
	}
	mods := filepath.Join(root, "lib", "modules", k.Release)
	if _, err := os.Stat(filepath.Join(mods, "modules.dep")); errors.Is(err, os.ErrNotExist) {
		bb, err := findBusybox()
		if err != nil {
			return err
		}
		// busybox's depmod reads .ko.xz itself and writes modules.dep and
		// modules.alias (about 10 s for Debian's 4,000 modules).
		if out, err := command(ctx, "", bb, "depmod", "-b", root, k.Release).CombinedOutput(); err != nil {
			return fmt.Errorf("vm: busybox depmod for %s: %w\n%s", k.Release, err, out)
		}
	}
	meta, err := json.MarshalIndent(k, "", "\t")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(entry, "kernel.json"), meta, 0o644)
}

// loadKernelEntry reads a complete cache entry. It returns an error wrapping
// os.ErrNotExist when dir is not one.
func loadKernelEntry(dir string) (*KernelFiles, error) {
	meta, err := os.ReadFile(filepath.Join(dir, "kernel.json"))
	if err != nil {
		return nil, err
	}
	var k KernelFiles
	if err := json.Unmarshal(meta, &k); err != nil {
		return nil, fmt.Errorf("vm: %s: %w", dir, err)
	}
	k.dir = dir
	root := filepath.Join(dir, "root")
	k.Vmlinuz = filepath.Join(root, "boot", "vmlinuz-"+k.Release)
	k.Config = filepath.Join(root, "boot", "config-"+k.Release)
	k.ModulesDir = filepath.Join(root, "lib", "modules", k.Release)
	for _, p := range []string{k.Vmlinuz, k.Config, filepath.Join(k.ModulesDir, "modules.dep")} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("vm: incomplete kernel cache entry %s: %w", dir, err)
		}
	}
	return &k, nil
}

// ConfigValue returns the value of a kernel configuration symbol ("y", "m",
// a string or number), or "" when it is not set. sym may omit "CONFIG_".
func (k *KernelFiles) ConfigValue(sym string) (string, error) {
	if !strings.HasPrefix(sym, "CONFIG_") {
		sym = "CONFIG_" + sym
	}
	data, err := os.ReadFile(k.Config)
	if err != nil {
		return "", fmt.Errorf("vm: %w", err)
	}
	prefix := []byte(sym + "=")
	for line := range bytes.Lines(data) {
		if v, ok := bytes.CutPrefix(line, prefix); ok {
			return strings.Trim(strings.TrimSpace(string(v)), `"`), nil
		}
	}
	return "", nil
}

// Module is a kernel module ready for busybox insmod.
type Module struct {
	// Name is the module name, with underscores ("crc32c_intel").
	Name string
	// Path is the decompressed .ko in the cache.
	Path string
	// Optional is set for modules pulled in by a soft dependency (for
	// example an accelerated crc32c): the guest tolerates their failing to
	// load, as modprobe does.
	Optional bool
}

// Modules resolves module names (or aliases) to the modules to load, in
// load order: hard dependencies (modules.dep) and pre soft dependencies
// (the module's softdep= modinfo) first. Modules built into the kernel are
// left out, so asking for "loop" works whether CONFIG_BLK_DEV_LOOP is y or
// m. The modules are decompressed into the cache on first use.
func (k *KernelFiles) Modules(ctx context.Context, names ...string) ([]Module, error) {
	idx, err := k.moduleIndex()
	if err != nil {
		return nil, err
	}
	r := resolver{ctx: ctx, k: k, idx: idx, seen: map[string]int{}}
	for _, n := range names {
		if err := r.add(n, false); err != nil {
			return nil, err
		}
	}
	return r.out, nil
}

type moduleIndex struct {
	path    map[string]string   // name -> path relative to ModulesDir
	deps    map[string][]string // name -> names it needs
	alias   map[string][]string // exact alias -> names
	builtin map[string]bool
}

func moduleName(p string) string {
	base := filepath.Base(p)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

func (k *KernelFiles) moduleIndex() (*moduleIndex, error) {
	idx := &moduleIndex{path: map[string]string{}, deps: map[string][]string{}, alias: map[string][]string{}, builtin: map[string]bool{}}
	err := eachLine(filepath.Join(k.ModulesDir, "modules.dep"), func(line string) {
		mod, deps, ok := strings.Cut(line, ":")
		if !ok {
			return
		}
		name := moduleName(mod)
		idx.path[name] = mod
		for _, d := range strings.Fields(deps) {
			idx.deps[name] = append(idx.deps[name], moduleName(d))
		}
	})
	if err != nil {
		return nil, err
	}
	err = eachLine(filepath.Join(k.ModulesDir, "modules.alias"), func(line string) {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "alias" {
			idx.alias[f[1]] = append(idx.alias[f[1]], moduleName(f[2]))
		}
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	err = eachLine(filepath.Join(k.ModulesDir, "modules.builtin"), func(line string) {
		idx.builtin[moduleName(line)] = true
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return idx, nil
}

type resolver struct {
	ctx  context.Context
	k    *KernelFiles
	idx  *moduleIndex
	seen map[string]int // name -> 1 while resolving, 2 when done
	out  []Module
}

func (r *resolver) add(name string, optional bool) error {
	name = strings.ReplaceAll(name, "-", "_")
	if _, ok := r.idx.path[name]; !ok {
		if r.idx.builtin[name] {
			return nil
		}
		// Aliases keep their dashes ("crypto-crc32c").
		targets := r.idx.alias[strings.ReplaceAll(name, "_", "-")]
		if len(targets) == 0 {
			targets = r.idx.alias[name]
		}
		if len(targets) == 0 {
			if optional {
				return nil
			}
			return fmt.Errorf("vm: kernel %s has no module or alias %q", r.k.Release, name)
		}
		for _, t := range targets {
			if err := r.add(t, optional || len(targets) > 1); err != nil {
				return err
			}
		}
		return nil
	}
	switch r.seen[name] {
	case 1:
		return fmt.Errorf("vm: module dependency cycle through %s", name)
	case 2:
		// A module wanted both as a soft and a hard dependency is hard.
		if !optional {
			for i := range r.out {
				if r.out[i].Name == name {
					r.out[i].Optional = false
				}
			}
		}
		return nil
	}
	r.seen[name] = 1
	ko, err := r.k.decompress(r.ctx, name, r.idx.path[name])
	if err != nil {
		return err
	}
	info, err := modinfo(ko)
	if err != nil {
		return err
	}
	pre, post := parseSoftdep(info["softdep"])
	for _, d := range pre {
		if err := r.add(d, true); err != nil {
			return err
		}
	}
	for _, d := range r.idx.deps[name] {
		if err := r.add(d, optional); err != nil {
			return err
		}
	}
	r.out = append(r.out, Module{Name: name, Path: ko, Optional: optional})
	r.seen[name] = 2
	for _, d := range post {
		if err := r.add(d, true); err != nil {
			return err
		}
	}
	return nil
}

// decompress returns the path of module name's plain .ko in the cache,
// decompressing rel (relative to ModulesDir; .ko, .ko.xz or .ko.zst) first.
func (k *KernelFiles) decompress(ctx context.Context, name, rel string) (string, error) {
	dst := filepath.Join(k.dir, "ko", name+".ko")
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", fmt.Errorf("vm: %w", err)
	}
	src := filepath.Join(k.ModulesDir, rel)
	var cmd *exec.Cmd
	switch {
	case strings.HasSuffix(src, ".xz"):
		cmd = command(ctx, "", "xz", "-dc", src)
	case strings.HasSuffix(src, ".zst"):
		cmd = command(ctx, "", "zstd", "-dcq", src)
	case strings.HasSuffix(src, ".gz"):
		cmd = command(ctx, "", "gzip", "-dc", src)
	default:
		cmd = command(ctx, "", "cat", src)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	data, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("vm: decompressing %s: %w: %s", src, err, stderr.Bytes())
	}
	if err := writeFileAtomic(dst, data, 0o644); err != nil {
		return "", err
	}
	return dst, nil
}

// modinfo returns the key=value strings of a module's .modinfo section. A
// key given more than once (alias) keeps its last value.
func modinfo(ko string) (map[string]string, error) {
	f, err := elf.Open(ko)
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("vm: %s has no .modinfo section", ko)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("vm: reading .modinfo of %s: %w", ko, err)
	}
	info := map[string]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if k, v, ok := bytes.Cut(kv, []byte("=")); ok {
			info[string(k)] = string(v)
		}
	}
	return info, nil
}

// parseSoftdep splits a "pre: a b post: c" softdep value.
func parseSoftdep(s string) (pre, post []string) {
	list := &pre
	for _, f := range strings.Fields(s) {
		switch f {
		case "pre:":
			list = &pre
		case "post:":
			list = &post
		default:
			*list = append(*list, f)
		}
	}
	return pre, post
}

func eachLine(path string, fn func(string)) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for s.Scan() {
		fn(s.Text())
	}
	if err := s.Err(); err != nil {
		return fmt.Errorf("vm: reading %s: %w", path, err)
	}
	return nil
}

// lockFile takes an exclusive flock on path, waiting until ctx is done.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("vm: locking %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("vm: waiting for lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// writeFileAtomic writes data to a temporary file next to path and renames
// it into place, so readers never see a partial file.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	_, err = f.Write(data)
	err = cmp.Or(err, f.Chmod(perm), f.Close())
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("vm: writing %s: %w", path, err)
	}
	return nil
}

// command is exec.CommandContext with an optional working directory.
func command(ctx context.Context, dir, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	return cmd
}
