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
// probes) and the remaining driver options. As in qemu-img, a first item
// without "=" is the "file" option, which names a node to use as the file
// (a reference qemu-img can never resolve: it opens no other node), and
// an image without a file is refused in QEMU's words.
func ParseImageOpts(s string) (filename, format string, opts bdrv.Options, err error) {
	if first, _, _ := strings.Cut(strings.ReplaceAll(s, ",,", "\x00"), ","); first != "" && !strings.Contains(first, "=") {
		s = "file=" + s // qemu-img's implied option name
	}
	o, err := bdrv.ParseOptionString(s)
	if err != nil {
		return "", "", nil, err
	}
	format = o["driver"] // "" probes
	proto, ok := o["file.driver"]
	if ok && proto != "file" && !isProtocol(proto) {
		return "", "", nil, fmt.Errorf("Unknown protocol driver '%s'", proto)
	}
	// A protocol other than file (rbd, null-co) finds its image by its own
	// options (pool=, image=, ...), named directly or as file.NAME.
	byOptions := format != "file" && isProtocol(format) || proto != "file" && isProtocol(proto)
	if err := imageOptsFileError(o, format, byOptions); err != nil {
		return "", "", nil, err
	}
	filename = o["file.filename"]
	if format == "file" || isProtocol(format) {
		// A protocol at the top: its own filename option (rbd:...).
		filename = o["filename"]
	}
	opts = bdrv.Options{}
	for k, v := range o {
		switch k {
		case "driver", "file.filename", "filename":
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

// imageOptsFileError is QEMU's refusal of options o that give the image
// (of format driver, "" to probe) no file to open. byOptions: the image's
// protocol finds it by options of its own, without a file name.
func imageOptsFileError(o bdrv.Options, driver string, byOptions bool) error {
	const noName = "The 'file' block driver requires a file name"
	if driver == "file" {
		if o["filename"] == "" {
			return errors.New(noName)
		}
		return nil
	}
	fileOpts := false
	for k := range o {
		fileOpts = fileOpts || strings.HasPrefix(k, "file.")
	}
	_, named := o["file.filename"]
	_, driven := o["file.driver"]
	ref, isRef := o["file"]
	switch {
	case isRef && fileOpts:
		return errors.New("Cannot reference an existing block device with additional options or a new filename")
	case isRef:
		return fmt.Errorf("Cannot find device='%s' nor node-name='%s'", ref, ref)
	case byOptions:
		return nil
	case named || driven:
		if o["file.filename"] == "" {
			return errors.New(noName)
		}
		return nil
	case driver == "" || fileOpts:
		return errors.New("Must specify either driver or file")
	}
	return errors.New("A block device must be specified for \"file\"")
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
// qemu-img opens the new image with the key it was created with): every
// create option whose name ends in "key-secret", as qemu-img's
// img_add_key_secrets takes them.
func keySecretOption(create bdrv.Options) bdrv.Options {
	var out bdrv.Options
	for k, id := range create {
		if strings.HasSuffix(k, "key-secret") {
			if out == nil {
				out = bdrv.Options{}
			}
			out[k] = id
		}
	}
	return out
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
