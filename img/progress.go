package img

import (
	"fmt"
	"io"
)

// Progress prints qemu-img's -p progress line, "    (12.34/100%)\r", as
// util/qemu-progress.c does: it reprints only when the value moved by more
// than minSkip percent (1 for convert, 2 for compare) or reached 0 or 100,
// and End adds the final newline. The arithmetic is in float32, like
// QEMU's, so the printed values match.
type Progress struct {
	w         io.Writer // nil: disabled
	minSkip   float32
	current   float32
	lastPrint float32
}

// NewProgress returns a progress printer on w; a nil w disables it.
func NewProgress(w io.Writer, minSkip float32) *Progress {
	return &Progress{w: w, minSkip: minSkip}
}

// Print advances the progress: with max == 0, delta is the new absolute
// percentage; otherwise delta/100*max is added to it (qemu_progress_print).
func (p *Progress) Print(delta float32, max int) {
	if p == nil || p.w == nil {
		return
	}
	var cur float32
	if max == 0 {
		cur = delta
	} else {
		cur = p.current + delta/100*float32(max)
	}
	if cur > 100 {
		cur = 100
	}
	p.current = cur
	if cur > p.lastPrint+p.minSkip || cur < p.lastPrint-p.minSkip || cur == 0 || cur == 100 {
		p.lastPrint = cur
		fmt.Fprintf(p.w, "    (%3.2f/100%%)\r", cur)
	}
}

// End finishes the progress line.
func (p *Progress) End() {
	if p == nil || p.w == nil {
		return
	}
	fmt.Fprint(p.w, "\n")
}
