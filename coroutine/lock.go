package coroutine

import "sync"

// Mutex is a coroutine mutex (QEMU's CoMutex). A contended Lock parks the
// coroutine instead of blocking its thread; Unlock hands the mutex to the
// longest waiter, which is woken on its own loop. Holders may yield (do I/O)
// while holding it. The zero value is unlocked.
//
// The internal sync.Mutex only guards the waiter list for a few instructions;
// it is never held across a yield.
type Mutex struct {
	mu      sync.Mutex
	locked  bool
	waiters waitList
}

// Lock acquires m, parking co until it is available.
func (m *Mutex) Lock(co *Co) {
	m.mu.Lock()
	if !m.locked {
		m.locked = true
		m.mu.Unlock()
		return
	}
	m.waiters.push(co)
	m.mu.Unlock()
	co.park() // Unlock handed the mutex over before waking us
}

// TryLock acquires m if it is free and reports whether it did.
func (m *Mutex) TryLock() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.locked {
		return false
	}
	m.locked = true
	return true
}

// Unlock releases m, handing it to the first waiter if there is one. co is
// the calling coroutine (it need not be the one that locked m).
func (m *Mutex) Unlock(co *Co) {
	m.mu.Lock()
	if !m.locked {
		m.mu.Unlock()
		panic("coroutine: unlock of unlocked Mutex")
	}
	next := m.waiters.pop()
	if next == nil {
		m.locked = false
	}
	m.mu.Unlock()
	if next != nil {
		next.wake(co.loop)
	}
}

// RWMutex is a coroutine readers/writer lock (QEMU's CoRwlock). Waiters are
// served in arrival order, so a waiting writer holds back later readers and
// cannot starve.
type RWMutex struct {
	mu      sync.Mutex
	readers int      // active readers
	writer  bool     // a writer holds the lock
	waiters waitList // each waiter's Co.wantWrite says which lock it wants
}

// RLock acquires a read lock.
func (rw *RWMutex) RLock(co *Co) {
	rw.mu.Lock()
	if !rw.writer && rw.waiters.empty() {
		rw.readers++
		rw.mu.Unlock()
		return
	}
	rw.enqueueLocked(co, false)
	rw.mu.Unlock()
	co.park()
}

// Lock acquires the write lock.
func (rw *RWMutex) Lock(co *Co) {
	rw.mu.Lock()
	if !rw.writer && rw.readers == 0 && rw.waiters.empty() {
		rw.writer = true
		rw.mu.Unlock()
		return
	}
	rw.enqueueLocked(co, true)
	rw.mu.Unlock()
	co.park()
}

// RUnlock releases a read lock.
func (rw *RWMutex) RUnlock(co *Co) {
	rw.mu.Lock()
	if rw.readers <= 0 {
		rw.mu.Unlock()
		panic("coroutine: RUnlock of RWMutex without readers")
	}
	rw.readers--
	rw.release(co)
}

// Unlock releases the write lock.
func (rw *RWMutex) Unlock(co *Co) {
	rw.mu.Lock()
	if !rw.writer {
		rw.mu.Unlock()
		panic("coroutine: Unlock of RWMutex not write-locked")
	}
	rw.writer = false
	rw.release(co)
}

func (rw *RWMutex) enqueueLocked(co *Co, write bool) {
	co.wantWrite = write
	rw.waiters.push(co)
}

// release is called with rw.mu held, grants the lock to the waiters now
// entitled to it (one writer, or every reader up to the next writer),
// unlocks rw.mu and wakes them.
func (rw *RWMutex) release(co *Co) {
	var wake waitList
	for !rw.writer && rw.waiters.head != nil {
		next := rw.waiters.head
		if next.wantWrite {
			if rw.readers > 0 {
				break
			}
			rw.writer = true
		} else {
			rw.readers++
		}
		wake.push(rw.waiters.pop())
	}
	rw.mu.Unlock()
	for w := wake.pop(); w != nil; w = wake.pop() {
		w.wake(co.loop)
	}
}

// Queue is a list of coroutines waiting for a condition (QEMU's CoQueue).
// The zero value is empty.
type Queue struct {
	mu      sync.Mutex
	waiters waitList
}

// Wait parks co until [Queue.Next] or [Queue.RestartAll] wakes it. If m is
// not nil, co must hold it; it is released while co waits and re-acquired
// before Wait returns, so a condition checked under m cannot be missed.
func (q *Queue) Wait(co *Co, m *Mutex) {
	q.mu.Lock()
	q.waiters.push(co)
	q.mu.Unlock()
	if m != nil {
		m.Unlock(co)
	}
	co.park()
	if m != nil {
		m.Lock(co)
	}
}

// Next wakes the first waiter and reports whether there was one. co is the
// calling coroutine, or nil when the caller runs on no loop.
func (q *Queue) Next(co *Co) bool {
	q.mu.Lock()
	w := q.waiters.pop()
	q.mu.Unlock()
	if w == nil {
		return false
	}
	w.wake(loopOf(co))
	return true
}

// RestartAll wakes every waiter. co is the calling coroutine, or nil.
func (q *Queue) RestartAll(co *Co) {
	q.mu.Lock()
	list := q.waiters
	q.waiters = waitList{}
	q.mu.Unlock()
	from := loopOf(co)
	for w := list.pop(); w != nil; w = list.pop() {
		w.wake(from)
	}
}

// Empty reports whether no coroutine waits on q.
func (q *Queue) Empty() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.waiters.empty()
}

func loopOf(co *Co) *Loop {
	if co == nil {
		return nil
	}
	return co.loop
}
