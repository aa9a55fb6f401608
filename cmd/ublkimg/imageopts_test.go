package main

import (
	"fmt"
	"strings"
	"testing"

	"ublkimg/internal/qemutest"
)

const imageOptsImages = `
qemu-img create -q -f qcow2 p.qcow2 1M
qemu-img create -q -f qcow2 -b p.qcow2 -F qcow2 t.qcow2
qemu-img create -q -f raw r.raw 1M
`

// TestImageOptsUnknown: --image-opts refuses options no node uses, as
// qemu-img 7.2 does, and takes the ones QEMU takes.
func TestImageOptsUnknown(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	src := makeImages(t, imageOptsImages)
	work := fixtureCopies(t, src)
	const p, tp, r = "driver=qcow2,file.filename=p.qcow2", "driver=qcow2,file.filename=t.qcow2", "driver=raw,file.filename=r.raw"
	for i, args := range [][]string{
		{"info", "--image-opts", p + ",foo=1"},
		{"check", "--image-opts", p + ",foo=1"},
		{"check", "--image-opts", "file.filename=p.qcow2,foo=1"},
		{"check", "--image-opts", p + ",file.foo=1"},
		{"check", "--image-opts", p + ",file.locking=off"},
		{"check", "--image-opts", p + ",encrypt.foo=1"},
		{"check", "--image-opts", p + ",lazy-refcounts=on,cache-size=1M,force-share=on,read-only=on,discard=unmap,detect-zeroes=on,node-name=x"},
		{"check", "--image-opts", tp + ",backing.foo=1"},
		{"check", "--image-opts", tp + ",backing.lazy-refcounts=on"},
		{"info", "--image-opts", tp + ",backing.foo=1"},
		{"check", "--image-opts", p + ",backing.foo=1"},
		{"map", "--image-opts", r + ",foo=1"},
		{"map", "--image-opts", r + ",offset=512"},
		{"compare", "--image-opts", p + ",foo=1", r},
		{"compare", "--image-opts", p, r + ",foo=1"},
		{"convert", "-n", "--target-image-opts", "r.raw", p + ",foo=1"},
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			t.Log(strings.Join(args, " "))
			ours, theirs := work(t, i)
			sameAsQemu(t, ours, theirs, args)
		})
	}
}
