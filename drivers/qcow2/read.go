package qcow2

import (
	"fmt"

	"golang.org/x/sys/unix"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

// Preadv implements bdrv.Driver (QEMU's qcow2_co_preadv_part): map a run of
// the request under the metadata lock, read it without the lock, repeat.
func (img *Image) Preadv(co *coroutine.Co, off int64, iov bdrv.IOVec, flags bdrv.ReqFlags) error {
	if err := img.checkIO(); err != nil {
		return err
	}
	return img.readGuest(co, uint64(off), iov)
}

// readGuest reads guest data; copy-on-write uses it too. Called unlocked.
func (img *Image) readGuest(co *coroutine.Co, off uint64, iov bdrv.IOVec) error {
	total := uint64(iov.Len())
	for done := uint64(0); done < total; {
		img.meta.Lock(co)
		m, err := img.getHostOffsetLocked(co, off+done, total-done)
		img.meta.Unlock(co)
		if err != nil {
			return err
		}
		n := min(m.n, total-done)
		part := iov.Slice(int64(done), int64(n))
		switch m.typ {
		case SubclusterUnallocatedPlain, SubclusterUnallocatedAlloc:
			if b := img.node.Backing; b != nil {
				// The backing node reads zeros past its end.
				err = b.Preadv(co, int64(off+done), part, 0)
			} else {
				part.Zero(0, int64(n))
			}
		case SubclusterZeroPlain, SubclusterZeroAlloc:
			part.Zero(0, int64(n))
		case SubclusterNormal:
			if img.encrypted() {
				err = img.readEncrypted(co, m.host, off+done, part)
			} else {
				err = img.data.Preadv(co, int64(m.host), part, 0)
			}
		case SubclusterCompressed:
			err = img.readCompressed(co, m.host, off+done, part)
		default:
			err = fmt.Errorf("qcow2: internal error: mapping type %s: %w", m.typ, unix.EIO)
		}
		if err != nil {
			return err
		}
		done += n
	}
	return nil
}

// readCompressed reads the part of the compressed cluster described by L2
// entry ent that holds guest bytes [off, off+len(part)). Called unlocked.
func (img *Image) readCompressed(co *coroutine.Co, ent, off uint64, part bdrv.IOVec) error {
	host, clen := img.g.CompressedRange(ent)
	if host+clen > MaxHostOffset {
		return &ioError{unix.EIO, fmt.Errorf("qcow2: compressed cluster %#x+%d beyond the offset limit", host, clen)}
	}
	oic := off & (img.cs - 1)
	var done func([]byte)
	if uint64(part.Len()) < img.cs {
		// Small reads: the cluster may be inflated already, or being
		// inflated by another reader.
		var hit bool
		if hit, done = img.ccache.read(co, ent, oic, part); hit {
			return nil
		}
	}
	var src, dst []byte
	inPlace := len(part) == 1 && uint64(len(part[0])) == img.cs
	if inPlace {
		// The whole cluster into one buffer (convert, big reads):
		// decompressed in place, no copy.
		src, dst = bdrv.AlignedBuffer(int(clen), 4096), part[0]
	} else {
		buf := bdrv.AlignedBuffer(int(clen+img.cs), 4096)
		src, dst = buf[:clen], buf[clen:]
	}
	// Data past the end of the file reads as zeros, which then fails to
	// decompress: a hostile descriptor costs a bounded read, no more.
	err := img.file.Preadv(co, int64(host), bdrv.IOVec{src}, 0)
	if err == nil {
		if derr := img.decompress(co, dst, src); derr != nil {
			err = &ioError{unix.EIO, fmt.Errorf("qcow2: cannot decompress cluster at guest offset %#x (host %#x, %d bytes): %v",
				off&^(img.cs-1), host, clen, derr)}
		}
	}
	if done != nil {
		if err != nil {
			done(nil)
		} else {
			done(dst)
		}
	}
	if err != nil {
		return err
	}
	if !inPlace {
		part.CopyFrom(dst[oic:oic+uint64(part.Len())], 0)
	}
	return nil
}

// BlockStatus implements bdrv.BlockStatuser with QEMU's mapping
// (qcow2_co_block_status): normal data is DATA at its host offset,
// zero clusters are ZERO (with the host offset if preallocated),
// unallocated subclusters of an allocated cluster only have a host offset,
// compressed data is DATA|COMPRESSED. Data of an image whose metadata was
// preallocated gets RECURSE, so the file below tells real data from holes.
func (img *Image) BlockStatus(co *coroutine.Co, wantZero bool, off, bytes int64) (bdrv.Status, error) {
	if err := img.checkIO(); err != nil {
		return bdrv.Status{}, err
	}
	img.meta.Lock(co)
	m, err := img.getHostOffsetLocked(co, uint64(off), uint64(bytes))
	if err == nil && wantZero && !img.preallocChecked {
		img.detectMetadataPreallocLocked(co)
	}
	prealloc := img.metadataPrealloc
	img.meta.Unlock(co)
	if err != nil {
		return bdrv.Status{}, err
	}
	st := bdrv.Status{Pnum: int64(m.n)}
	switch m.typ {
	case SubclusterNormal:
		st.Flags = bdrv.StatusData | bdrv.StatusOffsetValid
	case SubclusterZeroAlloc:
		st.Flags = bdrv.StatusZero | bdrv.StatusOffsetValid
	case SubclusterUnallocatedAlloc:
		st.Flags = bdrv.StatusOffsetValid
	case SubclusterZeroPlain:
		st.Flags = bdrv.StatusZero
	case SubclusterCompressed:
		st.Flags = bdrv.StatusData | bdrv.StatusCompressed
	}
	if img.encrypted() {
		// The host offset holds ciphertext: nobody may read the guest
		// data there (QEMU leaves OFFSET_VALID out when s->crypto).
		st.Flags &^= bdrv.StatusOffsetValid
	}
	if st.Flags&bdrv.StatusOffsetValid != 0 {
		st.Map, st.File = int64(m.host), img.data
		if prealloc && st.Flags&bdrv.StatusData != 0 {
			st.Flags |= bdrv.StatusRecurse
		}
	}
	return st, nil
}

// detectMetadataPreallocLocked decides whether the image looks like it was
// created with metadata preallocation: at least ~10% more clusters in use
// than the file really stores (QEMU's qcow2_detect_metadata_preallocation,
// whose verdict also covers images whose copy-on-write left holes).
func (img *Image) detectMetadataPreallocLocked(co *coroutine.Co) {
	img.preallocChecked = true
	real := img.file.AllocatedSize(co)
	if real < 0 {
		return
	}
	realClusters := uint64(real) / img.cs
	threshold := max(realClusters*10/9, realClusters+2)
	end := (uint64(img.file.Length()) + img.cs - 1) / img.cs
	E := img.g.RefblockEntries()
	var used uint64
	for c := uint64(0); c < end && used < threshold; c++ {
		rb, err := img.refblockOffsetLocked(co, c>>img.rbBits())
		if err != nil {
			return
		}
		if rb == 0 {
			c |= E - 1 // nothing in use in this range
			continue
		}
		rc, err := img.getRefcountLocked(co, c)
		if err != nil {
			return
		}
		if rc > 0 {
			used++
		}
	}
	img.metadataPrealloc = used >= threshold
}
