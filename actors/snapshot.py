"""What the scheduler publishes after each pass: read by the management API and /metrics.

A Snapshot is an immutable value swapped in atomically, so a scrape or an API read never waits on
an actor. Times are unix seconds (floats); the API renders them as RFC 3339.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from actors.messages import Behavior, State
from actors.resources import Resources
from conf.model import InstanceType

WORKER_STATES = tuple(s.value for s in State)
IDLE_BEHAVIORS = tuple(b.value for b in Behavior)
INSTANCE_CATEGORIES = ("inuse", "hold", "booting", "unknown", "idle")


@dataclass(frozen=True)
class InstanceView:
    """One row of ``GET /arvados/v1/dispatch/instances`` (a pending create has instance "")."""

    instance: str
    address: str
    price: float
    arvados_instance_type: str
    provider_instance_type: str
    last_container_uuid: str
    last_busy: float  # unix seconds, 0 = never
    running_container_uuids: tuple[str, ...]
    worker_state: str
    idle_behavior: str
    vcpus: int = 0
    ram: int = 0
    probed: float = 0.0  # last successful probe, for probe_age metrics


@dataclass(frozen=True)
class QueueEntryView:
    """One item of ``GET /arvados/v1/dispatch/containers``."""

    container: Mapping  # the loaded container fields (uuid, state, priority, ...)
    instance_types: tuple[InstanceType, ...]  # eligible, cheapest first
    resources: Resources
    first_seen_at: float
    scheduling_status: str

    @property
    def uuid(self) -> str:
        return self.container["uuid"]


@dataclass(frozen=True)
class Snapshot:
    taken_at: float = 0.0
    instances: tuple[InstanceView, ...] = ()
    queue: tuple[QueueEntryView, ...] = ()  # scheduler order
    # containers that have a runner (starting or running) on some worker: uuid -> instance id
    runners: Mapping = field(default_factory=lambda: MappingProxyType({}))
    at_quota: bool = False
    max_concurrent_containers: int = 0
    containers_allocated_not_started: int = 0
    containers_not_allocated_over_quota: int = 0
    containers_longest_wait_time_seconds: float = 0.0
    last_503_time: float = 0.0
    # queue entry counts by (state, first eligible type name)
    queue_entries: Mapping = field(default_factory=lambda: MappingProxyType({}))
    ready: bool = False  # the first cloud listing and queue poll are in


_LAZY = ("queue", "queue_entries", "containers_longest_wait_time_seconds")


class LiveSnapshot(Snapshot):
    """A Snapshot whose per-container parts are computed on first read, not in the pass.

    Rendering 10,000 queue entries (their views, statuses and counts) would cost the scheduler
    more than the pass itself; most snapshots are never read before the next one replaces them.
    ``lazy()`` returns (queue, queue_entries, longest_wait) and runs at most once.
    """

    def __init__(self, *, lazy, **fields):
        import dataclasses
        import threading
        for f in dataclasses.fields(Snapshot):
            if f.name in _LAZY:
                continue
            if f.name in fields:
                v = fields[f.name]
            elif f.default is not dataclasses.MISSING:
                v = f.default
            else:
                v = f.default_factory()
            object.__setattr__(self, f.name, v)
        object.__setattr__(self, "_lazy_fn", lazy)
        object.__setattr__(self, "_lazy_val", None)
        object.__setattr__(self, "_lazy_lock", threading.Lock())

    def _lazy(self):
        v = self._lazy_val
        if v is None:
            with self._lazy_lock:
                v = self._lazy_val
                if v is None:
                    v = self._lazy_fn()
                    object.__setattr__(self, "_lazy_val", v)
        return v

    @property
    def queue(self):
        return self._lazy()[0]

    @property
    def queue_entries(self):
        return self._lazy()[1]

    @property
    def containers_longest_wait_time_seconds(self):
        return self._lazy()[2]
