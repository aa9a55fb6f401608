//go:build !norbd

package main

// The rbd driver loads librbd at run time (drivers/rbd), which links the
// binary dynamically against the C library (nothing from Ceph): build with
// CGO_ENABLED=0 and -tags norbd for a static binary without it.
import _ "ublkimg/drivers/rbd"
