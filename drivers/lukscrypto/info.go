package lukscrypto

// Info is what qemu-img info reports about a LUKS header (QEMU's QAPI
// QCryptoBlockInfoLUKS): the json tags are QEMU's member names in schema
// order, offsets are in bytes.
type Info struct {
	CipherAlg      string     `json:"cipher-alg"`
	CipherMode     string     `json:"cipher-mode"`
	IVGenAlg       string     `json:"ivgen-alg"`
	IVGenHashAlg   string     `json:"ivgen-hash-alg,omitempty"`
	HashAlg        string     `json:"hash-alg"`
	PayloadOffset  int64      `json:"payload-offset"`
	MasterKeyIters int64      `json:"master-key-iters"`
	UUID           string     `json:"uuid"`
	Slots          []SlotInfo `json:"slots"`
}

// SlotInfo is one key slot (QAPI QCryptoBlockInfoLUKSSlot); iters and
// stripes are given for active slots only.
type SlotInfo struct {
	Active    bool   `json:"active"`
	Iters     *int64 `json:"iters"`
	Stripes   *int64 `json:"stripes"`
	KeyOffset int64  `json:"key-offset"`
}

// Info returns the header's description for qemu-img info.
func (h *Header) Info() *Info {
	s := h.Suite()
	in := &Info{
		CipherAlg: s.CipherAlg, CipherMode: s.CipherMode, IVGenAlg: s.IVGenAlg,
		IVGenHashAlg: s.IVGenHash, HashAlg: s.HashAlg, UUID: h.UUID,
		PayloadOffset:  h.AreaSize(),
		MasterKeyIters: int64(h.MKDigestIter),
	}
	num := func(v uint32) *int64 { n := int64(v); return &n }
	for _, k := range h.Slots {
		si := SlotInfo{Active: k.Active, KeyOffset: int64(k.KeyOffset) * SectorSize}
		if k.Active {
			si.Iters, si.Stripes = num(k.Iterations), num(k.Stripes)
		}
		in.Slots = append(in.Slots, si)
	}
	return in
}
