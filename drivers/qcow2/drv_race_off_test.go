//go:build !race

package qcow2_test

const raceEnabled = false
