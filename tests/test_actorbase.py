"""The actor base: the wait_idle barrier counts every message and background job, and a crash in
a singleton actor is reported (so `run` exits non-zero) while a worker's is only logged."""

from __future__ import annotations

import logging
import threading

import pykka
import pytest
from pykka import ThreadingFuture
from pykka._envelope import Envelope

from actors.base import ACTIVITY, Activity, BaseActor, background


class Echo(BaseActor):
    def __init__(self, out: list, gate: threading.Event | None = None):
        super().__init__()
        self.out = out
        self.gate = gate

    def put(self, v):
        if self.gate is not None:
            self.gate.wait(5)
        self.out.append(v)

    def boom(self):
        raise RuntimeError("boom")


class Critical(Echo):
    critical = True


def test_wait_idle_waits_for_queued_messages_and_background_jobs():
    out, gate = [], threading.Event()
    ref = Echo.start(out, gate)
    try:
        for i in range(3):
            ref.proxy().put.defer(i)
        with pytest.raises(TimeoutError):
            ACTIVITY.wait_idle(timeout=0.05)  # blocked behind the gate: not idle
        gate.set()
        ACTIVITY.wait_idle(timeout=5)
        assert out == [0, 1, 2]
        done = []
        job = background(lambda: done.append(1))
        assert ACTIVITY.pending >= 1  # counted from submission, not from start
        threading.Thread(target=job).start()
        ACTIVITY.wait_idle(timeout=5)
        assert done == [1]
    finally:
        ref.stop()
    ACTIVITY.wait_idle(timeout=5)


@pytest.mark.allow_actor_errors
def test_activity_counter_never_goes_negative_and_says_so(caplog):
    a = Activity()
    a.begin(2)
    with caplog.at_level(logging.ERROR, logger="dispatch.actors"):
        a.end(3)
    assert a.pending == 0
    a.wait_idle(timeout=0.1)
    assert [r.getMessage() for r in caplog.records] == ["activity count went below zero"]


def test_reset_forgets_a_leak_and_a_late_end_of_it_is_no_error(caplog):
    a = Activity()
    a.begin(2)  # a test's leftovers: one never ends, one ends late
    assert a.reset() == 2 and a.pending == 0
    with caplog.at_level(logging.ERROR, logger="dispatch.actors"):
        a.end()  # the late end of the leftover
        a.begin()  # the next test's work
        a.end()
    assert a.pending == 0 and not caplog.records


class _Torn(Echo):
    def __init__(self, out, torn: threading.Event):
        super().__init__(out)
        self.torn = torn

    def _actor_loop_teardown(self):
        super()._actor_loop_teardown()
        self.torn.set()


def test_a_message_that_lands_after_the_last_drain_of_a_stopped_actor_is_not_counted():
    """pykka's tell checks the actor is alive, then puts: a tell from another thread that passed
    the check just before the stop lands in an inbox nobody reads any more. Counted, the barrier
    waited for it forever (every later wait_idle in the process timed out)."""
    torn = threading.Event()
    ref = _Torn.start([], torn)
    inbox = ref.actor_inbox
    ref.stop()
    assert torn.wait(5)
    ACTIVITY.wait_idle(timeout=5)
    inbox.put(Envelope(("put", 1)))  # the racing tell's put
    assert ACTIVITY.pending == 0
    fut = ThreadingFuture()
    inbox.put(Envelope("x", reply_to=fut))  # an ask that raced the same way is answered, not lost
    with pytest.raises(pykka.ActorDeadError):
        fut.get(timeout=1)


@pytest.mark.allow_actor_errors
def test_crash_of_a_critical_actor_is_reported_and_a_worker_crash_is_not():
    crashed, seen = [], threading.Event()

    def report(exc):
        crashed.append(exc)
        seen.set()

    old = BaseActor.on_crash
    BaseActor.on_crash = staticmethod(report)
    try:
        w = Echo.start([])
        w.proxy().boom.defer()
        ACTIVITY.wait_idle(timeout=5)
        assert crashed == []
        c = Critical.start([])
        c.proxy().boom.defer()
        assert seen.wait(5)  # pykka runs the failure policy just after the handler returns
        assert len(crashed) == 1 and isinstance(crashed[0], RuntimeError)
    finally:
        BaseActor.on_crash = old
        for ref in (w, c):
            if ref.is_alive():
                ref.stop()
