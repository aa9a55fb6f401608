package coroutine

import "testing"

// TestEvent: an Event set before the wait, by a goroutine on no loop, and
// by a coroutine on another loop wakes its waiter on the waiter's own loop.
func TestEvent(t *testing.T) {
	a, err := Start(Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Start(Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, setter := range []string{"before", "goroutine", "other-loop"} {
		var e Event
		waiting := make(chan struct{})
		done := make(chan *Loop)
		if setter == "before" {
			e.Set(nil)
		}
		a.Spawn(func(co *Co) {
			close(waiting)
			e.Wait(co)
			done <- co.Loop()
		})
		<-waiting
		switch setter {
		case "goroutine":
			e.Set(nil)
		case "other-loop":
			if err := b.Call(func(co *Co) error { e.Set(co); return nil }); err != nil {
				t.Fatal(err)
			}
		}
		if l := <-done; l != a {
			t.Errorf("%s: the waiter resumed on another loop", setter)
		}
		e.Reset()
	}
}
