// Package lukscrypto implements the LUKS version 1 on-disk format as QEMU uses it
// for encrypted qcow2 images (crypt_method 2) and raw LUKS volumes: header
// parsing and validation, key slot unlock, header creation, and the sector
// ciphers that encrypt and decrypt the payload. It also provides the legacy
// qcow "AES" sector cipher (crypt_method 1).
//
// The format is the LUKS1 on-disk specification 1.2.1 (cryptsetup's
// docs/on-disk-format.pdf): a 592-byte big-endian header (magic, cipher
// name, cipher mode, hash, payload offset, master key size, master key
// digest, uuid, eight key slots), followed by the anti-forensic split key
// material of each slot. A key slot holds the master key split into
// `stripes` blocks (AF split), encrypted with a key derived from the
// passphrase by PBKDF2 over the header's hash.
//
// Every field of a header read from disk is bounded before use: key sizes
// are at most 64 bytes, stripes must be 4000 (as QEMU requires), key
// material must lie inside the header area, and PBKDF2 iteration counts are
// capped (MaxIterations), so a hostile header costs at most a bounded
// amount of memory and time.
//
// Secrets: the passphrase and the master key are []byte so that callers and
// this package can zero the copies they own; the hash and cipher states of
// the standard library keep their own copies, which cannot be wiped. Nothing
// here logs or formats a secret into an error.
package lukscrypto
