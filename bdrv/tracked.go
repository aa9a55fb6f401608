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
	// free holds ended requests (linked through next) for reuse, so a
	// write allocates none (QEMU keeps its BdrvTrackedRequest on the
	// coroutine's stack). It holds at most as many as were ever in
	// flight at once.
	free *trackedReq
}

// begin registers a request for [start, end) and waits until it may run.
// A request never waits for itself.
func (l *trackedList) begin(co *coroutine.Co, start, end int64, serialising bool) *trackedReq {
	l.mu.Lock(co)
	r := l.free
	if r != nil {
		l.free = r.next
	} else {
		r = new(trackedReq)
	}
	r.start, r.end, r.serialising = start, end, serialising
	r.prev, r.next = nil, l.head
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
	// A woken waiter may still point at r through waitingFor until it
	// runs; it only tests that pointer against nil, so r can be reused.
	r.prev, r.next = nil, l.free
	l.free = r
	l.mu.Unlock(co)
}
