package qcow2

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
	"ublkimg/drivers/lukscrypto"
)

// The amend capability (bdrv.Amender): qemu-img amend's -o options, parsed
// by the caller against amendOptionSpecs, become an AmendOptions here.

// Amend option names besides the create options they share
// (size, compat, backing_file, ...): LUKS key slot management.
const (
	AmendEncryptState     = "encrypt.state"
	AmendEncryptKeyslot   = "encrypt.keyslot"
	AmendEncryptNewSecret = "encrypt.new-secret"
	AmendEncryptOldSecret = "encrypt.old-secret"
)

// amendOptionSpecs are the options amend takes (QEMU's qcow2_amend_opts:
// the options qcow2 shares with create, and the LUKS key slot ones of
// BLOCK_CRYPTO_OPT_DEF_QCOW2_LUKS_*).
var amendOptionSpecs = append(createSpecs(CreateSize, CreateCompat, CreateBackingFile, CreateBackingFmt,
	CreateDataFile, CreateDataFileRaw, CreateLazyRefcounts, CreateRefcountBits),
	[]bdrv.OptionSpec{
		{Name: AmendEncryptState, Type: bdrv.OptString, Help: "Select new state of affected keyslots (active/inactive)"},
		{Name: AmendEncryptKeyslot, Type: bdrv.OptNumber, Help: "Select a single keyslot to modify explicitly"},
		{Name: AmendEncryptNewSecret, Type: bdrv.OptString, Help: "New secret to set in the matching keyslots. Empty string to erase"},
		{Name: AmendEncryptOldSecret, Type: bdrv.OptString, Help: "Old secret to match the keyslots to modify"},
		{Name: CreateEncryptIterTime, Type: bdrv.OptNumber, Help: "Time to spend in PBKDF in milliseconds"},
	}...)

// createSpecs returns the create option specs of the names given.
func createSpecs(names ...string) []bdrv.OptionSpec {
	var out []bdrv.OptionSpec
	for _, s := range createOptionSpecs {
		if slices.Contains(names, s.Name) {
			out = append(out, s)
		}
	}
	return out
}

// AmendOptionSpecs returns the options Amend takes and those of creating a
// qcow2 image (QEMU's qcow2_create_opts, which, unlike createOptionSpecs,
// leave out the file protocol's nocow).
func (img *Image) AmendOptionSpecs() (amend, create []bdrv.OptionSpec) {
	for _, s := range createOptionSpecs {
		if s.Name != CreateNocow {
			create = append(create, s)
		}
	}
	return amendOptionSpecs, create
}

// Amend changes the image as qemu-img amend -o opts does (bdrv.Amender):
// the values are checked and the changes made by AmendWith, in QEMU's
// order; the key slot changes unlock the LUKS header with the key the image
// was opened with.
func (img *Image) Amend(co *coroutine.Co, opts bdrv.Options, ctl bdrv.AmendControl) error {
	o := amendOptionsOf(opts)
	var err error
	if o.Version, err = amendVersion(opts); err != nil {
		return err
	}
	if o.Encrypt != nil {
		o.Encrypt.Force = ctl.Force
		o.Encrypt.Secret = img.crypt.keySecret
	}
	if size, _ := opts.Size(CreateSize, 0); size != 0 && ctl.Resize != nil {
		o.Resize = func(co *coroutine.Co) error { return ctl.Resize(co, size) }
	}
	o.Status = ctl.Status
	err = img.AmendWith(co, o)
	if errors.Is(err, ErrAmendBacking) {
		err = fmt.Errorf("%w\nYou can use 'qemu-img rebase' instead.", err)
	}
	return err
}

// amendOptionsOf converts amend options whose values have their types.
func amendOptionsOf(opts bdrv.Options) AmendOptions {
	var o AmendOptions
	str := func(k string) *string {
		if v, ok := opts[k]; ok {
			return &v
		}
		return nil
	}
	flag := func(k string) *bool {
		if v, ok := opts[k]; ok {
			b, _ := bdrv.ParseBool(v)
			return &b
		}
		return nil
	}
	o.BackingFile, o.BackingFormat, o.DataFile = str(CreateBackingFile), str(CreateBackingFmt), str(CreateDataFile)
	o.DataFileRaw, o.LazyRefcounts = flag(CreateDataFileRaw), flag(CreateLazyRefcounts)
	if v, ok := opts[CreateRefcountBits]; ok {
		n, _ := bdrv.ParseNumber(v)
		o.RefcountBits = math.MaxUint32 // refused by AmendWith
		if n > 0 && n <= 64 {
			o.RefcountBits = uint32(n)
		}
	}
	o.Encrypt = amendCryptOptions(opts)
	return o
}

// amendCryptOptions gathers the encrypt.* options, nil if none is given.
func amendCryptOptions(opts bdrv.Options) *lukscrypto.AmendOptions {
	var e lukscrypto.AmendOptions
	given := false
	for k, v := range opts {
		name, ok := strings.CutPrefix(k, "encrypt.")
		if !ok {
			continue
		}
		given = true
		n, _ := bdrv.ParseNumber(v)
		switch name {
		case "state":
			e.State = &v
		case "new-secret":
			e.NewSecret = &v
		case "old-secret":
			e.OldSecret = &v
		case "keyslot":
			e.Keyslot = new(int64(n))
		case "iter-time":
			e.IterTime = new(int64(n))
		}
	}
	if !given {
		return nil
	}
	return &e
}

// amendVersion checks the compat value as QEMU's qcow2_amend_options does
// (after the progress starts): 0 when not given.
func amendVersion(opts bdrv.Options) (uint32, error) {
	compat, ok := opts[CreateCompat]
	if !ok {
		return 0, nil
	}
	switch compat {
	case "0.10", "v2":
		return 2, nil
	case "1.1", "v3":
		return 3, nil
	}
	return 0, fmt.Errorf("Unknown compatibility level %s", compat)
}
