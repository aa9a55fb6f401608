//go:build race

package qcow2

// ckRace is set under the race detector, whose shadow memory makes memory
// bounds meaningless.
const ckRace = true
