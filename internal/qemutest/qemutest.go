// Package qemutest holds what the tests of several packages share about
// running QEMU's tools (and the other host tools they need) as their
// oracle.
package qemutest

import (
	"math/rand/v2"
	"strings"
	"time"
)

// pbkdf2TimingFailure is what qemu-img prints when it cannot time its
// PBKDF2 benchmark for a LUKS key slot: it measures the thread's CPU time,
// which tick-based accounting on a loaded machine reports as zero for a
// short burst of work, and then gives up.
const pbkdf2TimingFailure = "Unable to get accurate CPU usage"

// retryBudget bounds how long RetryPBKDF2Timing keeps trying: on a machine
// busy with parallel test packages the failure can repeat for seconds.
const retryBudget = 30 * time.Second

// RetryPBKDF2Timing calls run, which runs a QEMU tool and returns its
// output, again (with a growing pause) while that output is qemu-img's
// PBKDF2 timing failure, for at most retryBudget. It returns the last
// output; whatever else run records (exit status, error) is the last run's.
func RetryPBKDF2Timing(run func() string) string {
	deadline := time.Now().Add(retryBudget)
	for pause := 50 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		out := run()
		if !strings.Contains(out, pbkdf2TimingFailure) || time.Now().After(deadline) {
			return out
		}
		time.Sleep(pause)
	}
}

// Text is n bytes of compressible text, the same for the same seed: words
// of 3 to 9 letters drawn from a vocabulary of 500, for images whose
// clusters the tests compress.
func Text(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	words := make([][]byte, 500)
	for i := range words {
		w := make([]byte, 3+r.IntN(7))
		for j := range w {
			w[j] = 'a' + byte(r.IntN(16))
		}
		words[i] = append(w, ' ')
	}
	b := make([]byte, 0, n+10)
	for len(b) < n {
		b = append(b, words[r.IntN(len(words))]...)
	}
	return b[:n]
}

// ShellRetryPBKDF2 defines pbkdf2_retry for the bash scripts that make
// test images: "pbkdf2_retry qemu-img create ..." runs the command again
// while it fails with qemu-img's PBKDF2 timing failure, within the same
// budget as RetryPBKDF2Timing, and otherwise fails as the command did.
const ShellRetryPBKDF2 = `
pbkdf2_retry() {
	local deadline=$((SECONDS + 30)) out
	while :; do
		if out=$("$@" 2>&1); then
			[ -z "$out" ] || printf '%s\n' "$out"
			return 0
		fi
		case $out in
		*"` + pbkdf2TimingFailure + `"*) [ $SECONDS -lt $deadline ] && { sleep 0.2; continue; } ;;
		esac
		printf '%s\n' "$out" >&2
		return 1
	done
}
`
