package file

import (
	"fmt"
	"strconv"

	"ublkimg/bdrv"
)

// checkOpenOptions checks the values of file-posix's runtime options as
// QEMU's raw_open_common does, in its words and order (types first). The
// options the driver honours (locking; cache.direct through the node's
// cache mode) and those that change no outcome here (aio: every request
// goes through io_uring; aio-max-batch, drop-cache and
// x-check-cache-dropped tune what this driver does not do) are taken when
// their values are valid; pr-manager names an object ublkimg has no way to
// define, so any value is refused.
func checkOpenOptions(n *bdrv.Node, opts bdrv.Options) error {
	if v, ok := opts["aio-max-batch"]; ok {
		if _, err := strconv.ParseInt(v, 0, 64); err != nil {
			return fmt.Errorf("Parameter 'aio-max-batch' expects a number")
		}
	}
	for _, k := range []string{"drop-cache", "x-check-cache-dropped"} {
		if v, ok := opts[k]; ok {
			if _, err := bdrv.ParseBool(v); err != nil {
				return fmt.Errorf("Parameter '%s' expects 'on' or 'off'", k)
			}
		}
	}
	if v, ok := opts["aio"]; ok {
		switch v {
		case "threads", "io_uring":
		case "native":
			if !n.Cache.Direct() {
				return fmt.Errorf("aio=native was specified, but it requires cache.direct=on, which was not specified.")
			}
		default:
			return fmt.Errorf("invalid parameter value: %s", v)
		}
	}
	if v, ok := opts[bdrv.OptLocking]; ok && v != "on" && v != "off" && v != "auto" {
		return fmt.Errorf("invalid parameter value: %s", v)
	}
	if v, ok := opts["pr-manager"]; ok {
		return fmt.Errorf("No persistent reservation manager with id '%s'", v)
	}
	return nil
}
