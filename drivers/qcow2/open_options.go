package qcow2

// OpenOptions are the options a qcow2 node honours at open (QEMU's
// qcow2_runtime_opts, the encryption and data file children, and
// x-crash-safe-metadata); --image-opts refuses the others. QEMU takes
// every encrypt.* option, even of an image without encryption.
func (img *Image) OpenOptions() []string {
	return []string{OptLazyRefcounts, OptPassDiscardRequest, "pass-discard-snapshot", OptPassDiscardOther,
		"overlap-check", "overlap-check.", OptCacheSize, OptL2CacheSize, OptL2CacheEntrySize,
		OptRefcountCacheSize, OptCacheCleanInterval, "encrypt.",
		OptDataFile, OptDataFile + ".", OptCrashSafeMetadata}
}
