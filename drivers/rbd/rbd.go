package rbd

import (
	"encoding/base64"
	"errors"
	"fmt"
	"math/bits"
	"unsafe"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/uring"
)

func init() {
	bdrv.Register(&bdrv.Format{
		Name:           "rbd",
		Protocol:       true,
		FilenamePrefix: Prefix,
		Open:           open,
		Create:         create,
		CreateOptions: []bdrv.OptionSpec{
			{Name: "size", Type: bdrv.OptSize, Help: "Virtual disk size"},
			{Name: "cluster_size", Type: bdrv.OptSize, Help: "RBD object size"},
			// What raw and qcow2 pass down for a file; only "off" means
			// anything to RBD, whose images are thin.
			{Name: "preallocation", Type: bdrv.OptString, Help: "Preallocation mode (allowed values: off)"},
			{Name: "nocow", Type: bdrv.OptBool, Help: "Turn off copy-on-write (no effect on RBD)"},
		},
	})
}

// Defaults for librados set before the configuration file and the name's
// key=value pairs (which override them): an unreachable cluster or a
// monitor that does not answer is an error after these many seconds, not
// a hang. OSD operations get no timeout (rados_osd_op_timeout stays 0):
// an OSD that restarts stalls I/O, which then resumes, as with the kernel
// client.
var radosDefaults = [][2]string{
	{"client_mount_timeout", "20"},
	{"rados_mon_op_timeout", "30"},
}

// eventTypeEventfd is librbd's EVENT_TYPE_EVENTFD.
const eventTypeEventfd = 2

// imageInfo is librbd's rbd_image_info_t (rbd_stat).
type imageInfo struct {
	Size, ObjSize, NumObjs uint64
	Order                  int32
	BlockNamePrefix        [24]byte
	ParentPool             int64
	ParentName             [96]byte
}

// conn is a connection to a cluster and an I/O context on a pool.
type conn struct {
	cluster, ioctx uintptr
}

// connect connects to the cluster of loc and opens its pool (and
// namespace). It blocks: callers run it off the loop. cache sets rbd_cache,
// as QEMU does for cache modes other than none.
func connect(loc location, cache bool) (*conn, error) {
	if err := load(); err != nil {
		return nil, err
	}
	c := &conn{}
	var user *byte
	if loc.User != "" {
		user = cstring(loc.User)
	}
	if r := call(lib.radosCreate, uintptr(unsafe.Pointer(&c.cluster)), uintptr(unsafe.Pointer(user))); r < 0 {
		return nil, fmt.Errorf("error initializing: %w", errnoText(r))
	}
	fail := func(err error) (*conn, error) {
		c.shutdown()
		return nil, err
	}
	for _, kv := range radosDefaults {
		c.set(kv[0], kv[1])
	}
	// The default locations when no conf= is given; their absence is no
	// error.
	var conf *byte
	if loc.Conf != "" {
		conf = cstring(loc.Conf)
	}
	if r := call(lib.radosConfReadFile, c.cluster, uintptr(unsafe.Pointer(conf))); r < 0 && loc.Conf != "" {
		return fail(fmt.Errorf("error reading conf file %s: %w", loc.Conf, errnoText(r)))
	}
	for _, kv := range loc.KeyValues {
		if r := c.set(kv[0], kv[1]); r < 0 {
			return fail(fmt.Errorf("invalid conf option %s: %w", kv[0], errnoText(r)))
		}
	}
	if loc.KeySecret != "" {
		key, err := bdrv.LookupSecret(loc.KeySecret)
		if err != nil {
			return fail(err)
		}
		// librados takes the key base64-encoded, as a keyring holds it;
		// the secret holds its bytes (QEMU's
		// qcrypto_secret_lookup_as_base64).
		r := c.set("key", base64.StdEncoding.EncodeToString(key))
		clear(key)
		if r < 0 {
			return fail(fmt.Errorf("Could not set 'key': %w", errnoText(r)))
		}
	}
	if cache {
		c.set("rbd_cache", "true")
	} else {
		c.set("rbd_cache", "false")
	}
	if r := call(lib.radosConnect, c.cluster); r < 0 {
		return fail(fmt.Errorf("error connecting: %w", errnoText(r)))
	}
	if r := call(lib.radosIoctxCreate, c.cluster, uintptr(unsafe.Pointer(cstring(loc.Pool))), uintptr(unsafe.Pointer(&c.ioctx))); r < 0 {
		c.ioctx = 0
		return fail(fmt.Errorf("error opening pool %s: %w", loc.Pool, errnoText(r)))
	}
	if loc.Namespace != "" {
		var exists bool
		if r := call(lib.namespaceExists, c.ioctx, uintptr(unsafe.Pointer(cstring(loc.Namespace))), uintptr(unsafe.Pointer(&exists))); r < 0 {
			return fail(fmt.Errorf("error checking namespace: %w", errnoText(r)))
		}
		if !exists {
			return fail(fmt.Errorf("namespace '%s' does not exist", loc.Namespace))
		}
		call(lib.radosIoctxSetNamespace, c.ioctx, uintptr(unsafe.Pointer(cstring(loc.Namespace))))
	}
	return c, nil
}

