package main

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"ublkimg/internal/cephtest"
	"ublkimg/internal/qemutest"
)

// TestRbdVerbs runs the verbs on images in RBD (the throwaway cluster)
// against qemu-img with its rbd driver, as TestToolVerbs does for files:
// each case gets its own copies of the images it names, made by qemu-img,
// for ublkimg and for qemu-img. In the arguments {NAME} is an rbd: file name
// of an image (src-raw, src-qcow2: data from src.raw; empty-raw,
// empty-qcow2: empty 16 MiB images; top-qcow2: a qcow2 image on rbd over
// src-raw; snap-raw: src.raw's data in snapshot snap1, other data at the
// head; any other name is not created beforehand). {NAME@SNAP} is the
// image's snapshot, {img:NAME} the image's RBD name alone (for option
// strings). Standard output,
// exit status and the error line must be the same, and afterwards every
// image, in RBD or in the case's directory, must read alike.
func TestRbdVerbs(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	conf := cephtest.Conf(t)
	src := t.TempDir()
	sh := exec.Command("bash", "-e", "-c", `
qemu-img create -q -f raw src.raw 24M
qemu-io -f raw -c "write -P 0x11 0 1M" -c "write -P 0x22 9M 64k" -c "write -P 0x33 17M 3M" src.raw >/dev/null
cp src.raw diff.raw
qemu-io -f raw -c "write -P 0x44 18M 512" diff.raw >/dev/null
qemu-img create -q -f qcow2 -b src.raw -F raw local-top.qcow2
`)
	sh.Dir = src
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("making images: %v\n%s", err, out)
	}
	for _, args := range [][]string{
		{"info", "{src-raw}"},
		{"info", "--output=json", "{src-raw}"},
		{"info", "{src-qcow2}"},
		{"info", "--output=json", "{src-qcow2}"},
		{"info", "--backing-chain", "{top-qcow2}"},
		{"info", "-f", "rbd", "{src-raw}"},

		{"create", "-f", "raw", "{new}", "16M"},
		{"create", "-f", "qcow2", "{new}", "16M"},
		{"create", "-f", "raw", "-o", "cluster_size=1M", "{new}", "16M"},
		{"create", "-f", "raw", "-o", "cluster_size=3000", "{new}", "16M"},
		{"create", "-f", "qcow2", "-b", "{src-raw}", "-F", "raw", "{new}"},
		{"create", "-f", "qcow2", "-b", "{src-raw}", "-F", "raw", "local.qcow2"},

		{"convert", "-O", "raw", "src.raw", "{new}"},
		{"convert", "-O", "qcow2", "src.raw", "{new}"},
		{"convert", "-O", "raw", "{src-qcow2}", "out.raw"},
		{"convert", "-O", "qcow2", "{src-raw}", "out.qcow2"},
		{"convert", "-O", "raw", "{top-qcow2}", "out.raw"},
		{"convert", "-n", "-O", "raw", "src.raw", "{empty-raw}"},

		{"compare", "src.raw", "{src-raw}"},
		{"compare", "-F", "qcow2", "src.raw", "{src-qcow2}"},
		{"compare", "diff.raw", "{src-raw}"},
		{"compare", "{src-raw}", "{src-qcow2}"},

		{"map", "{src-raw}"},
		{"map", "--output=json", "{src-raw}"},
		{"map", "--output=json", "{src-qcow2}"},
		{"map", "--output=json", "{top-qcow2}"},

		{"resize", "-f", "raw", "{src-raw}", "+1M"},
		{"resize", "-f", "raw", "--shrink", "{src-raw}", "8M"},
		{"resize", "{src-qcow2}", "64M"},

		{"snapshot", "-c", "s1", "{src-raw}"},
		{"snapshot", "-l", "{src-raw}"},
		{"snapshot", "-d", "nope", "{src-raw}"},
		{"snapshot", "-a", "nope", "{src-raw}"},
		{"snapshot", "-c", "s1", "{src-qcow2}"},

		{"commit", "{top-qcow2}"},
		{"commit", "-b", "{src-raw}", "{top-qcow2}"},
		{"rebase", "-b", "", "{top-qcow2}"},
		{"rebase", "-u", "-b", "{src-qcow2}", "-F", "qcow2", "{top-qcow2}"},
		{"amend", "-o", "lazy_refcounts=on", "{src-qcow2}"},
		{"bitmap", "--add", "{src-qcow2}", "b0"},
		{"info", "{snap-raw@snap1}"},
		{"compare", "src.raw", "{snap-raw@snap1}"},
		{"compare", "src.raw", "{snap-raw}"},
		{"convert", "-O", "raw", "{snap-raw@snap1}", "out.raw"},
		{"map", "--output=json", "{snap-raw@snap1}"},
		{"info", "--image-opts", "driver=raw,file.driver=rbd,file.pool=rbd,file.image={img:snap-raw},file.snapshot=snap1,file.conf=" + conf},
		{"resize", "-f", "raw", "{snap-raw@snap1}", "+1M"},

		{"measure", "-O", "qcow2", "{src-raw}"},
		{"measure", "-O", "raw", "--output=json", "{src-qcow2}"},
		{"check", "{src-qcow2}"},
		{"check", "--output=json", "{src-qcow2}"},
		{"check", "{top-qcow2}"},
		{"dd", "if={src-raw}", "of=out.raw", "bs=64k", "count=300"},
		{"dd", "-O", "raw", "if=src.raw", "of={new}", "bs=1M"},

		{"info", "--image-opts", "driver=rbd,pool=rbd,image={img:src-raw},conf=" + conf},
		{"info", "--image-opts", "driver=raw,file.driver=rbd,file.pool=rbd,file.image={img:src-raw},file.conf=" + conf},
		// A file name in the options names the image as given.
		{"info", "--image-opts", "driver=raw,file.driver=rbd,file.filename={src-raw}"},
		{"info", "--image-opts", "driver=rbd,filename={src-raw}"},
		{"map", "--output=json", "--image-opts", "driver=qcow2,file.driver=rbd,file.pool=rbd,file.image={img:src-qcow2},file.conf=" + conf},
		{"info", "--object", "secret,id=k0,data=QUFB,format=base64", "--image-opts", "driver=rbd,pool=rbd,image={img:src-raw},conf=" + conf + ",key-secret=k1"},
		{"info", "{missing}"},
		{"info", "rbd:nopool/x:conf=" + conf},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			ours, theirs := rbdCase(t, conf, src, "o"), rbdCase(t, conf, src, "q")
			got := runIn(t, ours.dir, binary, ours.expand(args)...)
			want := runIn(t, theirs.dir, "qemu-img", theirs.expand(args)...)
			// The outputs name each side's images: name them alike.
			got.stdout, got.stderr = ours.unexpand(got.stdout), ours.unexpand(got.stderr)
			want.stdout, want.stderr = theirs.unexpand(want.stdout), theirs.unexpand(want.stderr)
			if got.stdout != want.stdout || got.code != want.code {
				t.Errorf("exit %d, stdout:\n%s\nqemu-img: exit %d, stdout:\n%s", got.code, got.stdout, want.code, want.stdout)
			}
			if gotLines, wantLines := toolStderr(t, got, want); gotLines != wantLines {
				t.Errorf("stderr:\n%s\nqemu-img's, as ublkimg words it:\n%s", gotLines, wantLines)
			}
			for _, name := range ours.names {
				a, b := ours.image(name), theirs.image(name)
				if r := runIn(t, "/", "qemu-img", "compare", "-U", a, b); r.code != 0 && !strings.Contains(r.stderr, "No such file") {
					t.Errorf("%s differs from qemu-img's: %s%s", name, r.stdout, r.stderr)
				}
			}
			for _, name := range []string{"out.raw", "out.qcow2", "local.qcow2"} {
				a, b := ours.dir+"/"+name, theirs.dir+"/"+name
				if r := runIn(t, "/", "qemu-img", "compare", "-U", a, b); r.code != 0 && !strings.Contains(r.stderr, "No such file") {
					t.Errorf("%s differs from qemu-img's: %s%s", name, r.stdout, r.stderr)
				}
			}
		})
	}
}

