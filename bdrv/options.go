package bdrv

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
)

// Options are driver options as name=value strings (qemu-img's -o).
type Options map[string]string

// OptionType says how an option's value is parsed.
type OptionType int

// Option types, as QEMU's QemuOptType.
const (
	OptString OptionType = iota
	OptBool
	OptNumber
	OptSize
)

// OptionSpec describes one option a driver accepts.
type OptionSpec struct {
	Name string
	Type OptionType
	// Default is the value qemu-img's "Formatting ..." line shows when
	// the option is not given (QEMU's def_value_str); "" shows it only
	// when given.
	Default string
	Help    string
}

const (
	// OptForceShare opens read-only without claiming exclusive access, like
	// qemu-img -U: works while another process writes the image. It is a
	// common option of every node, and children inherit it.
	OptForceShare = "force-share"
	// OptLocking is the file driver's option: QEMU-compatible image
	// locking "on" (default), "auto" (the same here) or "off". Like any
	// protocol option, it is given to a format node's file as
	// "file.locking".
	OptLocking = "locking"
)

// ChainOptions are the options of a backing file: those addressed to it
// with QEMU's "backing." prefix (backing.encrypt.key-secret=ID), then, where
// it has none of its own, the options it inherits from its overlay (QEMU's
// bdrv_backing_options): cache.direct, cache.no-flush and force-share.
// Backing files are opened read-only unless backing.read-only says
// otherwise.
func (o Options) ChainOptions() Options {
	out := o.childOptions("backing.")
	for _, k := range inheritedOptions {
		if _, ok := out[k]; !ok {
			if v, ok := o[k]; ok {
				out[k] = v
			}
		}
	}
	return out
}

// BackingOverridden reports whether o addresses options to the backing
// file ("backing.*"), QEMU's bdrv_backing_overridden: the backing node is
// then known by its options (a json: name), not by the file name the image
// records.
func (o Options) BackingOverridden() bool {
	for k := range o {
		if strings.HasPrefix(k, "backing.") {
			return true
		}
	}
	return false
}

// ProtocolCreateOptions are the options of creating a plain file, which the
// file protocol and the raw format (a file with nothing else in it) share.
var ProtocolCreateOptions = []OptionSpec{
	{Name: "size", Type: OptSize, Help: "Virtual disk size"},
	{Name: "preallocation", Type: OptString,
		Help: "Preallocation mode (allowed values: off, falloc, full)"},
	{Name: "nocow", Type: OptBool,
		Help: "Turn off copy-on-write (valid only on btrfs)"},
}

// ParseOptionString splits "a=1,b=2" into Options. A bare name means "on"
// for booleans (qemu-img accepts "-o lazy_refcounts"). ",," escapes a comma
// inside a value, as in QEMU.
func ParseOptionString(s string) (Options, error) {
	o := Options{}
	if s == "" {
		return o, nil
	}
	var parts []string
	cur := strings.Builder{}
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	parts = append(parts, cur.String())
	for _, p := range parts {
		if p == "" {
			continue
		}
		name, val, ok := strings.Cut(p, "=")
		if !ok {
			val = "on"
		}
		if name == "" {
			return nil, fmt.Errorf("invalid option '%s'", p)
		}
		o[name] = val
	}
	return o, nil
}

// Merge returns o with the entries of other added (other wins).
func (o Options) Merge(other Options) Options {
	out := Options{}
	for k, v := range o {
		out[k] = v
	}
	for k, v := range other {
		out[k] = v
	}
	return out
}

// ParseOptions checks opts against specs: unknown names and values of the
// wrong type are errors, worded as qemu-img words them.
func ParseOptions(specs []OptionSpec, opts Options) (Options, error) {
	out := Options{}
	for name, val := range opts {
		var spec *OptionSpec
		for i := range specs {
			if specs[i].Name == name {
				spec = &specs[i]
				break
			}
		}
		if spec == nil {
			return nil, fmt.Errorf("Invalid parameter '%s'", name)
		}
		switch spec.Type {
		case OptBool:
			if _, err := ParseBool(val); err != nil {
				return nil, fmt.Errorf("Parameter '%s' expects 'on' or 'off'", name)
			}
		case OptNumber:
			if _, err := strconv.ParseUint(val, 0, 64); err != nil {
				return nil, fmt.Errorf("Parameter '%s' expects a number", name)
			}
		case OptSize:
			if _, err := ParseSize(val); err != nil {
				return nil, fmt.Errorf("Parameter '%s' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.", name)
			}
		}
		out[name] = val
	}
	return out, nil
}

