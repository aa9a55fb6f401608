package bdrv

import "ublkimg/coroutine"

// trackedReq is a write in flight on a node (QEMU's BdrvTrackedRequest).
// Serialising requests (read-modify-write padding) cover their whole
// aligned range and wait for every overlapping request; other requests wait
// only for overlapping serialising ones.
type trackedReq struct {
	start, end  int64
	serialising bool
	// waitingFor is the request this one currently waits for. A request
	// never waits for one that is itself waiting: that one re-scans when it
	// wakes and will then wait for us, so skipping it cannot deadlock.
	waitingFor *trackedReq
	waiters    coroutine.Queue
	prev, next *trackedReq
}

type trackedList struct {
	mu   coroutine.Mutex
	head *trackedReq
}

// begin registers a request for [start, end) and waits until it may run.
// A request never waits for itself.
func (l *trackedList) begin(co *coroutine.Co, start, end int64, serialising bool) *trackedReq {
	r := &trackedReq{start: start, end: end, serialising: serialising}
	l.mu.Lock(co)
	r.next = l.head
	if l.head != nil {
		l.head.prev = r
	}
	l.head = r
	for {
		c := l.conflictLocked(r)
		if c == nil {
			break
		}
		r.waitingFor = c
		c.waiters.Wait(co, &l.mu)
		r.waitingFor = nil
	}
	l.mu.Unlock(co)
	return r
}

// conflictLocked finds a request r must wait for. Called with l.mu held.
func (l *trackedList) conflictLocked(r *trackedReq) *trackedReq {
	for o := l.head; o != nil; o = o.next {
		if o == r || (!o.serialising && !r.serialising) {
			continue
		}
		if o.start < r.end && r.start < o.end && o.waitingFor == nil {
			return o
		}
	}
	return nil
}

// end removes r and wakes the requests waiting for it.
func (l *trackedList) end(co *coroutine.Co, r *trackedReq) {
	l.mu.Lock(co)
	if r.prev != nil {
		r.prev.next = r.next
	} else {
		l.head = r.next
	}
	if r.next != nil {
		r.next.prev = r.prev
	}
	r.waiters.RestartAll(co)
	l.mu.Unlock(co)
}
