//go:build race

package qcow2_test

// raceEnabled scales the slow tests down under the race detector, which
// makes the driver several times slower.
const raceEnabled = true