// rbdSide is one tool's copy of a case: a directory and images in RBD.
type rbdSide struct {
	conf, dir, prefix string
	names             []string // the {NAME}s the case uses
}

var rbdCaseSeq int

// rbdCase makes side's directory (a copy of src) and the images named by
// the case's arguments, which must be the test's current ones.
func rbdCase(t *testing.T, conf, src, side string) *rbdSide {
	t.Helper()
	rbdCaseSeq++
	s := &rbdSide{conf: conf, dir: t.TempDir(), prefix: fmt.Sprintf("v%d-%d%s-", os.Getpid(), rbdCaseSeq, side)}
	cp := exec.Command("cp", "-a", "--sparse=always", src+"/.", s.dir)
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, m := range placeholder.FindAllStringSubmatch(t.Name(), -1) {
		name := m[2]
		if !slicesContains(s.names, name) {
			s.names = append(s.names, name)
		}
	}
	t.Cleanup(func() {
		for _, n := range s.names {
			cephtest.Remove(conf, s.prefix+n)
		}
	})
	for _, name := range s.names {
		var cmd []string
		switch name {
		case "src-raw":
			cmd = []string{"convert", "-O", "raw", "src.raw", s.image(name)}
		case "src-qcow2":
			cmd = []string{"convert", "-O", "qcow2", "src.raw", s.image(name)}
		case "snap-raw":
			// A snapshot of src.raw's data, and other data at its head.
			runOK(t, s.dir, "qemu-img", "convert", "-O", "raw", "src.raw", s.image(name))
			cephtest.Rbd(t, conf, "snap", "create", cephtest.Pool+"/"+s.prefix+name+"@snap1")
			cmd = []string{"-f", "raw", "-c", "write -P 0x66 2M 1M", s.image(name)}
			runOK(t, s.dir, "qemu-io", cmd...)
			continue
		case "empty-raw":
			cmd = []string{"create", "-q", "-f", "raw", s.image(name), "16M"}
		case "top-qcow2":
			if !slicesContains(s.names, "src-raw") {
				runOK(t, s.dir, "qemu-img", "convert", "-O", "raw", "src.raw", s.image("src-raw"))
				s.names = append(s.names, "src-raw")
			}
			cmd = []string{"create", "-q", "-f", "qcow2", "-b", s.image("src-raw"), "-F", "raw", s.image(name)}
		default:
			continue
		}
		runOK(t, s.dir, "qemu-img", cmd...)
		if name == "top-qcow2" {
			runOK(t, s.dir, "qemu-io", "-c", "write -P 0x55 1M 64k", s.image(name))
		}
	}
	return s
}