func (c *conn) set(name, value string) int {
	return call(lib.radosConfSet, c.cluster, uintptr(unsafe.Pointer(cstring(name))), uintptr(unsafe.Pointer(cstring(value))))
}

// shutdown releases the pool context and the connection.
func (c *conn) shutdown() {
	if c.ioctx != 0 {
		call(lib.radosIoctxDestroy, c.ioctx)
		c.ioctx = 0
	}
	if c.cluster != 0 {
		call(lib.radosShutdown, c.cluster)
		c.cluster = 0
	}
}

// errnoText is librbd's (or librados's) negative result r as an error:
// uring's Errno with the C library's text, as qemu-img prints errnos ("No
// such file or directory"); errors.Is(err, unix.EXXX) matches it.
func errnoText(r int) error { return uring.NewErrno(unix.Errno(-r), true) }

// driver is one open image. Its image handle is shared by every queue of
// a device: two handles on one image would fight over RBD's exclusive
// lock.
type driver struct {
	node  *bdrv.Node
	loc   location
	conn  *conn
	image uintptr

	objectSize int64

	// growMu serialises the resizes that writes past the end need (RBD
	// refuses I/O beyond the image's size).
	growMu coroutine.Mutex

	events // aio.go
}

func open(co *coroutine.Co, n *bdrv.Node, opts bdrv.Options) (bdrv.Driver, error) {
	loc, err := locate(n.Filename, opts)
	if err != nil {
		return nil, err
	}
	if loc.Snapshot != "" && !n.ReadOnly {
		return nil, errors.New("rbd snapshots are read-only")
	}
	d := &driver{node: n, loc: loc}
	co.Offload(func() { err = d.openImage() })
	if err != nil {
		return nil, err
	}
	if err := d.initEvents(d); err != nil {
		co.Offload(d.closeImage)
		return nil, err
	}
	return d, nil
}

// openImage connects and opens the image (blocking).
func (d *driver) openImage() error {
	c, err := connect(d.loc, !d.node.Cache.Direct())
	if err != nil {
		return err
	}
	var snap *byte
	if d.loc.Snapshot != "" {
		snap = cstring(d.loc.Snapshot)
	}
	fn := lib.open
	if d.node.ReadOnly {
		// No watch and no exclusive lock: a reader does not disturb
		// the image's writer.
		fn = lib.openReadOnly
	}
	if r := call(fn, c.ioctx, uintptr(unsafe.Pointer(cstring(d.loc.Image))), uintptr(unsafe.Pointer(&d.image)), uintptr(unsafe.Pointer(snap))); r < 0 {
		c.shutdown()
		return fmt.Errorf("error reading header from %s: %w", d.loc.Image, errnoText(r))
	}
	d.conn = c
	var info imageInfo
	if r := call(lib.stat, d.image, uintptr(unsafe.Pointer(&info)), unsafe.Sizeof(info)); r < 0 {
		d.closeImage()
		return fmt.Errorf("error getting image info from %s: %w", d.loc.Image, errnoText(r))
	}
	d.objectSize = int64(info.ObjSize)
	d.node.SetLength(int64(info.Size))
	return nil
}

// closeImage closes the image and the connection (blocking).
func (d *driver) closeImage() {
	if d.image != 0 {
		call(lib.close, d.image)
		d.image = 0
	}
	if d.conn != nil {
		d.conn.shutdown()
		d.conn = nil
	}
}

// Close implements bdrv.Driver. bdrv drained the node first, so no
// request is in flight and no poller runs.
func (d *driver) Close(co *coroutine.Co) error {
	co.Offload(d.closeImage)
	d.closeEvents()
	return nil
}

// RefreshLimits implements bdrv.LimitsRefresher: librbd takes any byte
// range; discard and write-zeroes work in whole objects best, as in QEMU.
func (d *driver) RefreshLimits() bdrv.Limits {
	return bdrv.Limits{
		RequestAlignment:  1,
		OptTransfer:       d.objectSize,
		PdiscardAlignment: d.objectSize,
	}
}