// ParseBool parses QEMU's boolean spellings.
func ParseBool(s string) (bool, error) {
	switch s {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, fmt.Errorf("invalid boolean '%s'", s)
}

// ParseNumber parses a QemuOpts number as strtoull does: 0x and 0 prefixes,
// a leading minus wraps around; an error wraps strconv.ErrRange when the
// value does not fit.
func ParseNumber(v string) (uint64, error) {
	if strings.Contains(v, "_") {
		return 0, strconv.ErrSyntax
	}
	n, err := strconv.ParseUint(strings.TrimPrefix(v, "-"), 0, 64)
	if err != nil {
		return 0, err
	}
	if strings.HasPrefix(v, "-") {
		n = -n
	}
	return n, nil
}

// Has reports whether name was given.
func (o Options) Has(name string) bool { _, ok := o[name]; return ok }

// String returns the option's value or def.
func (o Options) String(name, def string) string {
	if v, ok := o[name]; ok {
		return v
	}
	return def
}

// Bool returns the option as a boolean or def. Values were validated by
// ParseOptions; an invalid one yields def.
func (o Options) Bool(name string, def bool) bool {
	if v, ok := o[name]; ok {
		if b, err := ParseBool(v); err == nil {
			return b
		}
	}
	return def
}

// Size returns the option as a byte count or def.
func (o Options) Size(name string, def int64) (int64, error) {
	v, ok := o[name]
	if !ok {
		return def, nil
	}
	n, err := ParseSize(v)
	if err != nil {
		return 0, fmt.Errorf("invalid value for %s: %w", name, err)
	}
	return n, nil
}

// ErrInvalidSize is wrapped by ParseSize errors; ErrSizeTooLarge too when the
// size does not fit in 63 bits.
var (
	ErrInvalidSize  = errors.New("invalid size")
	ErrSizeTooLarge = errors.New("size too large")
)

// ParseSize parses a size with qemu-img's suffixes (QEMU's qemu_strtosz):
// a non-negative number, optionally with a fraction, followed by an
// optional unit b/B (bytes), k/K, M, G, T, P or E (powers of 1024). No unit
// means bytes. A fraction needs a unit larger than bytes, and the result
// must fit in 63 bits.
func ParseSize(s string) (int64, error) {
	orig := s
	s = strings.TrimSpace(s)
	if s == "" || s[0] == '-' || s[0] == '+' {
		return 0, fmt.Errorf("%w: '%s'", ErrInvalidSize, orig)
	}
	i := 0
	for i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] == '.') {
		i++
	}
	num, unit := s[:i], s[i:]
	if num == "" || strings.Count(num, ".") > 1 {
		return 0, fmt.Errorf("%w: '%s'", ErrInvalidSize, orig)
	}
	var mul int64
	switch strings.ToLower(unit) {
	case "", "b":
		mul = 1
	case "k":
		mul = 1 << 10
	case "m":
		mul = 1 << 20
	case "g":
		mul = 1 << 30
	case "t":
		mul = 1 << 40
	case "p":
		mul = 1 << 50
	case "e":
		mul = 1 << 60
	default:
		return 0, fmt.Errorf("%w: '%s' (unknown suffix '%s')", ErrInvalidSize, orig, unit)
	}
	if strings.Contains(num, ".") {
		if mul == 1 {
			return 0, fmt.Errorf("%w: '%s' (a fraction needs a unit)", ErrInvalidSize, orig)
		}
		r, ok := new(big.Rat).SetString(num)
		if !ok {
			return 0, fmt.Errorf("%w: '%s'", ErrInvalidSize, orig)
		}
		r.Mul(r, new(big.Rat).SetInt64(mul))
		v := new(big.Int).Quo(r.Num(), r.Denom())
		if !v.IsInt64() {
			return 0, fmt.Errorf("%w: %w: '%s'", ErrInvalidSize, ErrSizeTooLarge, orig)
		}
		return v.Int64(), nil
	}
	v, err := strconv.ParseUint(num, 10, 64)
	if err != nil || v > math.MaxInt64/uint64(mul) {
		return 0, fmt.Errorf("%w: %w: '%s'", ErrInvalidSize, ErrSizeTooLarge, orig)
	}
	return int64(v) * mul, nil
}
