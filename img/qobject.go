package img

import (
	"fmt"
	"io"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Dict is a JSON object that prints the way QEMU's QDict does. qemu-img
// builds its JSON output as a QDict, a hash table of 512 buckets, and prints
// it bucket by bucket; keys within one bucket come out newest first. The
// resulting order looks random ("backing-filename-format" before
// "virtual-size") but is fixed, and tools that diff qemu-img output depend
// on it, so Dict reproduces it exactly: Set records insertion order, and
// printing sorts by bucket.
//
// Values are string, bool, signed or unsigned integers, float64, *Dict and
// []any.
type Dict struct {
	keys []string
	vals map[string]any
}

// NewDict returns an empty Dict.
func NewDict() *Dict { return &Dict{vals: map[string]any{}} }

// Set adds or replaces key. Replacing keeps the key's original position, as
// QDict's qdict_put does.
func (d *Dict) Set(key string, v any) {
	if _, ok := d.vals[key]; !ok {
		d.keys = append(d.keys, key)
	}
	d.vals[key] = v
}

// Get returns the value stored under key.
func (d *Dict) Get(key string) (any, bool) {
	v, ok := d.vals[key]
	return v, ok
}

// Len is the number of keys.
func (d *Dict) Len() int { return len(d.keys) }

// qdictBuckets is QDICT_BUCKET_MAX in qobject/qdict.c.
const qdictBuckets = 512

// qdictHash is tdb_hash from qobject/qdict.c, reduced to a bucket.
func qdictHash(key string) uint32 {
	v := uint32(0x238F13AF) * uint32(len(key))
	for i := 0; i < len(key); i++ {
		v += uint32(key[i]) << (uint(i) * 5 % 24)
	}
	return (1103515243*v + 12345) % qdictBuckets
}

// Keys returns the keys in the order QEMU prints them: by hash bucket, and
// within a bucket the most recently inserted first.
func (d *Dict) Keys() []string {
	type ent struct {
		key    string
		bucket uint32
		seq    int
	}
	ents := make([]ent, len(d.keys))
	for i, k := range d.keys {
		ents[i] = ent{k, qdictHash(k), i}
	}
	sort.Slice(ents, func(i, j int) bool {
		if ents[i].bucket != ents[j].bucket {
			return ents[i].bucket < ents[j].bucket
		}
		return ents[i].seq > ents[j].seq
	})
	out := make([]string, len(ents))
	for i, e := range ents {
		out[i] = e.key
	}
	return out
}

// WriteJSONPretty writes v as qobject_to_json_pretty does: four-space
// indentation, "key": value, and QEMU's string escapes (\uXXXX in upper-case
// hex for control and non-ASCII characters).
func WriteJSONPretty(w io.Writer, v any) error {
	var b strings.Builder
	writeJSON(&b, v, 0)
	_, err := io.WriteString(w, b.String())
	return err
}

func writeIndent(b *strings.Builder, n int) {
	for range n {
		b.WriteString("    ")
	}
}

// jsonCompact returns v as qobject_to_json does: on one line,
// members separated by ", " (the form of "json:{...}" file names).
func jsonCompact(v any) string {
	var b strings.Builder
	writeJSON(&b, v, -1)
	return b.String()
}

// writeJSON writes v at indent level indent; a negative indent writes it
// compactly on one line.
func writeJSON(b *strings.Builder, v any, indent int) {
	next := func(i int) {
		if i > 0 {
			b.WriteString(",")
		}
		if indent < 0 {
			if i > 0 {
				b.WriteString(" ")
			}
			return
		}
		b.WriteString("\n")
		writeIndent(b, indent+1)
	}
	end := func(c string) {
		if indent >= 0 {
			b.WriteString("\n")
			writeIndent(b, indent)
		}
		b.WriteString(c)
	}
	sub := indent + 1
	if indent < 0 {
		sub = -1
	}
	switch x := v.(type) {
	case *Dict:
		b.WriteString("{")
		for i, k := range x.Keys() {
			next(i)
			writeJSONString(b, k)
			b.WriteString(": ")
			writeJSON(b, x.vals[k], sub)
		}
		end("}")
	case []any:
		b.WriteString("[")
		for i, e := range x {
			next(i)
			writeJSON(b, e, sub)
		}
		end("]")
	case string:
		writeJSONString(b, x)
	default:
		b.WriteString(scalarString(v))
	}
}

// scalarString formats a number or boolean as QEMU's QNum/QBool do.
func scalarString(v any) string {
	switch x := v.(type) {
	case bool:
		return strconv.FormatBool(x)
	case int:
		return strconv.FormatInt(int64(x), 10)
	case int32:
		return strconv.FormatInt(int64(x), 10)
	case int64:
		return strconv.FormatInt(x, 10)
	case uint:
		return strconv.FormatUint(uint64(x), 10)
	case uint32:
		return strconv.FormatUint(uint64(x), 10)
	case uint64:
		return strconv.FormatUint(x, 10)
	case float64:
		// qnum_to_string: %.17g, then trailing zeros trimmed.
		return strconv.FormatFloat(x, 'g', -1, 64)
	case nil:
		return "null"
	}
	return fmt.Sprint(v)
}

func writeJSONString(b *strings.Builder, s string) {
	b.WriteByte('"')
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		i += size
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			switch {
			case r > 0xFFFF:
				r -= 0x10000
				fmt.Fprintf(b, `\u%04X\u%04X`, 0xD800+(r>>10), 0xDC00+(r&0x3FF))
			case r < 0x20 || r >= 0x7F:
				// utf8.RuneError stands for an invalid byte, which
				// QEMU also prints as U+FFFD.
				fmt.Fprintf(b, `\u%04X`, r)
			default:
				b.WriteRune(r)
			}
		}
	}
	b.WriteByte('"')
}

