package img

import (
	"errors"
	"fmt"
	"strings"

	"ublkimg/bdrv"
)

// --image-opts: an image named by its open options instead of a file name,
// as "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0". The
// operations take image names as strings; ImageOptsName marks such a string
// so that openImage opens it with its options and names it, in messages,
// the way qemu-img does: by the whole string.

// imageOptsMark starts a marked name; no file name contains a NUL byte.
const imageOptsMark = "\x00"

// ImageOptsName returns the name under which the operations open the image
// described by the --image-opts string opts.
func ImageOptsName(opts string) string { return imageOptsMark + opts }

// ParseImageOpts splits an --image-opts string into the file name
// (file.filename, or filename with driver=file), the format (driver; ""
// probes) and the remaining driver options.
func ParseImageOpts(s string) (filename, format string, opts bdrv.Options, err error) {
	o, err := bdrv.ParseOptionString(s)
	if err != nil {
		return "", "", nil, err
	}
	format = o["driver"] // "" probes
	proto, ok := o["file.driver"]
	if ok && proto != "file" && !isProtocol(proto) {
		return "", "", nil, fmt.Errorf("Unknown protocol driver '%s'", proto)
	}
	filename = o["file.filename"]
	if filename == "" {
		filename = o["file"]
	}
	if filename == "" && format == "file" {
		filename = o["filename"]
	}
	// A protocol other than file (rbd) finds its image by its own
	// options (pool=, image=, ...), named directly or as file.NAME.
	byOptions := format != "file" && isProtocol(format) || proto != "file" && isProtocol(proto)
	if filename == "" && !byOptions {
		return "", "", nil, errors.New("A block device must be specified for \"file\"")
	}
	opts = bdrv.Options{}
	for k, v := range o {
		switch k {
		case "driver", "file", "file.filename", "filename":
		case "file.driver":
			if byOptions {
				opts[k] = v // bdrv.Open picks the protocol by it
			}
		default:
			opts[k] = v
		}
	}
	return filename, format, opts, nil
}

// isProtocol reports whether name is a registered protocol driver.
func isProtocol(name string) bool {
	f, err := bdrv.LookupFormat(name)
	return err == nil && f.Protocol
}

// resolveImageOpts turns a marked name in s into its file name, format and
// options, and returns the name messages use: the --image-opts string, or
// the file name.
func resolveImageOpts(s *openSpec) (string, error) {
	display, ok := strings.CutPrefix(s.filename, imageOptsMark)
	if !ok {
		return s.filename, nil
	}
	filename, format, opts, err := ParseImageOpts(display)
	if err != nil {
		return display, err
	}
	// The driver named in the string wins over a format passed along
	// (convert's default -O raw with --target-image-opts).
	s.filename = filename
	if format != "" {
		s.format = format
	}
	s.options = s.options.Merge(opts)
	return display, nil
}

// keySecretOption returns the target open options that carry the
// encryption secret of create options (convert -o encrypt.key-secret=ID:
// qemu-img opens the new image with the key it was created with).
func keySecretOption(create bdrv.Options) bdrv.Options {
	for _, k := range []string{"encrypt.key-secret", "key-secret"} { // qcow2, luks
		if id, ok := create[k]; ok {
			return bdrv.Options{k: id}
		}
	}
	return nil
}

// ResolveImageName returns the file name, format ("" if not given) and
// driver options of an image name that may be an ImageOptsName, for callers
// that open images themselves (attach).
func ResolveImageName(name string) (filename, format string, opts bdrv.Options, err error) {
	s := openSpec{filename: name}
	if _, err := resolveImageOpts(&s); err != nil {
		return "", "", nil, err
	}
	return s.filename, s.format, s.options, nil
}

// displayName is how messages name an image: an ImageOptsName by its
// option string, as qemu-img does, anything else as given.
func displayName(name string) string { return strings.TrimPrefix(name, imageOptsMark) }
