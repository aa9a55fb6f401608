package rbd

import (
	"errors"
	"fmt"
	"strings"

	"ublkimg/bdrv"
)

// Prefix starts the QEMU file name of an RBD image.
const Prefix = "rbd:"

// location is where an image is and how to reach its cluster: QEMU's
// BlockdevOptionsRbd and the legacy key=value pairs of the file name.
type location struct {
	Pool, Namespace, Image, Snapshot string
	Conf                             string // ceph.conf to read; "" reads the default locations
	User                             string // cephx user (the id= of the file name)
	KeySecret                        string // ID of the --object secret holding the cephx key
	// KeyValues are the other key=value pairs of the file name, Ceph
	// options set in order with rados_conf_set.
	KeyValues [][2]string
	// fromName: parsed from an rbd: file name (which always sets a
	// namespace, "" by default, in QEMU's options).
	fromName bool
}

// parseFilename parses QEMU's rbd file name syntax:
//
//	rbd:pool[/namespace]/image[@snapshot][:key=value...]
//
// with conf= and id= among the keys, and '\' escaping the next character
// (a ':', '@', '/' or '=' inside a name or value). Errors are QEMU's.
func parseFilename(filename string) (location, error) {
	loc := location{fromName: true}
	rest, ok := strings.CutPrefix(filename, Prefix)
	if !ok {
		return loc, errors.New("File name must start with 'rbd:'")
	}
	pool, rest, ok := nextToken(rest, '/')
	if !ok {
		return loc, errors.New("Pool name is required")
	}
	loc.Pool = unescape(pool)
	var image string
	var more bool
	if indexUnescaped(rest, '@') >= 0 {
		image, rest, _ = nextToken(rest, '@')
		var snap string
		snap, rest, more = nextToken(rest, ':')
		loc.Snapshot = unescape(snap)
	} else {
		image, rest, more = nextToken(rest, ':')
	}
	if indexUnescaped(image, '/') >= 0 {
		ns, img, _ := nextToken(image, '/')
		loc.Namespace = unescape(ns)
		image = img
	}
	loc.Image = unescape(image)
	for more {
		var name, value string
		var ok bool
		name, rest, ok = nextToken(rest, '=')
		if !ok {
			return loc, fmt.Errorf("conf option %s has no value", unescape(name))
		}
		value, rest, more = nextToken(rest, ':')
		name, value = unescape(name), unescape(value)
		switch name {
		case "conf":
			loc.Conf = value
		case "id":
			loc.User = value
		default:
			loc.KeyValues = append(loc.KeyValues, [2]string{name, value})
		}
	}
	return loc, nil
}

// indexUnescaped returns the index of the first c in s not preceded by a
// '\', or -1.
func indexUnescaped(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case c:
			return i
		case '\\':
			if i+1 < len(s) {
				i++
			}
		}
	}
	return -1
}

// nextToken splits s at its first unescaped delim: the token before it,
// the rest after it, and whether there was a delim.
func nextToken(s string, delim byte) (tok, rest string, found bool) {
	i := indexUnescaped(s, delim)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+1:], true
}

// unescape drops each '\' and keeps the character after it.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Open options (--image-opts driver=rbd,pool=P,image=I,...), as QEMU's
// BlockdevOptionsRbd.
const (
	optPool      = "pool"
	optNamespace = "namespace"
	optImage     = "image"
	optSnapshot  = "snapshot"
	optConf      = "conf"
	optUser      = "user"
	optKeySecret = "key-secret"
)

var openOptions = []string{"filename", optPool, optNamespace, optImage, optSnapshot, optConf, optUser, optKeySecret}

// locate finds the image a node opens: from its file name when that is an
// rbd: name, else from the open options (--image-opts), which may also be
// addressed to the protocol node as file.NAME. key-secret may come with
// either.
func locate(filename string, opts bdrv.Options) (location, error) {
	get := func(k string) string {
		if v, ok := opts[k]; ok {
			return v
		}
		return opts["file."+k]
	}
	if strings.HasPrefix(filename, Prefix) {
		loc, err := parseFilename(filename)
		if err != nil {
			return loc, err
		}
		loc.KeySecret = get(optKeySecret)
		return loc, nil
	}
	loc := location{
		Pool: get(optPool), Namespace: get(optNamespace), Image: get(optImage),
		Snapshot: get(optSnapshot), Conf: get(optConf), User: get(optUser), KeySecret: get(optKeySecret),
	}
	switch {
	case loc.Pool == "":
		return loc, errors.New("Parameter 'pool' is missing")
	case loc.Image == "":
		return loc, errors.New("Parameter 'image' is missing")
	}
	return loc, nil
}