// writeHumanDict prints d the way bdrv_image_info_specific_dump does for
// "Format specific information": one "key: value" per line, dashes in keys
// shown as spaces, nested objects and lists indented by four more spaces,
// list elements as "[i]:".
func writeHumanDict(b *strings.Builder, indent int, d *Dict) {
	for _, k := range d.Keys() {
		v := d.vals[k]
		composite := isComposite(v)
		writeIndent(b, indent)
		b.WriteString(strings.ReplaceAll(k, "-", " "))
		if composite {
			b.WriteString(":\n")
		} else {
			b.WriteString(": ")
		}
		writeHumanValue(b, indent+1, v)
		if !composite {
			b.WriteString("\n")
		}
	}
}

func writeHumanList(b *strings.Builder, indent int, l []any) {
	for i, v := range l {
		composite := isComposite(v)
		writeIndent(b, indent)
		fmt.Fprintf(b, "[%d]:", i)
		if composite {
			b.WriteString("\n")
		} else {
			b.WriteString(" ")
		}
		writeHumanValue(b, indent+1, v)
		if !composite {
			b.WriteString("\n")
		}
	}
}

func writeHumanValue(b *strings.Builder, indent int, v any) {
	switch x := v.(type) {
	case *Dict:
		writeHumanDict(b, indent, x)
	case []any:
		writeHumanList(b, indent, x)
	case string:
		b.WriteString(x)
	default:
		b.WriteString(scalarString(v))
	}
}

func isComposite(v any) bool {
	switch v.(type) {
	case *Dict, []any:
		return true
	}
	return false
}

// ToQObject converts a driver-provided value into the Dict/[]any/scalar tree
// that the printers understand. Structs become Dicts with their fields in
// declaration order (their insertion order, as QEMU's generated visitors
// insert QAPI members in schema order), named by their json tags;
// "omitempty" fields that are zero and nil pointers are left out, like
// absent optional QAPI members. Maps become Dicts with sorted keys; slices
// become lists.
func ToQObject(v any) any {
	if v == nil {
		return nil
	}
	switch x := v.(type) {
	case *Dict:
		return x
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = ToQObject(e)
		}
		return out
	}
	return fromReflect(reflect.ValueOf(v))
}

func fromReflect(rv reflect.Value) any {
	switch rv.Kind() {
	case reflect.Pointer, reflect.Interface:
		if rv.IsNil() {
			return nil
		}
		return fromReflect(rv.Elem())
	case reflect.Struct:
		d := NewDict()
		rt := rv.Type()
		for i := range rt.NumField() {
			f := rt.Field(i)
			if !f.IsExported() {
				continue
			}
			name, omitEmpty := f.Name, false
			if tag, ok := f.Tag.Lookup("json"); ok {
				parts := strings.Split(tag, ",")
				if parts[0] == "-" {
					continue
				}
				if parts[0] != "" {
					name = parts[0]
				}
				for _, p := range parts[1:] {
					if p == "omitempty" {
						omitEmpty = true
					}
				}
			}
			fv := rv.Field(i)
			if omitEmpty && fv.IsZero() {
				continue
			}
			if (fv.Kind() == reflect.Pointer || fv.Kind() == reflect.Interface) && fv.IsNil() {
				continue
			}
			d.Set(name, fromReflect(fv))
		}
		return d
	case reflect.Map:
		d := NewDict()
		keys := rv.MapKeys()
		sort.Slice(keys, func(i, j int) bool { return fmt.Sprint(keys[i]) < fmt.Sprint(keys[j]) })
		for _, k := range keys {
			d.Set(fmt.Sprint(k), fromReflect(rv.MapIndex(k)))
		}
		return d
	case reflect.Slice, reflect.Array:
		out := make([]any, rv.Len())
		for i := range out {
			out[i] = fromReflect(rv.Index(i))
		}
		return out
	case reflect.String:
		return rv.String()
	case reflect.Bool:
		return rv.Bool()
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return rv.Int()
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return rv.Uint()
	case reflect.Float32, reflect.Float64:
		return rv.Float()
	}
	return fmt.Sprint(rv.Interface())
}
