"""What the management API needs from the running dispatcher, and an in-memory stand-in.

The HTTP layer depends only on :class:`Backend`, so it can be tested over real HTTP without the
actor system. The real implementation (over actor proxies, asking with a timeout) lives with the
actors; :class:`SnapshotBackend` serves a fixed, mutable :class:`Snapshot` for tests and benches.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Protocol

from actors.snapshot import IDLE_BEHAVIORS, Snapshot


class NotFound(Exception):
    """The instance or container id is not known to the dispatcher (HTTP 404)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BackendTimeout(Exception):
    """The actor system did not answer in time (HTTP 503: the caller may retry)."""


class Backend(Protocol):
    def snapshot(self) -> Snapshot:
        """The last published Snapshot. Must never block: it is read on every API call and scrape."""

    def set_idle_behavior(self, instance_id: str, behavior: str) -> None:
        """``behavior`` is one of run|hold|drain. Raises NotFound or BackendTimeout."""

    def kill_instance(self, instance_id: str, reason: str) -> None:
        """Shut the instance down. Raises NotFound or BackendTimeout."""

    def kill_container(self, uuid: str, reason: str) -> None:
        """Kill the container's runner wherever it runs. Raises NotFound or BackendTimeout."""

    def health(self) -> dict:
        """``{"health": "OK"}`` or ``{"health": "ERROR", "error": "..."}``."""

    def dispatching(self) -> str:
        """"" while this process dispatches; else why not (a standby waiting for the lock)."""


class SnapshotBackend:
    """A Backend over an in-memory Snapshot: actions edit the snapshot as the dispatcher would.

    ``calls`` records every action as ``(method, *args)`` so tests can check what reached the
    backend; set ``busy = True`` to make every action raise :class:`BackendTimeout`.
    """

    def __init__(self, snapshot: Snapshot | None = None, health_error: str = ""):
        self._snap = snapshot if snapshot is not None else Snapshot()
        self._lock = threading.Lock()  # serializes writers; readers take the reference as is
        self.health_error = health_error
        self.standby_reason = ""
        self.busy = False
        self.calls: list[tuple] = []

    def snapshot(self) -> Snapshot:
        return self._snap

    def publish(self, snapshot: Snapshot) -> None:
        self._snap = snapshot

    def set_idle_behavior(self, instance_id: str, behavior: str) -> None:
        if behavior not in IDLE_BEHAVIORS:
            raise ValueError(f"idle behavior {behavior!r}: expected one of {', '.join(IDLE_BEHAVIORS)}")
        self._update_instance("set_idle_behavior", instance_id, behavior,
                              "requested instance does not exist", idle_behavior=behavior)

    def kill_instance(self, instance_id: str, reason: str) -> None:
        self._update_instance("kill_instance", instance_id, reason, "instance not found",
                              worker_state="shutdown")

    def kill_container(self, uuid: str, reason: str) -> None:
        self._check_busy()
        with self._lock:
            if uuid not in self._snap.runners:
                raise NotFound("container not found")
            self.calls.append(("kill_container", uuid, reason))

    def health(self) -> dict:
        if self.health_error:
            return {"health": "ERROR", "error": self.health_error}
        return {"health": "OK"}

    def dispatching(self) -> str:
        return self.standby_reason

    def _check_busy(self) -> None:
        if self.busy:
            raise BackendTimeout("dispatcher is busy, try again")

    def _update_instance(self, method: str, instance_id: str, arg: str, missing: str, **changes) -> None:
        self._check_busy()
        with self._lock:
            snap = self._snap
            rows = list(snap.instances)
            for i, row in enumerate(rows):
                if row.instance and row.instance == instance_id:
                    rows[i] = dataclasses.replace(row, **changes)
                    break
            else:
                raise NotFound(missing)
            self.calls.append((method, instance_id, arg))
            self._snap = dataclasses.replace(snap, instances=tuple(rows))
