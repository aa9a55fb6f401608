package bdrv

import (
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
)

// Secrets are QEMU's "secret" objects (qemu-img --object
// secret,id=ID,data=STR|file=PATH[,format=raw|base64]): named passphrases
// that drivers look up by ID from options such as encrypt.key-secret. Like
// QEMU's object tree, the set is per process.
var secrets struct {
	sync.Mutex
	m map[string][]byte
}

// AddSecretObject creates a secret object from its --object description,
// with QEMU's checks and error wording, and returns its id. Objects of
// other types are refused.
func AddSecretObject(desc string) (string, error) {
	id, b, err := parseSecretObject(desc)
	if err != nil {
		return "", err
	}
	return id, AddSecret(id, b)
}

func parseSecretObject(desc string) (string, []byte, error) {
	typ, rest, _ := strings.Cut(desc, ",")
	if k, v, ok := strings.Cut(typ, "="); ok {
		if k != "qom-type" {
			return "", nil, errors.New("Parameter 'qom-type' is missing")
		}
		typ = v
	}
	if typ != "secret" {
		return "", nil, fmt.Errorf("Parameter 'qom-type' does not accept value '%s'", typ)
	}
	o, err := ParseOptionString(rest)
	if err != nil {
		return "", nil, err
	}
	for k := range o {
		switch k {
		case "id", "data", "file", "format":
		default:
			return "", nil, fmt.Errorf("Parameter '%s' is unexpected", k)
		}
	}
	id, ok := o["id"]
	if !ok {
		return "", nil, errors.New("Parameter 'id' is missing")
	}
	data, hasData := o["data"]
	file, hasFile := o["file"]
	var b []byte
	switch {
	case hasData && hasFile:
		return "", nil, errors.New("'file' and 'data' are mutually exclusive")
	case hasData:
		b = []byte(data)
	case hasFile:
		if b, err = os.ReadFile(file); err != nil {
			var pe *os.PathError
			if errors.As(err, &pe) {
				err = pe.Err
			}
			return "", nil, fmt.Errorf("Unable to read %s: Failed to open file “%s”: %s", file, file, capitalizeFirst(err.Error()))
		}
	default:
		return "", nil, errors.New("Either 'file' or 'data' must be provided")
	}
	switch f := o.String("format", "raw"); f {
	case "raw":
	case "base64":
		dec, err := base64.StdEncoding.DecodeString(string(b))
		clear(b)
		if err != nil {
			return "", nil, errors.New("Base64 data contains invalid characters")
		}
		b = dec
	default:
		return "", nil, fmt.Errorf("Parameter 'format' does not accept value '%s'", f)
	}
	return id, b, nil
}

// AddSecret registers secret data under id; the secret keeps data (the
// caller must not reuse it). An id can be added once.
func AddSecret(id string, data []byte) error {
	secrets.Lock()
	defer secrets.Unlock()
	if _, dup := secrets.m[id]; dup {
		return fmt.Errorf("attempt to add duplicate property '%s' to object (type 'container')", id)
	}
	if secrets.m == nil {
		secrets.m = map[string][]byte{}
	}
	secrets.m[id] = data
	return nil
}

// RemoveSecret forgets the secret id and zeroes its data.
func RemoveSecret(id string) {
	secrets.Lock()
	defer secrets.Unlock()
	clear(secrets.m[id])
	delete(secrets.m, id)
}

// LookupSecret returns a copy of secret id's data, which the caller should
// zero after use. An unknown id gives QEMU's "No secret with id 'x'".
func LookupSecret(id string) ([]byte, error) {
	secrets.Lock()
	defer secrets.Unlock()
	b, ok := secrets.m[id]
	if !ok {
		return nil, fmt.Errorf("No secret with id '%s'", id)
	}
	return append([]byte(nil), b...), nil
}

func capitalizeFirst(s string) string {
	if s != "" && s[0] >= 'a' && s[0] <= 'z' {
		return string(s[0]-'a'+'A') + s[1:]
	}
	return s
}

// KeyError is the failure to open an encrypted image for want of its key:
// no key-secret option, no such secret, or a passphrase that opens no key
// slot. Tools that can work on the metadata alone (check) must not fall
// back to doing so: qemu-img refuses.
type KeyError struct{ Err error }

func (e *KeyError) Error() string { return e.Err.Error() }
func (e *KeyError) Unwrap() error { return e.Err }
