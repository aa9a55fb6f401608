package img

import "ublkimg/bdrv"

// optionsName returns the json: name QEMU gives the image n when its
// protocol node is named by options (bdrv.OptionNamer), as
// bdrv_refresh_filename does: the format's driver and its file's options,
// or the protocol's options alone when n is the protocol node.
func optionsName(n *bdrv.Node) (string, bool) {
	proto := n.File
	if proto == nil {
		proto = n
	}
	namer, ok := proto.Driver().(bdrv.OptionNamer)
	if !ok {
		return "", false
	}
	file := NewDict()
	for _, kv := range namer.NameOptions() {
		file.Set(kv[0], kv[1])
	}
	file.Set("driver", proto.Format.Name)
	if proto == n {
		return "json:" + jsonCompact(file), true
	}
	d := NewDict()
	d.Set("driver", n.Format.Name)
	d.Set("file", file)
	return "json:" + jsonCompact(d), true
}
