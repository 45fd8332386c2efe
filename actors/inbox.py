"""Each actor's inbox, declared once: the messages other actors (and the API) may send it.

Actors hold each other as *tellers* built from these declarations (:func:`tell`): calling
``scheduler.worker_changed(view)`` on one is ``proxy.worker_changed.defer(view)`` on the actor,
so callers name typed methods, never strings. A test double is built from the same declaration
(``unittest.mock.create_autospec(SchedulerInbox, instance=True)``): it rejects a method the
inbox does not declare and a call with the wrong arguments, and ``tests/test_inbox.py`` checks
that every actor implements its inbox with the same parameters. So renaming a handler breaks
the tests that use it instead of the running dispatcher.

Every method is a tell (rule 1 of the design): it returns nothing and never waits. The
management API's requests to the scheduler are asks, declared apart (:class:`SchedulerAsks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from actors.messages import Behavior, CreateFailure, InstanceInfo, QueueEntry, WorkerView
from conf.model import InstanceType


class SchedulerInbox(Protocol):
    """What the instance set, the workers and the queue tell the scheduler."""

    def instances_listed(self, infos: tuple[InstanceInfo, ...], started: float) -> None: ...

    def instance_created(self, req_id: str, it: InstanceType, info: InstanceInfo, now: float) -> None: ...

    def create_failed(self, req_id: str, it: InstanceType, failure: CreateFailure, now: float) -> None: ...

    def worker_changed(self, view: WorkerView) -> None: ...

    def container_ended(self, uuid: str, instance_id: str, at: float) -> None: ...

    def container_start_failed(self, uuid: str, instance_id: str, reason: str) -> None: ...

    def queue_update(self, changed: tuple[QueueEntry, ...], removed: tuple[str, ...],
                     updated_at: float | None) -> None: ...

    def container_op_done(self, uuid: str, op: str, entry: QueueEntry | None, error: str) -> None: ...

    def api_503(self, at: float) -> None: ...


class SchedulerAsks(Protocol):
    """Management requests, asked by API threads with a timeout (they raise NotFound)."""

    def set_idle_behavior(self, instance_id: str, behavior: str) -> None: ...

    def kill_instance(self, instance_id: str, reason: str) -> None: ...

    def kill_container(self, uuid: str, reason: str) -> None: ...


class WorkerInbox(Protocol):
    """What the scheduler tells one worker."""

    def update_instance(self, instance: InstanceInfo, now: float) -> None: ...

    def set_idle_behavior(self, behavior: Behavior, now: float) -> None: ...

    def start_container(self, entry: QueueEntry, now: float) -> None: ...

    def kill_container(self, uuid: str, reason: str, now: float) -> None: ...

    def shutdown_if_allowed(self, reason: str, now: float) -> None: ...

    def kill_instance(self, reason: str, now: float) -> None: ...

    def abandon(self) -> None: ...


class QueueInbox(Protocol):
    """What the scheduler tells the queue."""

    def lock(self, uuid: str) -> None: ...

    def unlock(self, uuid: str, reason: str) -> None: ...

    def cancel(self, uuid: str, reason: str) -> None: ...

    def forget(self, uuid: str) -> None: ...


class InstanceSetInbox(Protocol):
    """What the scheduler and the workers tell the instance set."""

    def create(self, req_id: str, it: InstanceType, tags: Mapping[str, str], init_command: str,
               public_key: str | None, now: float) -> None: ...

    def destroy(self, handle: Any, now: float) -> None: ...

    def set_tags(self, handle: Any, tags: Mapping[str, str], now: float) -> None: ...


def methods(inbox: type) -> tuple[str, ...]:
    """The message names an inbox declares."""
    return tuple(n for n, v in vars(inbox).items() if callable(v) and not n.startswith("_"))


T = TypeVar("T")


class Teller:
    """An inbox over a pykka proxy: each declared method is the proxy's ``defer`` (a tell).

    ``actor_ref`` is the actor's, for whoever owns its lifetime.
    """

    def __init__(self, proxy, inbox: type):
        self.actor_ref = proxy.actor_ref
        self.inbox = inbox
        for name in methods(inbox):
            setattr(self, name, getattr(proxy, name).defer)

    def __repr__(self) -> str:
        return f"<{self.inbox.__name__} of {self.actor_ref}>"


def tell(proxy, inbox: type[T]) -> T:
    """``inbox`` implemented by telling the actor behind ``proxy``."""
    return Teller(proxy, inbox)  # type: ignore[return-value]
