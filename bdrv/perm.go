package bdrv

import "ublkimg/coroutine"

// Perm is a set of QEMU's block permissions (BLK_PERM_*), in the order of
// their image lock bytes: what a node's users do with it, or what they let
// other processes do with it meanwhile.
type Perm uint8

const (
	PermConsistentRead Perm = 1 << iota
	PermWrite
	PermWriteUnchanged
	PermResize
	PermAll = PermConsistentRead | PermWrite | PermWriteUnchanged | PermResize
)

// PermSetter is a protocol driver that publishes its node's permissions to
// other processes and refuses those that conflict with theirs (the file
// driver's image locks). The opener calls it once, when it knows what the
// node's users need: after probing the format, before the format driver
// opens the image, as QEMU sets a node's permissions when its parents
// attach, not when it opens.
type PermSetter interface {
	SetPerm(perm, shared Perm) error
}

// usePerm is what the users of a node opened for spec do: read
// consistently unless they read metadata only (QEMU's BDRV_O_NO_IO, as
// qemu-img info), and write and resize unless they only read.
func usePerm(spec Spec, readOnly bool) Perm {
	var p Perm
	if !spec.NoIO {
		p = PermConsistentRead
	}
	if !readOnly {
		p |= PermWrite | PermResize
	}
	return p
}

// sharedPerm is what the opener of spec lets other processes do: read and
// write what does not change (qemu-img's default), and with
// Spec.ShareWrite also write and resize.
func sharedPerm(spec Spec) Perm {
	if spec.ShareWrite {
		return PermAll
	}
	return PermConsistentRead | PermWriteUnchanged
}

// childShared is what a format node lets others do with its protocol
// child, given what its own users share: a data-only format (raw) passes
// that on, a format with metadata in the file never lets others write or
// resize it (QEMU's bdrv_default_perms_for_storage), even when it only
// reads.
func childShared(f *Format, shared Perm) Perm {
	if f.DataOnly {
		return shared
	}
	return shared &^ (PermWrite | PermResize)
}

// setPerm publishes the permissions of protocol node n when its driver
// has any to publish; on failure it closes n.
func setPerm(co *coroutine.Co, n *Node, perm, shared Perm) error {
	ps, ok := n.drv.(PermSetter)
	if !ok {
		return nil
	}
	if err := ps.SetPerm(perm, shared); err != nil {
		n.Close(co)
		return err
	}
	return nil
}
