//go:build !race

package qcow2

const ckRace = false
