"""The vocabulary the actors exchange: immutable values only.

Actors talk through the tellers of :mod:`actors.inbox` (each call a pykka ``defer``); these
dataclasses are the values. They are frozen, so a message can be read by two threads, sent
twice, or received late without anyone seeing it change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.resources import Resources
from conf.model import InstanceType


class State(str, enum.Enum):
    UNKNOWN = "unknown"  # found in the cloud, not created by this process, not yet probed OK
    BOOTING = "booting"
    IDLE = "idle"
    RUNNING = "running"
    SHUTDOWN = "shutdown"  # destroy requested; no longer monitored

    def __str__(self) -> str:
        return self.value


class Behavior(str, enum.Enum):
    RUN = "run"      # run containers; shut down when idle too long
    HOLD = "hold"    # never shut down automatically, start nothing new
    DRAIN = "drain"  # shut down as soon as idle

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, v: str | None) -> Behavior | None:
        try:
            return cls(v)
        except ValueError:
            return None


BOOTED = (State.IDLE, State.RUNNING)


@dataclass(frozen=True)
class InstanceInfo:
    """One listed cloud instance, frozen at listing time. ``handle`` is the driver's object."""

    id: str
    address: str
    provider_type: str
    remote_user: str
    tags: Mapping[str, str]
    handle: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, inst) -> InstanceInfo:
        return cls(id=inst.id, address=inst.address or "", provider_type=inst.provider_type,
                   remote_user=inst.remote_user, tags=dict(inst.tags), handle=inst)


@dataclass(frozen=True)
class QueueEntry:
    """A container the dispatcher cares about, with its instance-type choice made once."""

    uuid: str
    state: str
    priority: int
    container: Mapping[str, Any]
    instance_types: tuple[InstanceType, ...]
    resources: Resources
    first_seen_at: float
    created_at: float = 0.0
    supervisor: bool = False
    locked_by_uuid: str = ""

    def with_update(self, fields: Mapping[str, Any]) -> QueueEntry:
        """This entry with fresher state/priority/locked_by_uuid from an API response."""
        c = dict(self.container)
        for k in ("state", "priority", "locked_by_uuid"):
            if k in fields:
                c[k] = fields[k]
        return QueueEntry(self.uuid, c.get("state", self.state), int(c.get("priority") or 0), c,
                          self.instance_types, self.resources, self.first_seen_at, self.created_at,
                          self.supervisor, c.get("locked_by_uuid") or "")


@dataclass(frozen=True)
class WorkerView:
    """What a WorkerActor tells the scheduler about itself, whenever any of it changes."""

    instance_id: str
    instance_type: InstanceType
    state: State
    idle_behavior: Behavior
    address: str
    provider_type: str
    running: tuple[str, ...] = ()  # starting or running crunch-run processes, sorted
    last_uuid: str = ""
    busy: float = 0.0  # last time it had containers
    appeared: float = 0.0
    probed: float = 0.0  # last successful probe
    destroyed: float = 0.0
    probe_done: bool = False  # at least one probe attempt has completed
    # How many start_container messages this worker has handled (refused ones too). The scheduler
    # numbers the starts it sends; a view that has not seen a start yet cannot erase it (Go
    # throws away probe results that began before a start).
    starts_seen: int = 0
    run_probed: bool = False  # a run probe has answered: its containers are known
    # The dispatcher's own reason to drain (a boot probe failing on an adopted VM that runs
    # containers), kept apart from the operator's idle behaviour: never saved in the tag, and
    # dropped when the boot probe recovers, so the operator's setting applies again.
    draining: str = ""
    price: float | None = None  # the driver's latest price (spot); None: the type's configured Price


@dataclass(frozen=True)
class CreateFailure:
    """Why a create failed, already classified by the driver's error protocol."""

    message: str
    quota: bool = False
    capacity_scope: tuple | None = None
    retry_at: float | None = None
