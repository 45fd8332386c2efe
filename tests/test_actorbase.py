"""The actor base: the wait_idle barrier counts every message and background job, and a crash in
a singleton actor is reported (so `run` exits non-zero) while a worker's is only logged."""

from __future__ import annotations

import threading

import pytest

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


def test_activity_counter_never_goes_negative():
    a = Activity()
    a.begin(2)
    a.end(3)
    assert a.pending == 0
    a.wait_idle(timeout=0.1)


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
