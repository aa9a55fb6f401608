//go:build race

package file

// raceEnabled: the race detector's instrumentation also makes the compiler
// allocate append's backing arrays on the heap, so a stack-allocated iovec
// array cannot occur in a race build; TestVectoredIOUnderStackMoves then
// only checks the I/O path for races, briefly. make test runs it again
// without the race detector.
const raceEnabled = true
