package rbd

import (
	"reflect"
	"testing"

	"ublkimg/bdrv"
)

// TestParseFilename checks QEMU's rbd: syntax, escapes and messages.
func TestParseFilename(t *testing.T) {
	for _, c := range []struct {
		name string
		want location
		err  string
	}{
		{"rbd:pool/image", location{Pool: "pool", Image: "image", fromName: true}, ""},
		{"rbd:pool/ns/image@snap", location{Pool: "pool", Namespace: "ns", Image: "image", Snapshot: "snap", fromName: true}, ""},
		{"rbd:pool/image:conf=/etc/c.conf:id=admin:rbd_cache=false",
			location{Pool: "pool", Image: "image", Conf: "/etc/c.conf", User: "admin", KeyValues: [][2]string{{"rbd_cache", "false"}}, fromName: true}, ""},
		{`rbd:po\/ol/im\:a\@ge@sn\:ap:mon_host=1.2.3.4\:6789`,
			location{Pool: "po/ol", Image: "im:a@ge", Snapshot: "sn:ap", KeyValues: [][2]string{{"mon_host", "1.2.3.4:6789"}}, fromName: true}, ""},
		{"rbd:pool", location{}, "Pool name is required"},
		{"rbd:pool/image:conf", location{}, "conf option conf has no value"},
		{"file:x", location{}, "File name must start with 'rbd:'"},
	} {
		got, err := parseFilename(c.name)
		if c.err != "" {
			if err == nil || err.Error() != c.err {
				t.Errorf("%s: error %v, want %s", c.name, err, c.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: %+v, %v; want %+v", c.name, got, err, c.want)
		}
	}
}

// TestLocateOptions checks --image-opts options, direct or as file.NAME.
func TestLocateOptions(t *testing.T) {
	got, err := locate("", bdrv.Options{"file.pool": "p", "file.image": "i", "file.conf": "c", "key-secret": "s", "snapshot": "sn"})
	want := location{Pool: "p", Image: "i", Conf: "c", KeySecret: "s", Snapshot: "sn"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("%+v, %v; want %+v", got, err, want)
	}
	if _, err := locate("", bdrv.Options{"image": "i"}); err == nil || err.Error() != "Parameter 'pool' is missing" {
		t.Fatalf("no pool: %v", err)
	}
}
