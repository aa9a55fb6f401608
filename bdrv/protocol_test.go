package bdrv

import "testing"

// TestHasProtocol: a ':' before any '/' names a protocol, as QEMU's
// path_has_protocol decides.
func TestHasProtocol(t *testing.T) {
	for _, c := range []struct {
		name string
		want bool
	}{
		{"rbd:pool/image", true},
		{"null-co://", true},
		{"a.qcow2", false},
		{"/abs/a:b", false},
		{"dir/a:b", false},
		{"./x:y", false},
	} {
		if got := HasProtocol(c.name); got != c.want {
			t.Errorf("HasProtocol(%q) = %v", c.name, got)
		}
	}
}

// TestForFilename: raw takes the create options of the protocol its file
// name has a prefix of; other formats keep theirs.
func TestForFilename(t *testing.T) {
	proto := &Format{Name: "test-prefixed", Protocol: true, FilenamePrefix: "tp:",
		CreateOptions: []OptionSpec{{Name: "size"}, {Name: "object_size"}}}
	Register(proto)
	defer func() {
		formats.Lock()
		delete(formats.byName, proto.Name)
		formats.Unlock()
	}()
	raw := &Format{Name: "raw", CreateOptions: ProtocolCreateOptions}
	other := &Format{Name: "fmt", CreateOptions: []OptionSpec{{Name: "size"}}}
	if got := raw.ForFilename("tp:x").CreateOptions; len(got) != 2 || got[1].Name != "object_size" {
		t.Errorf("raw on tp: %v", got)
	}
	if got := raw.ForFilename("x.img"); got != raw {
		t.Errorf("raw on a file: %v", got)
	}
	if got := other.ForFilename("tp:x"); got != other {
		t.Errorf("fmt on tp: %v", got)
	}
	if p := prefixedProtocol("tp:pool/x"); p != proto {
		t.Errorf("prefixedProtocol: %v", p)
	}
}
