//go:build race

package qcow2_test

// raceEnabled scales the slow tests down under the race detector, which
// makes the driver several times slower. `make test` runs the tests that
// read it again without -race (the Makefile's NORACE_TESTS).
const raceEnabled = true
