package qcow2

import "testing"

func TestPreallocSize(t *testing.T) {
	// qemu-img measure -O qcow2 --size 1G: 64k clusters, 16-bit refcounts.
	if got := preallocSize(1<<30, 65536, 4, false); got != 1074135040 {
		t.Errorf("preallocSize(1G) = %d, want 1074135040", got)
	}
	if blocks, table := refcountMetadataSize(1, 512, 6, false); (blocks+table)*512 != 1024 {
		t.Errorf("refcountMetadataSize(1 cluster, 512, 64 bits) = %d+%d clusters, want 1024 bytes", blocks, table)
	}
}
