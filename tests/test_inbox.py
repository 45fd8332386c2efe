"""actors.inbox: every actor implements the inbox declared for it, and a teller tells."""

from __future__ import annotations

import inspect

import pykka
import pytest

from actors.base import BaseActor
from actors.inbox import (InstanceSetInbox, QueueInbox, SchedulerAsks, SchedulerInbox, WorkerInbox,
                          methods, tell)
from actors.instance_set import InstanceSetActor
from actors.queue import QueueActor
from actors.scheduler import SchedulerActor
from actors.worker import WorkerActor


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("actor,inbox", [
    (SchedulerActor, SchedulerInbox), (SchedulerActor, SchedulerAsks), (WorkerActor, WorkerInbox),
    (QueueActor, QueueInbox), (InstanceSetActor, InstanceSetInbox)],
    ids=lambda x: x.__name__)
def test_actor_implements_its_inbox(actor, inbox):
    """A handler renamed or re-signed in the actor but not in its declaration fails here."""
    assert methods(inbox)
    for name in methods(inbox):
        handler = getattr(actor, name, None)
        assert handler is not None, f"{actor.__name__} has no handler {name}"
        assert _params(handler) == _params(getattr(inbox, name)), f"{actor.__name__}.{name}"


class _Echo(BaseActor):
    def __init__(self):
        super().__init__()
        self.got = []

    def lock(self, uuid):
        self.got.append(("lock", uuid))

    def unlock(self, uuid, reason):
        self.got.append(("unlock", uuid, reason))

    def cancel(self, uuid, reason):
        self.got.append(("cancel", uuid, reason))

    def forget(self, uuid):
        self.got.append(("forget", uuid))

    def seen(self):
        return list(self.got)


def test_a_teller_tells_the_actor():
    ref = _Echo.start()
    try:
        q = tell(ref.proxy(), QueueInbox)
        assert q.lock("u1") is None  # a tell: nothing to wait for
        q.unlock("u1", "why")
        assert ref.proxy().seen().get(timeout=5) == [("lock", "u1"), ("unlock", "u1", "why")]
        assert q.actor_ref is ref
        assert not hasattr(q, "seen")  # only what the inbox declares
    finally:
        ref.stop()


def test_a_teller_needs_every_declared_handler():
    ref = _Echo.start()
    try:
        with pytest.raises(AttributeError):
            tell(ref.proxy(), WorkerInbox)
    finally:
        ref.stop()


def test_a_teller_of_a_stopped_actor_raises_actor_dead():
    ref = _Echo.start()
    q = tell(ref.proxy(), QueueInbox)
    ref.stop()
    with pytest.raises(pykka.ActorDeadError):
        q.forget("u1")