// placeholder matches {NAME} (an image's file name) and {img:NAME} (its
// RBD name alone, for option strings) in the arguments.
var placeholder = regexp.MustCompile(`\{(img:)?([a-z0-9-]+)(@[a-z0-9]+)?\}`)

func (s *rbdSide) image(name string) string {
	return "rbd:" + cephtest.Pool + "/" + s.prefix + name + ":conf=" + s.conf
}

// expand replaces each {NAME} in args by the side's image.
func (s *rbdSide) expand(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = placeholder.ReplaceAllStringFunc(a, func(m string) string {
			if name, ok := strings.CutPrefix(m[1:len(m)-1], "img:"); ok {
				return s.prefix + name
			}
			// {NAME@SNAP}: the image's snapshot.
			name, snap, _ := strings.Cut(m[1:len(m)-1], "@")
			if snap != "" {
				return strings.Replace(s.image(name), ":conf=", "@"+snap+":conf=", 1)
			}
			return s.image(name)
		})
	}
	return out
}

// unexpand names the side's images by their placeholders in output.
func (s *rbdSide) unexpand(out string) string {
	out = strings.ReplaceAll(out, s.prefix, "{}")
	return strings.ReplaceAll(out, s.dir, "{dir}")
}

func runOK(t *testing.T, dir, name string, args ...string) {
	t.Helper()
	if r := runIn(t, dir, name, args...); r.code != 0 {
		t.Fatalf("%s %v: exit %d: %s%s", name, args, r.code, r.stdout, r.stderr)
	}
}

func slicesContains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}
