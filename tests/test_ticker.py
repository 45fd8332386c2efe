"""The Ticker: per-actor deadlines in a heap, delivered once when due (FakeClock and real time)."""

from __future__ import annotations

import threading
import time

import pytest

from cloud.clock import FakeClock, SystemClock
from actors.ticker import Ticker

T0 = 1_700_000_000.0


class Recorder:
    def __init__(self):
        self.got: list[tuple[str, float]] = []

    def target(self, key):
        return lambda now: self.got.append((key, now))


def ticker(*keys):
    t, rec = Ticker(FakeClock(T0)), Recorder()
    for k in keys:
        t.register(k, rec.target(k))
    return t, rec


def test_nothing_due_before_the_deadline():
    t, rec = ticker("a")
    t.schedule("a", T0 + 10)
    assert t.fire_due(T0 + 9.999) == 0
    assert rec.got == []
    assert t.fire_due(T0 + 10) == 1
    assert rec.got == [("a", T0 + 10)]


def test_earliest_deadline_wins():
    t, rec = ticker("a")
    t.schedule("a", T0 + 10)
    t.schedule("a", T0 + 5)   # earlier: replaces
    t.schedule("a", T0 + 20)  # later: ignored while an earlier one is pending
    assert t.next_deadline() == T0 + 5
    assert t.fire_due(T0 + 5) == 1
    assert t.fire_due(T0 + 100) == 0, "the replaced and ignored deadlines are not delivered"
    assert rec.got == [("a", T0 + 5)]


def test_delivered_deadline_is_forgotten():
    t, rec = ticker("a")
    t.schedule("a", T0 + 1)
    t.fire_due(T0 + 1)
    assert t.next_deadline() is None
    assert t.fire_due(T0 + 1000) == 0
    # the actor schedules its next deadline while handling the tick: it is kept, even if later
    t.schedule("a", T0 + 30)
    assert t.next_deadline() == T0 + 30
    t.fire_due(T0 + 30)
    assert rec.got == [("a", T0 + 1), ("a", T0 + 30)]


def test_rescheduled_to_the_same_time_after_delivery_fires_once_more():
    t, rec = ticker("a")
    t.schedule("a", T0 + 10)
    t.schedule("a", T0 + 5)
    t.fire_due(T0 + 5)
    t.schedule("a", T0 + 10)  # a stale (T0+10) entry is still in the heap
    assert t.fire_due(T0 + 10) == 1
    assert t.fire_due(T0 + 10) == 0
    assert rec.got == [("a", T0 + 5), ("a", T0 + 10)]


def test_unregister_drops_target_and_deadline():
    t, rec = ticker("a", "b")
    t.schedule("a", T0 + 1)
    t.schedule("b", T0 + 2)
    t.unregister("a")
    t.unregister("nobody")  # harmless
    assert t.next_deadline() == T0 + 2
    assert t.fire_due(T0 + 10) == 1
    assert rec.got == [("b", T0 + 10)]


def test_fire_order_is_by_deadline_then_by_scheduling_order():
    t, rec = ticker("a", "b", "c", "d")
    t.schedule("a", T0 + 3)
    t.schedule("b", T0 + 1)
    t.schedule("c", T0 + 2)
    t.schedule("d", T0 + 1)
    assert t.fire_due(T0 + 2) == 3
    assert [k for k, _ in rec.got] == ["b", "d", "c"]
    assert t.next_deadline() == T0 + 3


def test_next_deadline_empty_and_after_changes():
    t, _ = ticker("a", "b")
    assert t.next_deadline() is None
    t.schedule("b", T0 + 7)
    t.schedule("a", T0 + 9)
    assert t.next_deadline() == T0 + 7
    t.unregister("b")
    assert t.next_deadline() == T0 + 9


def test_fire_due_uses_the_clock_by_default():
    clock = FakeClock(T0)
    t, rec = Ticker(clock), Recorder()
    t.register("a", rec.target("a"))
    t.schedule("a", T0 + 60)
    assert t.fire_due() == 0
    clock.advance(60)
    assert t.fire_due() == 1
    assert rec.got == [("a", T0 + 60)]


def test_a_failing_delivery_does_not_stop_the_others():
    t, rec = ticker("b")

    def boom(now):
        raise RuntimeError("actor stopped")

    t.register("a", boom)
    t.schedule("a", T0 + 1)
    t.schedule("b", T0 + 1)
    assert t.fire_due(T0 + 1) == 2
    assert rec.got == [("b", T0 + 1)]


def test_deliver_may_schedule_reentrantly():
    """An actor handling its tick in the ticker's thread may call schedule() again."""
    t = Ticker(FakeClock(T0))
    got = []

    def deliver(now):
        got.append(now)
        t.schedule("a", now + 5)

    t.register("a", deliver)
    t.schedule("a", T0 + 5)
    t.fire_due(T0 + 5)
    t.fire_due(T0 + 10)
    assert got == [T0 + 5, T0 + 10]
    assert t.next_deadline() == T0 + 15


# ------------------------------------------------------------------------------ real time


def wait_until(cond, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


@pytest.fixture
def running_ticker():
    made = []

    def start(max_wait):
        t = Ticker(SystemClock())
        t.start(max_wait=max_wait)
        made.append(t)
        return t

    yield start
    for t in made:
        t.stop()


def test_thread_delivers_a_due_tick(running_ticker):
    t = running_ticker(1.0)
    done = threading.Event()
    seen = []
    t.register("a", lambda now: (seen.append(now), done.set()))
    when = time.time() + 0.05
    t.schedule("a", when)
    assert done.wait(timeout=5), "tick not delivered"
    assert seen[0] >= when


def test_schedule_wakes_a_long_wait(running_ticker):
    """With nothing scheduled the thread sleeps max_wait (here 30 s); a new earliest deadline
    must wake it, not wait for that to end."""
    t = running_ticker(30.0)
    done = threading.Event()
    t.register("a", lambda now: done.set())
    wait_until(lambda: t._cond._waiters, "ticker thread never started waiting")
    t0 = time.monotonic()
    t.schedule("a", time.time() + 0.02)
    assert done.wait(timeout=5), "tick not delivered"
    assert time.monotonic() - t0 < 5


def test_stop_is_prompt_and_joins(running_ticker):
    t = running_ticker(30.0)
    th = t._thread
    assert th is not None and th.is_alive()
    t0 = time.monotonic()
    t.stop()
    assert time.monotonic() - t0 < 5
    assert not th.is_alive() and t._thread is None


def test_restart_after_stop(running_ticker):
    t = running_ticker(30.0)
    t.stop()
    t.start(max_wait=30.0)
    done = threading.Event()
    t.register("a", lambda now: done.set())
    t.schedule("a", time.time())
    assert done.wait(timeout=5)
