"""The deterministic runtime: the same pykka actor classes, one thread, messages in send order."""

from __future__ import annotations

import pykka
import pytest

from actors.base import BaseActor
from actors.simruntime import SimRuntime


class Recorder(BaseActor):
    def __init__(self, name, log, peer=None):
        super().__init__()
        self.name, self.log, self.peer = name, log, peer

    def on_start(self):
        self.log.append((self.name, "start"))

    def hit(self, n):
        self.log.append((self.name, n))
        if self.peer is not None and n < 3:
            self.peer.hit.defer(n + 1)

    def double(self, x):
        return 2 * x

    def ask_inside(self, other):
        return other.double(1).get(timeout=1)

    def boom(self):
        raise RuntimeError("boom")


def test_messages_run_in_send_order_across_actors_and_asks_drive_the_queue():
    rt, log = SimRuntime(), []
    b = rt.start(Recorder, "b", log).proxy()
    a = rt.start(Recorder, "a", log, peer=b).proxy()
    a.hit.defer(0)
    b.hit.defer(10)
    assert log == []  # nothing runs until the runtime does
    assert a.double(21).get(timeout=1) == 42  # get() from outside runs the queue up to the reply
    rt.run()
    assert log == [("b", "start"), ("a", "start"), ("a", 0), ("b", 10), ("b", 1)]
    with pytest.raises(RuntimeError, match="tell only"):
        a.ask_inside(b).get(timeout=1)  # a blocking ask inside a handler fails instead of deadlocking
    a.actor_ref.stop()
    b.actor_ref.stop()
    assert not pykka.ActorRegistry.get_all()


@pytest.mark.allow_actor_errors
def test_a_crash_stops_only_that_actor_and_later_messages_are_dead_letters():
    rt, log = SimRuntime(), []
    a = rt.start(Recorder, "a", log).proxy()
    b = rt.start(Recorder, "b", log).proxy()
    a.boom.defer()
    a.hit.defer(5)  # queued before the crash is handled: dropped once a has stopped
    b.hit.defer(6)
    rt.run()
    assert log == [("a", "start"), ("b", "start"), ("b", 6)]
    assert not a.actor_ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        a.hit.defer(7)
    b.actor_ref.stop()
