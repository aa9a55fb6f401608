package coroutine

import "sync"

// Event is a one-shot signal that one coroutine waits for and anything
// sets: a coroutine on any loop, or a goroutine running on none. The
// waiter is woken on its own loop (see Co.wake). The zero value is unset;
// Reset makes it reusable.
type Event struct {
	mu     sync.Mutex
	set    bool
	waiter *Co
}

// Wait parks co until the event is set; it returns at once if it is.
func (e *Event) Wait(co *Co) {
	e.mu.Lock()
	if e.set {
		e.mu.Unlock()
		return
	}
	e.waiter = co
	e.mu.Unlock()
	co.park()
}

// Set sets the event and wakes its waiter, if any. co is the calling
// coroutine, or nil when the caller runs on no loop.
func (e *Event) Set(co *Co) {
	e.mu.Lock()
	e.set = true
	w := e.waiter
	e.waiter = nil
	e.mu.Unlock()
	if w != nil {
		w.wake(loopOf(co))
	}
}

// Reset clears the event for another use; nothing may be waiting.
func (e *Event) Reset() {
	e.mu.Lock()
	e.set, e.waiter = false, nil
	e.mu.Unlock()
}