// HasZeroInit implements bdrv.ZeroIniter: a new RBD image reads as zeros.
func (d *driver) HasZeroInit() bool { return true }

// ClusterSize is the image's object size (qemu-img info's cluster_size).
func (d *driver) ClusterSize() int64 { return d.objectSize }

// OpenOptions implements bdrv.OptionLister.
func (d *driver) OpenOptions() []string { return openOptions }

// Truncate implements bdrv.Truncater with rbd_resize2 (run off the loop:
// it waits for the cluster).
func (d *driver) Truncate(co *coroutine.Co, size int64, exact bool, prealloc bdrv.Prealloc) error {
	if prealloc != bdrv.PreallocOff {
		return fmt.Errorf("Unsupported preallocation mode '%s'", prealloc)
	}
	if err := d.resize(co, size); err != nil {
		return fmt.Errorf("Failed to resize file: %w", err)
	}
	return nil
}

func (d *driver) resize(co *coroutine.Co, size int64) error {
	var r int
	co.Offload(func() {
		r = call(lib.resize2, d.image, uintptr(size), 1, lib.progressCallback, 0)
	})
	if r < 0 {
		return errnoText(r)
	}
	d.node.SetLength(size)
	return nil
}

// grow makes the image at least end bytes long before a write that
// reaches past its end (QEMU's rbd driver does the same: librbd refuses
// I/O beyond the size).
func (d *driver) grow(co *coroutine.Co, end int64) error {
	d.growMu.Lock(co)
	defer d.growMu.Unlock(co)
	if end <= d.node.Length() {
		return nil
	}
	return d.resize(co, end)
}

// create makes a new image (rbd_create4), as QEMU's qemu_rbd_co_create_opts.
func create(co *coroutine.Co, req *bdrv.CreateRequest) error {
	loc, err := locate(req.Filename, req.Options)
	if err != nil {
		return err
	}
	if loc.Snapshot != "" {
		return errors.New("Can't use snapshot name for image creation")
	}
	if p := req.Options.String("preallocation", "off"); p != "off" {
		return fmt.Errorf("Unsupported preallocation mode '%s'", p)
	}
	size := req.Size
	if req.Options.Has("size") {
		if size, err = req.Options.Size("size", 0); err != nil {
			return err
		}
	}
	size = (size + 511) &^ 511
	var order int
	if req.Options.Has("cluster_size") {
		objsize, err := req.Options.Size("cluster_size", 0)
		if err != nil {
			return err
		}
		switch {
		case objsize&(objsize-1) != 0:
			return errors.New("obj size needs to be power of 2")
		case objsize < 4096:
			return errors.New("obj size too small")
		}
		order = bits.TrailingZeros64(uint64(objsize))
	}
	co.Offload(func() { err = createImage(loc, size, order) })
	return err
}

// imageOptionOrder is librbd's RBD_IMAGE_OPTION_ORDER.
const imageOptionOrder = 2

func createImage(loc location, size int64, order int) error {
	c, err := connect(loc, false)
	if err != nil {
		return err
	}
	defer c.shutdown()
	var opts uintptr
	call(lib.optsCreate, uintptr(unsafe.Pointer(&opts)))
	defer call(lib.optsDestroy, opts)
	if order != 0 {
		if r := call(lib.optsSetUint64, opts, imageOptionOrder, uintptr(order)); r < 0 {
			return fmt.Errorf("error rbd create: %w", errnoText(r))
		}
	}
	if r := call(lib.create4, c.ioctx, uintptr(unsafe.Pointer(cstring(loc.Image))), uintptr(size), opts); r < 0 {
		return fmt.Errorf("error rbd create: %w", errnoText(r))
	}
	return nil
}

// NameOptions are the strong options QEMU names an RBD node by
// ("json:{...}"): its file name is parsed into options at the open.
func (d *driver) NameOptions() [][2]string {
	l := d.loc
	out := [][2]string{{optPool, l.Pool}}
	if l.Namespace != "" || l.fromName {
		out = append(out, [2]string{optNamespace, l.Namespace})
	}
	out = append(out, [2]string{optImage, l.Image})
	for _, kv := range [][2]string{{optConf, l.Conf}, {optSnapshot, l.Snapshot}, {optUser, l.User}} {
		if kv[1] != "" {
			out = append(out, kv)
		}
	}
	return out
}

// FormatSpecific is qemu-img info's "rbd" format-specific data (of
// info -f rbd): QEMU reports the image's encryption format when librbd
// encrypts it, which this driver does not support, so there is nothing.
func (d *driver) FormatSpecific(co *coroutine.Co) (any, error) { return struct{}{}, nil }
